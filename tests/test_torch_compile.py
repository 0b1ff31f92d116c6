"""torch.compile(fullgraph=True) of batchnorm.torch: no graph breaks, the numbers of eager mode.

Under a compiler batch_norm traces torch operations (batchnorm.torch._decomp) that the
compiler fuses with the layers around; the custom ops and their fake kernels are traced for
check_finite calls (and serve torch.func). Compiling on a CPU is slow, so the networks are
tiny and the cheap "aot_eager" backend checks the training step (Dynamo capture, AOT
autograd); Inductor compiles a few small functions.
"""

import copy

import pytest
import torch
from torch import nn

import batchnorm.torch as bnt
from batchnorm.cli.networks import build_net
from batchnorm.torch import _decomp, _ops
from conftest import assert_close as close_to


def assert_close(a, b, what, atol=2e-5, rtol=1e-4):
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max diff {diff:.3g}"


def _close_to_exact(got, exact, what, rtol=1e-4, atol=1e-4):
    """float32 results against float64 ones, relative to the tensor's largest magnitude: the
    compiled step and the eager one are different float32 computations (the compiler's
    decomposition and our kernels), each within float32 rounding of the exact values.
    ``atol`` covers gradients that are 0 exactly (a bias before a batch norm) and in float32
    the rounding of a sum of terms of order 1."""
    err = (got.double() - exact).abs().max().item()
    bound = rtol * exact.abs().max().item() + atol
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = bnt.convert_model(build_net(width=4, blocks=1))
    model = copy.deepcopy(eager)
    exact = copy.deepcopy(eager).double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(6, 3, 6, 6, generator=g)
        outs = []
        for m, xm in ((eager, x), (compiled, x), (exact, x.double())):
            for p in m.parameters():
                p.grad = None
            out = m(xm)
            out.square().sum().backward()
            outs.append(out)
        for which, out, m in (("eager", outs[0], eager), ("compiled", outs[1], model)):
            _close_to_exact(out, outs[2], f"{which} output at step {step}")
            for (name, p), pe in zip(m.named_parameters(), exact.parameters(), strict=True):
                _close_to_exact(p.grad, pe.grad, f"{which} {name}.grad at step {step}")
            for (name, b), be in zip(m.named_buffers(), exact.buffers(), strict=True):
                _close_to_exact(b, be.double(), f"{which} {name} at step {step}")


def test_inductor_eval_forward_matches_eager():
    torch._dynamo.reset()
    bn = bnt.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    compiled = torch.compile(lambda x: bn(x).relu(), fullgraph=True)  # Inductor, the default
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        assert_close(compiled(x), bn(x).relu(), "eval output")


def test_cumulative_momentum_compiles_without_reading_the_count():
    torch._dynamo.reset()
    ours, theirs = bnt.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    for _ in range(3):
        x = torch.randn(5, 3) * 2 + 1
        assert_close(compiled(x), theirs(x), "output")
    assert int(ours.num_batches_tracked) == 3
    assert_close(ours.running_mean, theirs.running_mean, "running_mean")
    assert_close(ours.running_var, theirs.running_var, "running_var")


def test_double_backward_through_compiled_function():
    torch._dynamo.reset()

    def f(x, w, b):
        return bnt.batch_norm(x, None, None, w, b, True).tanh().sum()

    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(f(x, w, b), x, create_graph=True)
    gx.square().sum().backward()
    expected = w.grad.clone()
    w.grad = None
    fc = torch.compile(f, fullgraph=True, backend="eager")
    (gx,) = torch.autograd.grad(fc(x, w, b), x, create_graph=True)
    gx.square().sum().backward()
    assert_close(w.grad, expected, "second-order grad of weight", atol=1e-10, rtol=1e-10)


def test_argument_checks_trace_with_fullgraph():
    """batch_norm's argument checks run under Dynamo too: the exact path (a (1, C) weight)
    and meta tensors compile without a graph break, and a refused call still raises."""
    torch._dynamo.reset()

    def f(x, w, rm, rv):
        return bnt.batch_norm(x, rm, rv, w, None, True, 0.1, 1e-5)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x, w = torch.randn(4, 3, 5), torch.rand(1, 3) + 0.5
    rm, rv = torch.zeros(3), torch.ones(3)
    assert_close(compiled(x, w, rm.clone(), rv.clone()), f(x, w, rm.clone(), rv.clone()), "y")
    meta = [t.to("meta") for t in (x, w, rm, rv)]
    assert compiled(*meta).device.type == "meta"
    # fullgraph Dynamo reports an exception raised while tracing as Unsupported, quoting it
    with pytest.raises(Exception, match="must be torch.float32"):  # noqa: B017
        compiled(x, w, rm.double(), rv.double())
# ---- Under a compiler batch_norm traces the torch operations of batchnorm.torch._decomp,
#      which the compiler fuses; our kernels run eagerly. The decompositions are checked
#      against the kernels directly, on a grid, without compiling; compiling checks which
#      one runs.

OPS = torch.ops.batchnorm
GRID = [  # (shape, mode, channels_last)
    ((5, 3, 4, 2), "spatial", False), ((5, 3, 4, 2), "spatial", True),
    ((6, 4), "spatial", False), ((3, 2, 7), "per_activation", False),
    ((4, 3, 2, 2, 3), "spatial_persistent", False),
]


