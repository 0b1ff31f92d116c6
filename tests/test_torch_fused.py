"""batchnorm.torch's fused forms (contract §8): batch_norm(..., activation=, residual=,
inplace=) and BatchNormAct1d/2d/3d.

Each fused form is compared with the unfused composition, on a grid of forms, layouts,
modes, dtypes and training / inference, forward and every gradient:

- the reference's batch norm, then the add, then the activation, in float64 NumPy (the
  backward: g = dy * act'(pre) by the chain rule, then the reference's plain backward on g);
- torch.nn's BatchNorm2d, then ``+``, then relu / leaky_relu (running statistics and
  num_batches_tracked too).

gradcheck / gradgradcheck in float64 on both routes (eager and the custom ops); the
memory-saving mode against the out-of-place one, its clamp of |weight| at the edge, and its
refusals (torch's in-place rules); the modules' state dicts both ways; torch.compile.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm.torch as bnt
from batchnorm import _shapes as S
from batchnorm import reference as ref
from batchnorm.torch import batch_norm, fused
from conftest import assert_close, tolerance

# (activation, negative_slope, residual): every fused form
FORMS = {
    "relu": ("relu", 0.01, False),
    "leaky": ("leaky_relu", 0.1, False),
    "add": (None, 0.01, True),
    "add_relu": ("relu", 0.01, True),
    "add_leaky": ("leaky_relu", 0.2, True),
}
# name -> (shape, memory format)
LAYOUTS = {
    "nchw": ((4, 3, 5, 6), torch.contiguous_format),
    "nhwc": ((4, 3, 5, 6), torch.channels_last),
    "2d": ((16, 3), torch.contiguous_format),
    "3d": ((3, 3, 2, 3, 4), torch.contiguous_format),
    "3d_cl": ((3, 3, 2, 3, 4), torch.channels_last_3d),
}
SMALL = {2: (6, 2), 4: (3, 2, 2, 3), 5: (2, 2, 2, 1, 3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(layout="nchw", dtype=torch.float64, mode="spatial", seed=0, pdtype=None,
         small=False):
    """x, weight, bias, residual, running mean and var, dy for a layout of LAYOUTS (of
    SMALL's shape with ``small``: gradcheck's cost grows with the square of the size)."""
    shape, fmt = LAYOUTS[layout]
    shape = SMALL[len(shape)] if small else shape
    g = _gen(seed)

    def t(s, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift)

    pshape = shape[1:] if mode == "per_activation" else shape[1:2]
    pdtype = pdtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    x = t(shape, 2.0, 0.5).to(dtype).contiguous(memory_format=fmt)
    z = t(shape).to(dtype).contiguous(memory_format=fmt)
    dy = t(shape).to(dtype).contiguous(memory_format=fmt)
    w = (t(pshape, 0.5, 0.0).abs() + 0.5) * torch.where(t(pshape) > 0, 1.0, -1.0)
    b = t(pshape, 0.5)
    rm, rv = t(pshape, 0.5), torch.rand(pshape, generator=g, dtype=torch.float64) + 0.5
    return (x, w.to(pdtype), b.to(pdtype), z, rm.to(pdtype), rv.to(pdtype), dy)


def np64(t):
    return None if t is None else t.detach().double().numpy()


def composition(x, w, b, z, rm, rv, dy, training, activation, slope, mode, eps, momentum):
    """The unfused composition in float64: the reference's batch norm, then the add, then the
    activation; returns y, dx, dweight, dbias, dz, and the running statistics after."""
    x64 = np64(x)
    layout = S.resolve_layout(x64.shape, mode, 1)
    rm64, rv64 = np64(rm).copy(), np64(rv).copy()
    if training:
        bn, mean, invstd, _ = ref.forward_training(x64, np64(w), np64(b), layout, eps=eps,
                                                   momentum=momentum, running_mean=rm64,
                                                   running_var=rv64)
    else:
        bn = ref.forward_inference(x64, np64(w), np64(b), rm64, rv64, layout, eps=eps)
        mean, invstd = rm64, ref.inverse_std(rv64, eps)
    pre = bn + (np64(z) if z is not None else 0.0)
    a = 0.0 if activation == "relu" else slope
    if activation is None:
        y, grad_act = pre, 1.0
    else:
        y, grad_act = np.where(pre > 0, pre, a * pre), np.where(pre > 0, 1.0, a)
    g = np64(dy) * grad_act
    dx, dw, db = ref.backward(g, x64, np64(w), mean, invstd, layout, training=training)
    return y, dx, dw, db, g, rm64, rv64


def run(x, w, b, z, rm, rv, dy, training, activation, slope, mode="spatial", eps=1e-4,
        momentum=0.3, inplace=False):
    """Ours: y, dx, dweight, dbias, dz (dz None without a residual) and the running
    statistics, x entering as a non-leaf (the memory-saving mode writes over it)."""
    x0 = x.clone().requires_grad_()
    w0, b0 = w.clone().requires_grad_(), b.clone().requires_grad_()
    z0 = None if z is None else z.clone().requires_grad_()
    rm0, rv0 = rm.clone(), rv.clone()
    xin = x0 * 1 if inplace else x0  # a non-leaf copy in x's memory format
    y = batch_norm(xin, rm0, rv0, w0, b0, training, momentum, eps, mode=mode,
                   activation=activation, negative_slope=slope, residual=z0, inplace=inplace)
    y.backward(dy)
    return (y.detach(), x0.grad, w0.grad, b0.grad, None if z0 is None else z0.grad, rm0, rv0,
            xin)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_fused_matches_unfused_composition(form, training, layout, dtype):
    activation, slope, with_z = FORMS[form]
    x, w, b, z, rm, rv, dy = make(layout, dtype)
    z = z if with_z else None
    y, dx, dw, db, dz, rm1, rv1, _ = run(x, w, b, z, rm, rv, dy, training, activation, slope)
    ey, edx, edw, edb, edz, erm, erv = composition(x, w, b, z, rm, rv, dy, training, activation,
                                                   slope, "spatial", 1e-4, 0.3)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert dx.dtype == dtype and dw.dtype == w.dtype and db.dtype == b.dtype
    assert_close(y, ey, dtype, name="y")
    assert_close(dx, edx, dtype, name="dx")
    assert_close(dw, edw, dtype, name="dweight")
    assert_close(db, edb, dtype, name="dbias")
    assert_close(rm1, erm, w.dtype, name="running_mean")
    assert_close(rv1, erv, w.dtype, name="running_var")
    if with_z:
        assert dz.dtype == dtype and dz.shape == x.shape
        assert_close(dz, edz, dtype, name="dz")


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
def test_per_activation_mode(form, training, dtype):
    activation, slope, with_z = FORMS[form]
    x, w, b, z, rm, rv, dy = make("nchw", dtype, mode="per_activation")
    z = z if with_z else None
    ours = run(x, w, b, z, rm, rv, dy, training, activation, slope, mode="per_activation")
    expected = composition(x, w, b, z, rm, rv, dy, training, activation, slope,
                           "per_activation", 1e-4, 0.3)
    names = ("y", "dx", "dweight", "dbias", "dz", "running_mean", "running_var")
    for name, a, e in zip(names, ours, expected, strict=False):
        if name == "dz" and not with_z:
            assert a is None
            continue
        assert_close(a, e, dtype, name=name)


def _torch_composition(bn, x, z, activation, slope):
    out = bn(x)
    if z is not None:
        out = out + z
    if activation == "relu":
        return F.relu(out)
    if activation == "leaky_relu":
        return F.leaky_relu(out, slope)
    return out


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,momentum", [(torch.float64, 0.1), (torch.float32, None)],
                         ids=["float64", "float32-cumulative"])
def test_module_matches_torch_nn_composition(form, layout, dtype, momentum):
    """BatchNormAct2d against torch.nn.BatchNorm2d + add + relu / leaky_relu, three training
    steps then eval: outputs, every gradient, running statistics, num_batches_tracked."""
    activation, slope, with_z = FORMS[form]
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(3, momentum=momentum).to(dtype)
    with torch.no_grad():
        theirs.weight.uniform_(-1.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours = bnt.BatchNormAct2d(3, momentum=momentum, activation=activation,
                              negative_slope=slope).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.BatchNorm2d)
    for step in range(4):
        if step == 3:
            ours.eval(), theirs.eval()
        x, _, _, z, _, _, dy = make(layout, dtype, seed=step)
        z = z if with_z else None
        xs = [x.clone().requires_grad_() for _ in range(2)]
        zs = [None if z is None else z.clone().requires_grad_() for _ in range(2)]
        y = ours(xs[0], zs[0])
        yt = _torch_composition(theirs, xs[1], zs[1], activation, slope)
        assert y.is_contiguous(memory_format=LAYOUTS[layout][1])
        assert_close(y, yt, dtype, name=f"y at step {step}")
        params = [ours.weight, ours.bias, theirs.weight, theirs.bias]
        for p in params:
            p.grad = None
        y.backward(dy)
        yt.backward(dy)
        assert_close(xs[0].grad, xs[1].grad, dtype, name=f"dx at step {step}")
        assert_close(ours.weight.grad, theirs.weight.grad, dtype, name="dweight")
        assert_close(ours.bias.grad, theirs.bias.grad, dtype, name="dbias")
        if z is not None:
            assert_close(zs[0].grad, zs[1].grad, dtype, name="dz")
        for name, buf in theirs.named_buffers():
            got = getattr(ours, name)
            if name == "num_batches_tracked":
                assert torch.equal(got, buf)
            else:
                assert_close(got, buf, dtype, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_low_precision_against_torch_nn(dtype):
    """Narrow input with float32 parameters (autocast's convention) against torch.nn in
    float32 on the same rounded input: within the input dtype's tolerance."""
    x, w, b, z, rm, rv, dy = make("nhwc", dtype)
    ours = run(x, w, b, z, rm, rv, dy, True, "relu", 0.0)
    theirs = nn.BatchNorm2d(3, momentum=0.3, eps=1e-4)
    with torch.no_grad():
        theirs.weight.copy_(w), theirs.bias.copy_(b)
        theirs.running_mean.copy_(rm), theirs.running_var.copy_(rv)
    xt, zt = x.float().requires_grad_(), z.float().requires_grad_()
    yt = F.relu(theirs(xt) + zt)
    yt.backward(dy.float())
    assert ours[0].dtype == dtype
    for name, a, e in [("y", ours[0], yt), ("dx", ours[1], xt.grad),
                       ("dweight", ours[2], theirs.weight.grad),
                       ("dbias", ours[3], theirs.bias.grad), ("dz", ours[4], zt.grad)]:
        assert_close(a, e, dtype, name=name)


# ---- derivatives


def _gradcheck_inputs(layout, mode, with_z, seed=0):
    x, w, b, z, rm, rv, _ = make(layout, torch.float64, mode=mode, seed=seed, small=True)
    x, w, b, z = (t.detach().requires_grad_() for t in (x, w, b, z))
    return [x, w, b] + ([z] if with_z else []), rm, rv


# (route, layout, mode): every layout on the eager route, one on the operators' route
GRADCHECK_CASES = [("eager", "nchw", "spatial"), ("eager", "nhwc", "spatial"),
                   ("eager", "3d_cl", "spatial"), ("eager", "2d", "spatial"),
                   ("eager", "nchw", "per_activation"), ("custom_op", "nhwc", "spatial")]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("route,layout,mode", GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck(monkeypatch, form, training, route, layout, mode):
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", route == "eager")
    activation, slope, with_z = FORMS[form]
    inputs, rm, rv = _gradcheck_inputs(layout, mode, with_z)

    def f(x, w, b, z=None):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3, mode=mode,
                          activation=activation, negative_slope=slope, residual=z)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("route,layout,mode", GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck_inplace(monkeypatch, activation, training, route, layout,
                                             mode):
    """The memory-saving mode's derivatives, the second order through its own formula (the
    input enters as a clone: the call writes over it)."""
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", route == "eager")
    inputs, rm, rv = _gradcheck_inputs(layout, mode, False)

    def f(x, w, b):
        return batch_norm(x.clone(), rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3,
                          mode=mode, activation=activation, negative_slope=0.3, inplace=True)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("inplace", [False, True])
def test_gradgradcheck_without_affine(inplace):
    x, _, _, z, rm, rv, _ = make("nchw", small=True)
    x, z = x.requires_grad_(), z.requires_grad_()
    residual = None if inplace else z

    def f(x, z):
        return batch_norm(x.clone(), None, None, None, None, True, activation="leaky_relu",
                          negative_slope=0.5, residual=residual if residual is None else z,
                          inplace=inplace)

    assert gradcheck(f, (x, z))
    assert gradgradcheck(f, (x, z))


def _second_order(f, inputs, dy):
    """f's output, its first derivatives (graph kept) and the derivatives of their squared
    norm: a double-backward loss, as a gradient penalty computes."""
    out = f(*inputs)
    grads = torch.autograd.grad(out, inputs, dy, create_graph=True)
    # an input the first derivatives do not depend on (the bias, through ReLU) gets zeros
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), inputs,
                                 allow_unused=True, materialize_grads=True)
    return [out, *grads, *second]


