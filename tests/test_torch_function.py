"""batchnorm.torch.batch_norm against torch.nn.functional.batch_norm, and its derivatives.

gradcheck / gradgradcheck run in float64 over mode x layout x training x affine; forward,
running statistics and gradients are compared with PyTorch's own batch norm.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from batchnorm.torch import batch_norm

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    diff = (actual.double() - expected.double()).abs()
    assert torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol), (
        f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}"
    )


def make(shape, mode, affine, channels_last, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(2).add(0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ps = shape[1:] if mode == "per_activation" else shape[1:2]
    w = torch.randn(ps, generator=g, dtype=torch.float64).to(dtype) if affine else None
    b = torch.randn(ps, generator=g, dtype=torch.float64).to(dtype) if affine else None
    rm = torch.randn(ps, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(ps, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, w, b, rm, rv


@pytest.mark.parametrize("mode", ["spatial", "per_activation"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_and_gradgradcheck(mode, channels_last, training, affine):
    x, w, b, rm, rv = make((4, 3, 2, 3), mode, affine, channels_last)
    inputs = [x.requires_grad_()]
    if affine:
        inputs += [w.requires_grad_(), b.requires_grad_()]

    def f(x, w=None, b=None):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3, mode=mode)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_gradgradcheck_rank2_and_rank5():
    for shape in [(5, 3), (3, 2, 2, 1, 2)]:
        x, w, b, rm, rv = make(shape, "spatial", True, False)
        inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        assert gradgradcheck(lambda x, w, b: batch_norm(x, None, None, w, b, True), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_functional(dtype, channels_last, training):
    x, w, b, rm, rv = make((6, 4, 5, 3), "spatial", True, channels_last, dtype=torch.float64)
    x = x.to(dtype)
    # torch takes low-precision input with float32 parameters (as under autocast).
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, rm, rv = (t.to(pdt) for t in (w, b, rm, rv))
    ours_rm, ours_rv = rm.clone(), rv.clone()
    rm0, rv0 = rm.clone(), rv.clone()
    xo = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    wo, bo = w.clone().requires_grad_(), b.clone().requires_grad_()
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = batch_norm(xo, ours_rm, ours_rv, wo, bo, training, 0.3, 1e-4)
    ref_x = xt if dtype != torch.bfloat16 else xt.float()  # torch CPU bf16 BN is coarse
    yt = F.batch_norm(ref_x, rm, rv, wt, bt, training, 0.3, 1e-4)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    close(y, yt, dtype, "y")
    close(ours_rm, rm, pdt, "running_mean")
    close(ours_rv, rv, pdt, "running_var")
    if not training:
        assert torch.equal(ours_rm, rm0) and torch.equal(ours_rv, rv0)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y.backward(dy)
    yt.backward(dy.to(yt.dtype))
    close(xo.grad, xt.grad, dtype, "dx")
    close(wo.grad, wt.grad, dtype, "dweight")
    close(bo.grad, bt.grad, dtype, "dbias")
    assert xo.grad.dtype == dtype and wo.grad.dtype == pdt


def test_per_activation_is_batchnorm1d_of_flattened_input():
    x, w, b, _, _ = make((7, 3, 2, 2), "per_activation", True, False)
    rm, rv = torch.zeros(3, 2, 2, dtype=x.dtype), torch.ones(3, 2, 2, dtype=x.dtype)
    y = batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, mode="per_activation")
    rm_t, rv_t = torch.zeros(12, dtype=x.dtype), torch.ones(12, dtype=x.dtype)
    yt = F.batch_norm(x.reshape(7, 12), rm_t, rv_t, w.reshape(12), b.reshape(12), True, 0.1)
    close(y.reshape(7, 12), yt, x.dtype, "y")
    close(rm.reshape(12), rm_t, x.dtype, "running_mean")
    close(rv.reshape(12), rv_t, x.dtype, "running_var")


def test_no_running_stats_and_non_contiguous_grad():
    x, w, b, _, _ = make((4, 3, 5), "spatial", True, False)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    batch_norm(xo, None, None, w, b, True).sum().backward()  # dy is an expanded (stride 0) view
    F.batch_norm(xt, None, None, w, b, True).sum().backward()
    close(xo.grad, xt.grad, x.dtype, "dx")


def test_errors_match_torch():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="`weight` must have shape"):
        batch_norm(torch.randn(4, 3), None, None, torch.ones(4), None, True)
    with pytest.raises(TypeError):
        batch_norm(torch.ones(4, 3, dtype=torch.int64), None, None, training=True)
    # eval without running statistics: torch's own exception type and message
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        F.batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(ValueError, match="eps"):
        batch_norm(torch.randn(4, 3), None, None, training=True, eps=-1.0)


def test_zero_size_batch():
    x = torch.randn(0, 3, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), True)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_does_not_modify_input():
    x, w, b, rm, rv = make((4, 3, 2, 2), "spatial", True, True)
    before = x.clone()
    y = batch_norm(x.requires_grad_(), rm, rv, w, b, True)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.detach(), before)


def _run_route(fast, monkeypatch, x, w, b, rm, rv, training, mode, dy):
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", fast)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_() if w is not None else None
    br = b.clone().requires_grad_() if b is not None else None
    rmr, rvr = rm.clone(), rv.clone()
    y = batch_norm(xr, rmr, rvr, wr, br, training, 0.2, 1e-4, mode=mode)
    # first order through the route's backward, then a double-backward loss
    (gx,) = torch.autograd.grad(y, xr, dy, create_graph=True)
    (gx * gx).sum().backward()
    return [y, gx, xr.grad, rmr, rvr] + ([wr.grad, br.grad] if w is not None else [])


@pytest.mark.parametrize("mode", ["spatial", "per_activation"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eager_fast_path_matches_custom_ops(monkeypatch, mode, training, affine, dtype):
    """The direct autograd.Function route and the dispatcher route run the same
    implementations: outputs, running statistics and first and second order gradients are
    bitwise equal."""
    x, w, b, rm, rv = make((5, 3, 4, 2), mode, affine, True, dtype=dtype)
    if dtype != torch.float64:  # float32 parameters and statistics, as under autocast
        w, b = (None if t is None else t.float() for t in (w, b))
        rm, rv = rm.float(), rv.float()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    fast = _run_route(True, monkeypatch, x, w, b, rm, rv, training, mode, dy)
    slow = _run_route(False, monkeypatch, x, w, b, rm, rv, training, mode, dy)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for i, (a, e) in enumerate(zip(fast, slow, strict=True)):
        if a is None or e is None:  # e.g. bias: dx does not depend on it
            assert a is None and e is None, i
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, i
        assert torch.equal(a, e), f"result {i} differs: max {(a.double() - e.double()).abs().max()}"


def test_eager_fast_path_is_taken_and_bumps_versions():
    """Eager calls do not go through the custom op, and the in-place running-statistics
    update is visible to autograd's version counter, as torch's own in-place ops are."""
    from batchnorm.torch import function

    x, w, b, rm, rv = make((4, 3, 2, 2), "spatial", True, False)
    v0 = rm._version, rv._version
    called = []
    real = function._ops_ns.forward_training

    class Spy:
        def __call__(self, *a, **k):
            called.append(1)
            return real(*a, **k)

    try:
        function._ops_ns = type("NS", (), {"forward_training": Spy(),
                                           "backward": torch.ops.batchnorm.backward})()
        batch_norm(x.requires_grad_(), rm, rv, w, b, True).sum().backward()
    finally:
        function._ops_ns = torch.ops.batchnorm
    assert not called
    assert rm._version > v0[0] and rv._version > v0[1]


def _with_bad_channels(channels_last):
    x, w, b, _, _ = make((4, 5, 3, 3), "spatial", True, channels_last, dtype=torch.float32)
    x[1, 2, 0, 1] = float("inf")
    x[0, 4, 2, 2] = float("nan")
    return x, w, b


@pytest.mark.parametrize("fast", [True, False], ids=["eager", "custom_op"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_check_finite_through_batch_norm(monkeypatch, fast, channels_last):
    from batchnorm.torch import function

    monkeypatch.setattr(function, "EAGER_FAST_PATH", fast)
    x, w, b = _with_bad_channels(channels_last)
    rm, rv = torch.zeros(5), torch.ones(5)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2, 4$"):
        batch_norm(x.requires_grad_(), rm, rv, w, b, True, check_finite=True)
    # a call that raises leaves the running statistics as they were
    assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2, 4$"):
        batch_norm(x, rm, rv, w, b, False, check_finite=True)  # eval: the outputs
    with torch.no_grad(), pytest.raises(FloatingPointError, match=r"channel\(s\) 2, 4$"):
        batch_norm(x, None, None, w, b, True, check_finite=True)
    # unchecked, the same call returns NaN in those channels only
    y = batch_norm(x, rm, rv, w, b, True)
    assert torch.isfinite(y[:, [0, 1, 3]]).all() and not torch.isfinite(y[:, [2, 4]]).any()
    # finite input: the check changes nothing
    xf = torch.randn_like(x)  # in x's memory format
    rm1, rv1, rm2, rv2 = (torch.zeros(5), torch.ones(5), torch.zeros(5), torch.ones(5))
    assert torch.equal(batch_norm(xf, rm1, rv1, w, b, True, check_finite=True),
                       batch_norm(xf, rm2, rv2, w, b, True))
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    assert torch.equal(batch_norm(xf, rm1, rv1, w, b, False, check_finite=True),
                       batch_norm(xf, rm1, rv1, w, b, False))


def test_check_finite_on_modules():
    import copy
    import pickle

    from torch import nn

    import batchnorm.torch as bnt

    x, _, _ = _with_bad_channels(False)
    ours = bnt.BatchNorm2d(5, check_finite=True)
    assert ours.check_finite and ours.extra_repr().endswith(", check_finite=True")
    assert ours.state_dict().keys() == nn.BatchNorm2d(5).state_dict().keys()
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2, 4$"):
        ours(x)
    assert torch.equal(ours.running_mean, torch.zeros(5))
    ours.eval()
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2, 4$"):
        ours(x)
    assert pickle.loads(pickle.dumps(ours)).check_finite
    assert copy.deepcopy(ours).check_finite
    converted = bnt.convert_model(nn.Sequential(nn.BatchNorm2d(5)))[0]
    assert not converted.check_finite  # the default: unchecked, as torch.nn
    assert not torch.isfinite(converted(x)).all()
    converted.check_finite = True  # an attribute to switch at any time
    with pytest.raises(FloatingPointError):
        converted(x)