def _grid_tensors(shape, mode, channels_last, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ps = _ops.param_shape(x, mode)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(ps, generator=g, dtype=pdt) + 0.5 if affine else None
    b = torch.randn(ps, generator=g, dtype=pdt) if affine else None
    rm = torch.randn(ps, generator=g, dtype=pdt)
    rv = torch.rand(ps, generator=g, dtype=pdt) + 0.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, rm, rv, dy


def _with_grads(fn, x, w, b, dy):
    """fn's outputs, and the gradients of <fn's y, dy> with respect to x, w and b."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    y = out[0] if isinstance(out, tuple) else out
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, dy)
    return out, grads


@pytest.mark.parametrize("shape, mode, channels_last", GRID)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_decompositions_match_the_kernels(shape, mode, channels_last, dtype, affine):
    x, w, b, rm, rv, dy = _grid_tensors(shape, mode, channels_last, dtype, affine)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    for running, count in (((rm, rv), None), ((rm, rv), torch.tensor(3)), ((None, None), None)):
        got, got_g = _with_grads(lambda x, w, b, r=running, n=count: _decomp.forward_training(
            x, w, b, *r, 0.3, 1e-4, mode, n), x, w, b, dy)
        want, want_g = _with_grads(lambda x, w, b, r=running, n=count: OPS.forward_training(
            x, w, b, *r, 0.3, 1e-4, mode, n), x, w, b, dy)
        names = ("y", "mean", "invstd", "new_mean", "new_var")
        for name, g_, w_ in zip(names, got, want, strict=True):
            if g_ is None:  # no running statistic: the op returns an empty stand-in
                assert w_.numel() == 0, name
                continue
            assert g_.dtype == w_.dtype and g_.shape == w_.shape, name
            close_to(g_, w_, dtype if name == "y" else sdt, name=name)
        assert got[0].stride() == want[0].stride()  # the output keeps x's memory format
        for name, g_, w_ in zip(("dx", "dweight", "dbias")[:len(got_g)], got_g, want_g,
                                strict=True):
            assert g_.dtype == w_.dtype, name
            close_to(g_, w_, dtype, name=name)
    got, got_g = _with_grads(lambda x, w, b: _decomp.forward_inference(
        x, w, b, rm, rv, 1e-4, mode), x, w, b, dy)
    want, want_g = _with_grads(lambda x, w, b: OPS.forward_inference(
        x, w, b, rm, rv, 1e-4, mode), x, w, b, dy)
    close_to(got, want, dtype, name="eval y")
    for name, g_, w_ in zip(("dx", "dweight", "dbias")[:len(got_g)], got_g, want_g,
                            strict=True):
        close_to(g_, w_, dtype, name=f"eval {name}")


def test_decompositions_keep_the_contract_edge_cases():
    # a constant channel with eps = 0: invstd 0, output beta, dx 0 (contract §4)
    x = torch.ones(4, 2, 3)
    x[:, 1] = torch.arange(12.0).reshape(4, 3)
    w, b = torch.tensor([2.0, 1.0]), torch.tensor([0.5, -1.0])
    xg = x.clone().requires_grad_()
    y, _, invstd, _, _ = _decomp.forward_training(xg, w, b, None, None, 0.1, 0.0, "spatial")
    assert invstd[0] == 0 and torch.equal(y[:, 0].detach(), torch.full((4, 3), 0.5))
    (dx,) = torch.autograd.grad(y, xg, torch.randn(4, 2, 3))
    assert torch.equal(dx[:, 0], torch.zeros(4, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _decomp.forward_training(torch.ones(1, 3), None, None, None, None, 0.1, 1e-5,
                                 "spatial")


def _count_kernel_calls(monkeypatch):
    calls = []
    for name in ("training_impl", "inference_impl", "backward_impl"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _real=real, _n=name, **k: (
            calls.append(_n), _real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compilers_trace_the_decomposition(monkeypatch, backend):
    torch._dynamo.reset()
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    ours, theirs = bnt.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = torch.compile(lambda t: ours(t).relu(), fullgraph=True, backend=backend)(xo)
    out.square().sum().backward()  # the backward compiled with the forward
    ref = theirs(xt).relu()
    ref.square().sum().backward()
    assert calls == []  # no kernel ran: the compiler's own code did
    assert_close(out, ref, "y")
    assert_close(xo.grad, xt.grad, "dx")
    assert_close(ours.weight.grad, theirs.weight.grad, "dweight")
    assert_close(ours.running_var, theirs.running_var, "running_var")


def test_check_finite_under_a_compiler_runs_the_kernels(monkeypatch):
    torch._dynamo.reset()
    calls = _count_kernel_calls(monkeypatch)
    bn = bnt.BatchNorm2d(3, check_finite=True)
    f = torch.compile(lambda t: bn(t).relu(), fullgraph=True)
    x = torch.randn(4, 3, 5, 5)
    assert_close(f(x), nn.functional.relu(nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, True)), "y")
    assert "training_impl" in calls
    x[2, 1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1$"):
        f(x)


def test_compiled_empty_batch_leaves_running_statistics_unchanged():
    """An empty training batch under a compiler: empty output, running statistics untouched,
    zero parameter gradients (contract §5), as in eager mode."""
    torch._dynamo.reset()

    def f(x, w, b, rm, rv):
        return bnt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    rm, rv = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    y = compiled(x, w, b, rm, rv)
    assert y.shape == x.shape
    assert torch.equal(rm, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(rv, torch.tensor([4.0, 5.0, 6.0]))
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert torch.equal(gw, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))
