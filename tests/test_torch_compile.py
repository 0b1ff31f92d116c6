"""torch.compile(fullgraph=True) through the custom ops: no graph breaks, same numbers as eager.

Compiling on a CPU is slow, so the network is tiny and the cheap "aot_eager" backend checks the
training step (Dynamo capture, fake kernels, AOT autograd); Inductor compiles the eval forward.
"""

import copy

import pytest
import torch
from torch import nn

import batchnorm.torch as bnt
from batchnorm.cli.networks import build_net


def assert_close(a, b, what, atol=2e-5, rtol=1e-4):
    diff = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max diff {diff:.3g}"


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = bnt.convert_model(build_net(width=4, blocks=1))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(6, 3, 6, 6, generator=g)
        outs = []
        for m in (eager, compiled):
            for p in m.parameters():
                p.grad = None
            out = m(x)
            out.square().sum().backward()
            outs.append(out)
        assert_close(outs[1], outs[0], f"output at step {step}")
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters(), strict=True):
            assert_close(pc.grad, pe.grad, f"{name}.grad at step {step}")
        for (name, be), bc in zip(eager.named_buffers(), model.buffers(), strict=True):
            assert_close(bc.double(), be.double(), f"{name} at step {step}")


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