@pytest.mark.parametrize("form", [*FORMS, "inplace_leaky", "inplace_identity"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_second_order_matches_torch_composition(form, training, layout):
    """Double backward against torch's own batch_norm + add + relu / leaky_relu in float64,
    at float64's tolerance (gradgradcheck's finite differences are far coarser)."""
    inplace = form.startswith("inplace")
    activation, slope, with_z = (("leaky_relu" if form == "inplace_leaky" else None), 0.2,
                                 False) if inplace else FORMS[form]
    x, w, b, z, rm, rv, dy = make(layout, small=True)
    inputs = [x, w, b] + ([z] if with_z else [])
    inputs = [t.detach().requires_grad_() for t in inputs]

    def ours(x, w, b, z=None):
        return batch_norm(x * 1 if inplace else x, rm.clone(), rv.clone(), w, b, training,
                          0.1, 1e-3, activation=activation, negative_slope=slope, residual=z,
                          inplace=inplace)

    def theirs(x, w, b, z=None):
        out = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)
        return _torch_composition(lambda t: t, out, z, activation, slope)

    results = zip(_second_order(ours, inputs, dy), _second_order(theirs, inputs, dy),
                  strict=True)
    for i, (a, e) in enumerate(results):
        assert_close(a, e, torch.float64, name=f"result {i}")


def _routes(monkeypatch, fast, x, w, b, z, rm, rv, dy, training, activation, inplace):
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", fast)
    x0 = x.clone().requires_grad_()
    w0, b0 = w.clone().requires_grad_(), b.clone().requires_grad_()
    z0 = None if z is None else z.clone().requires_grad_()
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x0 * 1, rm0, rv0, w0, b0, training, 0.2, 1e-4, activation=activation,
                   negative_slope=0.1, residual=z0, inplace=inplace)
    (gx,) = torch.autograd.grad(y, x0, dy, create_graph=True)
    (gx * gx).sum().backward()
    return [y, gx, x0.grad, w0.grad, b0.grad, rm0, rv0] + ([z0.grad] if z is not None else [])


@pytest.mark.parametrize("case", ["relu_add", "leaky", "inplace_leaky", "inplace_identity"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_eager_route_matches_custom_ops(monkeypatch, case, training, dtype):
    """The direct autograd.Function route and the operators' route run the same
    implementations: outputs, running statistics, first and second order gradients agree
    (bitwise, except where the two routes round the memory-saving mode's double backward in
    different orders)."""
    activation = {"relu_add": "relu", "leaky": "leaky_relu", "inplace_leaky": "leaky_relu",
                  "inplace_identity": None}[case]
    inplace = case.startswith("inplace")
    x, w, b, z, rm, rv, dy = make("nhwc", dtype)
    z = z if case == "relu_add" else None
    fast = _routes(monkeypatch, True, x, w, b, z, rm, rv, dy, training, activation, inplace)
    slow = _routes(monkeypatch, False, x, w, b, z, rm, rv, dy, training, activation, inplace)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for i, (a, e) in enumerate(zip(fast, slow, strict=True)):
        if a is None or e is None:
            assert a is None and e is None, i
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, i
        if i in (0, 1, 5, 6) or not inplace:  # y, first order, running statistics
            assert torch.equal(a, e), f"result {i}: max {(a.double() - e.double()).abs().max()}"
        else:
            assert_close(a, e, dtype, name=f"result {i}")


# ---- the memory-saving mode


@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_inplace_matches_out_of_place(activation, training, layout, dtype):
    """y written over x: the same y (bitwise: the same computation), the same running
    statistics, the same gradients within the dtype's tolerance (backward recovers xhat from
    the rounded y instead of reading x)."""
    x, w, b, _, rm, rv, dy = make(layout, dtype)
    out = run(x, w, b, None, rm, rv, dy, training, activation, 0.2)
    ins = run(x, w, b, None, rm, rv, dy, training, activation, 0.2, inplace=True)
    y_in, xin = ins[0], ins[-1]
    assert torch.equal(y_in, out[0])
    assert torch.equal(xin.detach(), y_in)  # written over the input
    assert xin.stride() == x.stride()
    assert torch.equal(ins[5], out[5]) and torch.equal(ins[6], out[6])
    # The recovery's error in xhat is the dtype's rounding times |xhat| + |bias / weight|
    # (contract §8): the dtype's tolerance, scaled by that factor.
    atol, rtol = tolerance(dtype)
    scale = 1.0 + float((b / w).abs().max())
    for name, a, e in zip(("dx", "dweight", "dbias"), ins[1:4], out[1:4], strict=True):
        assert a.dtype == e.dtype
        assert_close(a, e, atol=atol * scale, rtol=rtol * scale, name=name)


@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_inplace_first_order_keeps_nothing_else(monkeypatch, route):
    """First-order backward of the memory-saving mode runs no second-order term, and no graph
    node holds an input-sized tensor outside its saved tensors (which backward frees as it
    passes the layer; a plain attribute would keep every layer's y to the end)."""
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", route == "eager")
    calls = []
    real = fused._invstd_term
    monkeypatch.setattr(fused, "_invstd_term", lambda *a: calls.append(1) or real(*a))
    x, w, b, _, rm, rv, dy = make("nchw")
    x0 = x.clone().requires_grad_()
    y = batch_norm(x0 * 1, rm, rv, w, b, True, activation="leaky_relu", inplace=True)
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        held = [v for v in getattr(node, "__dict__", {}).values()
                if isinstance(v, torch.Tensor) and v.numel() == x.numel()]
        assert not held, f"{node.name()} holds an input-sized tensor"
        nodes += [n for n, _ in node.next_functions]
    y.backward(dy)
    assert not calls and x0.grad is not None


@pytest.mark.parametrize("case,activations", [("relu", 2), ("add", 1), ("add_relu", 2),
                                               ("inplace_leaky", 1), ("inplace_identity", 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_what_backward_keeps(case, activations, training):
    """The input-sized tensors autograd keeps (contract §8): x and y with an activation, x
    alone without, y alone (in x's memory) in the memory-saving mode; the residual never."""
    x, w, b, z, rm, rv, _ = make("nchw")
    x0, z0 = x.clone().requires_grad_(), z.clone().requires_grad_()
    w0 = w.clone().requires_grad_()
    inplace = case.startswith("inplace")
    activation = {"relu": "relu", "add": None, "add_relu": "relu", "inplace_leaky":
                  "leaky_relu", "inplace_identity": None}[case]
    saved = {}

    def pack(t):
        if t.numel() == x.numel():
            saved[t.untyped_storage().data_ptr()] = t
        return t

    xin = x0 * 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = batch_norm(xin, rm, rv, w0, b, training, activation=activation,
                       residual=z0 if case.startswith("add") else None, inplace=inplace)
    assert len(saved) == activations
    assert z0.untyped_storage().data_ptr() not in saved
    if inplace:
        assert set(saved) == {xin.untyped_storage().data_ptr()} and y is xin
    else:
        assert xin.untyped_storage().data_ptr() in saved


def test_inplace_returns_and_marks_the_input():
    x, w, b, _, rm, rv, _ = make("nchw")
    x0 = x.clone().requires_grad_()
    xin = x0 + 0
    v = xin._version
    y = batch_norm(xin, rm, rv, w, b, True, activation="leaky_relu", inplace=True)
    assert y is xin and xin._version > v and y.grad_fn is not None
    with torch.no_grad():  # without autograd: the write is still counted
        xin2 = x.clone()
        v = xin2._version
        assert batch_norm(xin2, rm, rv, w, b, True, inplace=True) is xin2
        assert xin2._version > v
    # a leaf requiring grad may be written under no_grad, as by torch's in-place ops
    leaf = x.clone().requires_grad_()
    with torch.no_grad():
        batch_norm(leaf, rm, rv, w, b, False, inplace=True)


@pytest.mark.parametrize("view", ["batch_slice", "channel_slice"])
def test_inplace_on_a_view(view):
    """A view of a non-leaf is written in place, as by torch's in-place operations: the base
    sees y, and gradients through the base (first and second order) are those of the
    out-of-place call."""
    _, w, b, _, _, _, _ = make("nchw", small=True)
    base = torch.randn(4, 4, 2, 3, dtype=torch.float64, generator=_gen(5)).requires_grad_()

    def f(a, w, b, inplace):
        h = a * 2
        v = h[:3, :2] if view == "batch_slice" else h[:, 1:3]
        y = batch_norm(v, None, None, w, b, True, activation="leaky_relu",
                       negative_slope=0.2, inplace=inplace)
        if inplace:
            assert y is v and torch.equal(h[:3, :2] if view == "batch_slice" else h[:, 1:3], y)
            return h.sin()
        other = h.clone()
        if view == "batch_slice":
            other[:3, :2] = y
        else:
            other[:, 1:3] = y
        return other.sin()

    inputs = (base, w.clone().requires_grad_(), b.clone().requires_grad_())
    dy = torch.randn(base.shape, dtype=torch.float64, generator=_gen(6))
    results = []
    for inplace in (False, True):
        out = f(*inputs, inplace)
        grads = torch.autograd.grad(out, inputs, dy, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
        results.append((out, *grads, *second))
    for a, e in zip(*results, strict=True):
        assert_close(a, e, torch.float64)
    assert gradgradcheck(lambda *t: f(*t, True), inputs)


@pytest.mark.parametrize("value", [0.0, 1e-9, -1e-9, -0.0, S.GAMMA_MIN, -S.GAMMA_MIN, 3e-5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inplace_clamps_weight_away_from_zero(value, training):
    """|weight| below GAMMA_MIN computes as GAMMA_MIN with the weight's sign (0 as +): the
    same y and gradients as the out-of-place call with the clamped weight, the weight's
    gradient passed through (as if unclamped), and nothing infinite."""
    x, w, b, _, rm, rv, dy = make("nchw")
    w = w.clone()
    w[1] = value
    clamped = w.clone()
    if abs(value) < S.GAMMA_MIN:  # -0.0 >= 0: zero of either sign counts as positive
        clamped[1] = S.GAMMA_MIN if value >= 0 else -S.GAMMA_MIN
    assert torch.equal(fused.clamp_away(w), clamped)  # NumPy on CPU, torch otherwise:
    assert torch.equal(fused.clamp_away(w.clone().requires_grad_()), clamped)  # the same
    ins = run(x, w, b, None, rm, rv, dy, training, "leaky_relu", 0.2, inplace=True)
    out = run(x, clamped, b, None, rm, rv, dy, training, "leaky_relu", 0.2)
    assert torch.equal(ins[0], out[0])
    for name, a, e in zip(("dx", "dweight", "dbias"), ins[1:4], out[1:4], strict=True):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, torch.float64, name=name)
    # the recovery divides by the clamped weight: |beta / gamma| ~ 1e5 costs ~1e-11 of xhat


def test_inplace_weight_at_zero_can_move_away():
    """A weight at exactly 0 still receives its gradient (straight-through clamp)."""
    x, w, b, _, rm, rv, dy = make("nchw")
    w = w.clone()
    w[0] = 0.0
    out = run(x, w, b, None, rm, rv, dy, True, None, 0.01, inplace=True)
    assert out[2][0] != 0


def test_inplace_check_finite_leaves_input_unchanged():
    x, w, b, _, rm, rv, _ = make("nchw", torch.float32)
    x[1, 2, 0, 0] = float("nan")
    before, rm0, rv0 = x.clone(), rm.clone(), rv.clone()
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        batch_norm(x, rm, rv, w, b, True, check_finite=True, inplace=True)
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))  # NaN != NaN: bits
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    x[1, 2, 0, 0] = 0.0
    y = batch_norm(x, rm, rv, w, b, True, check_finite=True, inplace=True)
    assert y is x


class TestInplaceRefusals:
    """What the memory-saving mode refuses, before writing anything, and what torch's
    in-place operations refuse (the same exception type and message)."""

    def setup_method(self):
        self.x, self.w, self.b, self.z, self.rm, self.rv, _ = make("nchw")

    def call(self, x, **kw):
        kw = {"activation": "leaky_relu", "inplace": True} | kw
        return batch_norm(x, self.rm, self.rv, self.w, self.b, True, **kw)

    def refused(self, x, match, **kw):
        before = x.detach().clone()
        with pytest.raises(RuntimeError, match=match):
            self.call(x, **kw)
        assert torch.equal(x.detach(), before)

    def test_not_invertible(self):
        self.refused(self.x.clone(), "invertible activation", activation="relu")
        self.refused(self.x.clone(), "invertible activation", negative_slope=0.0)
        with pytest.raises(ValueError, match="invertible activation"):
            bnt.BatchNormAct2d(3, activation="relu", inplace=True)

    def test_residual(self):
        self.refused(self.x.clone(), "residual", activation=None, residual=self.z)

    def test_leaf_and_view_of_leaf(self):
        leaf = self.x.clone().requires_grad_()
        with pytest.raises(RuntimeError) as torch_error:
            leaf.mul_(1)
        self.refused(leaf, str(torch_error.value).replace(".", r"\."))
        with pytest.raises(RuntimeError) as torch_error:
            leaf[1:].mul_(1)
        self.refused(leaf[1:], str(torch_error.value).replace(".", r"\."))

    def test_overlapping_input(self):
        expanded = self.x[:1].expand(4, 3, 5, 6)
        with pytest.raises(RuntimeError) as torch_error:
            expanded.mul_(1)
        self.refused(expanded, r"more than one element of the written-to tensor")
        assert "more than one element" in str(torch_error.value)

    def test_input_sharing_memory_with_a_parameter(self):
        x = self.x.clone()
        with pytest.raises(RuntimeError, match="refer to a single memory location"):
            batch_norm(x, None, None, x[0, :, 0, 0], None, True, inplace=True)

    def test_inference_tensor(self):
        with torch.inference_mode():
            t = self.x.clone()
        self.refused(t, "inference tensor")

    def test_input_needed_elsewhere(self):
        """An input another operation saved (exp saves its output): the write is counted in
        its version and that backward raises, as after torch's in-place operations."""
        a = self.x.clone().requires_grad_()
        saved_by_exp = a.exp()
        y = self.call(saved_by_exp)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()

    def test_output_modified_before_backward(self):
        a = self.x.clone().requires_grad_()
        y = self.call(a * 1)
        y.add_(1)  # y is what backward reads
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()

    def test_chained_in_place_layers_refuse_at_backward(self):
        """Two memory-saving layers in a row: the second writes over the first's saved y,
        which its backward then refuses (a convolution between them keeps y apart)."""
        a = self.x.clone().requires_grad_()
        y = self.call(self.call(a * 1))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "2d"])
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_calls_take_the_direct_route(monkeypatch, layout, inplace):
    """float32 / float64 tensors in x's memory order run the CPU backend's kernels on views
    (its plan), not its whole calls, which decide per call: those are made to fail here."""
    from batchnorm.backends import cpu

    def fail(*a, **k):
        raise AssertionError("the whole call ran, not the plan's kernels")

    for name in ("forward_training", "forward_inference", "backward"):
        monkeypatch.setattr(cpu, name, fail)
    x, w, b, z, rm, rv, dy = make(layout, torch.float32)
    for training in (True, False):
        out = run(x, w, b, None if inplace else z, rm, rv, dy, training, "leaky_relu", 0.1,
                  inplace=inplace)
        assert all(t is not None for t in out[:4])


# ---- arguments


def test_argument_errors():
    x, w, b, z, rm, rv, _ = make("nchw")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        batch_norm(x, rm, rv, w, b, True, activation="gelu")
    with pytest.raises(ValueError, match="negative_slope must be a finite number >= 0"):
        batch_norm(x, rm, rv, w, b, True, activation="leaky_relu", negative_slope=-0.1)
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        batch_norm(x, rm, rv, w, b, True, activation="leaky_relu", negative_slope="0.1")
    with pytest.raises(RuntimeError, match="`residual` must have the input's shape"):
        batch_norm(x, rm, rv, w, b, True, residual=z[:, :2])
    with pytest.raises(RuntimeError, match="`residual` must have the input's dtype"):
        batch_norm(x, rm, rv, w, b, True, residual=z.float())
    with pytest.raises(TypeError, match="`residual` must be a torch.Tensor"):
        batch_norm(x, rm, rv, w, b, True, residual=z.numpy())
    with pytest.raises(TypeError, match="`inplace` must be a bool"):
        batch_norm(x, rm, rv, w, b, True, inplace=1)
    with pytest.raises(ValueError, match="unknown activation"):
        bnt.BatchNormAct2d(3, activation="tanh")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_residual_without_grad(monkeypatch, activation, training, layout, route):
    """A residual that needs no gradient (a block's input that nothing trains) still shapes
    act': backward must not take act' from x alone."""
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", route == "eager")
    x, w, b, z, rm, rv, dy = make(layout, torch.float32)
    x0, w0, b0 = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone()
    y = batch_norm(x0, rm.clone(), rv.clone(), w0, b0.requires_grad_(), training, 0.3, 1e-4,
                   activation=activation, negative_slope=0.1, residual=z)
    y.backward(dy)
    expected = composition(x, w, b, z, rm, rv, dy, training, activation, 0.1, "spatial",
                           1e-4, 0.3)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), (y, x0.grad, w0.grad, b0.grad),
                          expected, strict=False):
        assert_close(a, e, torch.float32, name=name)


def test_residual_in_another_memory_format():
    x, w, b, z, rm, rv, dy = make("nhwc")
    z = z.contiguous()
    ours = run(x, w, b, z, rm, rv, dy, True, "relu", 0.0)
    expected = composition(x, w, b, z, rm, rv, dy, True, "relu", 0.0, "spatial", 1e-4, 0.3)
    for name, a, e in zip(("y", "dx", "dweight", "dbias", "dz"), ours, expected, strict=False):
        assert_close(a, e, torch.float64, name=name)


@pytest.mark.parametrize("dy_kind", ["expanded", "other_format"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_in_another_memory_order(dy_kind, inplace):
    """A forward on the direct route, then a dy the kernels' views do not take (the
    expanded gradient of a sum, or another memory format): the general path, same values."""
    x, w, b, z, rm, rv, dy = make("nhwc", torch.float32)
    dy = torch.ones(1).expand(x.shape) if dy_kind == "expanded" else dy.contiguous()
    z = None if inplace else z
    ours = run(x, w, b, z, rm, rv, dy, True, "leaky_relu", 0.1, inplace=inplace)
    expected = composition(x, w, b, z, rm, rv, dy, True, "leaky_relu", 0.1, "spatial", 1e-4,
                           0.3)
    for name, a, e in zip(("y", "dx", "dweight", "dbias", "dz"), ours, expected, strict=False):
        if a is not None:
            assert_close(a, e, torch.float32, name=name)


def test_zero_size_and_meta():
    x = torch.randn(0, 3, 4, requires_grad=True)
    z = torch.randn(0, 3, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), True, activation="relu",
                   residual=z)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    y.sum().backward()
    assert x.grad.shape == x.shape and z.grad.shape == z.shape
    meta = torch.empty(2, 3, 4, 4, device="meta")
    w = torch.ones(3, device="meta", requires_grad=True)
    out = batch_norm(meta, None, None, w, None, True, activation="relu", residual=meta)
    assert out.shape == meta.shape and out.device.type == "meta"
    assert batch_norm(meta, None, None, w, None, True, inplace=True).shape == meta.shape


def test_does_not_modify_inputs_out_of_place():
    x, w, b, z, rm, rv, dy = make("nhwc")
    before = [t.clone() for t in (x, w, b, z)]
    run(x, w, b, z, rm, rv, dy, True, "leaky_relu", 0.1)
    for t, t0 in zip((x, w, b, z), before, strict=True):
        assert torch.equal(t, t0)


# ---- modules


@pytest.mark.parametrize("ours_cls,torch_cls,shape", [
    (bnt.BatchNormAct1d, nn.BatchNorm1d, (6, 3, 4)),
    (bnt.BatchNormAct1d, nn.BatchNorm1d, (6, 3)),
    (bnt.BatchNormAct2d, nn.BatchNorm2d, (4, 3, 3, 5)),
    (bnt.BatchNormAct3d, nn.BatchNorm3d, (2, 3, 2, 3, 4)),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_modules_match_torch_nn_and_load_both_ways(ours_cls, torch_cls, shape, inplace):
    torch.manual_seed(1)
    theirs = torch_cls(3, momentum=None).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours = ours_cls(3, momentum=None, activation="leaky_relu", negative_slope=0.05,
                    inplace=inplace).double()
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch_cls)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, generator=_gen(step))
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(xo * 1)
        yt = F.leaky_relu(theirs(xt), 0.05)
        assert_close(y, yt, torch.float64, name="y")
        y.backward(torch.ones_like(y))
        yt.backward(torch.ones_like(yt))
        assert_close(xo.grad, xt.grad, torch.float64, name="dx")
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float64, name="dweight")
    back = torch_cls(3, momentum=None).double()
    back.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert_close(back.state_dict()[k], v, torch.float64, name=k)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        assert_close(ours(x.clone()), F.leaky_relu(theirs(x), 0.05), torch.float64, name="eval")


def test_module_residual_repr_and_defaults():
    m = bnt.BatchNormAct2d(4)
    assert m.activation == "relu" and not m.inplace
    assert "activation='relu'" in repr(m) and "negative_slope" not in repr(m)
    leaky = bnt.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, inplace=True)
    assert "negative_slope=0.2" in repr(leaky) and "inplace=True" in repr(leaky)
    assert "activation" not in leaky.state_dict() and set(leaky.state_dict()) == set(
        nn.BatchNorm2d(4).state_dict())
    x, z = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert_close(m(x, z), F.relu(nn.BatchNorm2d(4)(x) + z), torch.float32, name="y")
    m2 = copy.deepcopy(leaky)
    assert m2.negative_slope == 0.2 and m2.inplace


def test_module_without_affine_or_running_stats():
    ours = bnt.BatchNormAct2d(3, affine=False, track_running_stats=False, activation=None)
    theirs = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    x, z = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert_close(ours(x, z), theirs(x) + z, torch.float32, name="y")
    ours.eval(), theirs.eval()
    assert_close(ours(x, z), theirs(x) + z, torch.float32, name="y in eval")


# ---- torch.compile


@pytest.mark.parametrize("recover", [False, True], ids=["out_of_place", "memory_saving"])
def test_operators_pass_opcheck(recover):
    """The fused operators' schemas, fake kernels, autograd registration and AOT dispatch,
    as torch.library checks them."""
    ops = torch.ops.batchnorm
    x, w, b, z, rm, rv, dy = make("nchw", small=True)
    x, w, b, z, dy = (t.detach().requires_grad_() for t in (x, w, b, z, dy))
    residual = None if recover else z
    checks = [
        (ops.forward_training_fused, (x, w, b, residual, rm, rv, 0.1, 1e-5, "spatial", None,
                                      False, "leaky_relu", 0.1, recover)),
        (ops.forward_inference_fused, (x, w, b, residual, rm, rv, 1e-5, "spatial", False,
                                       "leaky_relu", 0.1, recover)),
    ]
    y = batch_norm(x.detach(), None, None, w.detach(), b.detach(), True,
                   activation="leaky_relu", negative_slope=0.1)
    invstd = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    if recover:
        checks.append((ops.backward_recover, (dy, y.requires_grad_(), w, b, invstd, True,
                                              "spatial", "leaky_relu", 0.1)))
    else:
        for residual in (False, True):  # with a residual, and with the bias (x route)
            checks.append((ops.backward_fused, (dy, x, y, w, b, torch.zeros(2, dtype=x.dtype),
                                                invstd.detach(), True, "spatial",
                                                "leaky_relu", 0.1, residual)))
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)



def _block(cls_bn, cls_act, inplace):
    """conv -> BN-act -> conv -> BN + shortcut -> act: a residual block."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            if cls_act:
                self.bn1 = cls_bn(4, activation="leaky_relu", negative_slope=0.1,
                                  inplace=inplace)
                self.bn2 = cls_bn(4, activation="relu")
            else:
                self.bn1, self.bn2 = cls_bn(4), cls_bn(4)

        def forward(self, x):
            if cls_act:
                out = self.bn1(self.conv1(x))
                return self.bn2(self.conv2(out), x)
            out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
            return F.relu(self.bn2(self.conv2(out)) + x)
    return Block()


@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_training_step_matches_eager_and_torch_nn(inplace):
    """torch.compile(fullgraph=True) of a block using BatchNormAct2d (residual, in-place
    leaky_relu) through the custom ops: the same outputs, gradients and buffers as eager and
    as the torch.nn block."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    theirs = _block(nn.BatchNorm2d, False, inplace)
    eager = _block(bnt.BatchNormAct2d, True, inplace)
    eager.load_state_dict(theirs.state_dict())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(3, 4, 5, 5, generator=_gen(step))
        outs = []
        for m, f in ((theirs, theirs), (eager, eager), (model, compiled)):
            for p in m.parameters():
                p.grad = None
            out = f(x)
            out.square().sum().backward()
            outs.append(out)
        for o in outs[1:]:
            assert_close(o, outs[0], torch.float32, name=f"output at step {step}")
        for (name, pt), pe, pc in zip(theirs.named_parameters(), eager.parameters(),
                                      model.parameters(), strict=True):
            assert_close(pe.grad, pt.grad, torch.float32, atol=1e-4, name=f"{name}.grad")
            assert_close(pc.grad, pt.grad, torch.float32, atol=1e-4, name=f"{name}.grad")
        for (name, bt), be, bc in zip(theirs.named_buffers(), eager.buffers(), model.buffers(),
                                      strict=True):
            assert_close(be.double(), bt.double(), torch.float32, name=name)
            assert_close(bc.double(), bt.double(), torch.float32, name=name)


def test_compiled_inference_with_inductor():
    torch._dynamo.reset()
    bn = bnt.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    compiled = torch.compile(lambda x, z: bn(x, z) * 2, fullgraph=True)
    x, z = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        assert_close(compiled(x, z), bn(x, z) * 2, torch.float32, name="eval output")
