"""The per-call plan of batchnorm.torch: cached per tensor metadata, never reused across it.

A plan holds what a call decides from its tensors' shapes, strides, dtypes and devices (the
validated layout, the backend, the CPU kernels' views). These tests alternate tensors that
differ in one of those and check each call against torch.nn, so a plan reused where it
should not be would show as a wrong result, not only as a wrong object.
"""

import pytest
import torch
import torch.nn.functional as F

from batchnorm.backends import cpu
from batchnorm.torch import _ops, batch_norm
from conftest import assert_close


def _tensors(shape, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=torch.float64).add(0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b


def _check_against_torch(x, w, b, training=True):
    """Forward, running statistics and backward of ours against F.batch_norm."""
    dtype = x.dtype
    rm, rv = torch.zeros(x.shape[1], dtype=w.dtype), torch.ones(x.shape[1], dtype=w.dtype)
    rm_t, rv_t = rm.clone(), rv.clone()
    # detach, not clone: x keeps its strides
    xo, xt = x.detach().requires_grad_(), x.detach().requires_grad_()
    wo, wt = w.clone().requires_grad_(), w.clone().requires_grad_()
    y = batch_norm(xo, rm, rv, wo, b, training, 0.1, 1e-5)
    yt = F.batch_norm(xt, rm_t, rv_t, wt, b, training, 0.1, 1e-5)
    assert y.stride() == torch.empty_like(x).stride()
    assert_close(y, yt, dtype, name="y")
    assert_close(rm, rm_t, dtype, name="running_mean")
    assert_close(rv, rv_t, dtype, name="running_var")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    y.backward(dy)
    yt.backward(dy)
    assert_close(xo.grad, xt.grad, dtype, name="dx")
    assert_close(wo.grad, wt.grad, dtype, name="dweight")


def _plan(x, w, b):
    return _ops.plan(x, "spatial", "training", w, b, None, None)


def test_a_plan_is_reused_for_the_same_metadata():
    x, w, b = _tensors((4, 3, 5, 5))
    x2, w2, b2 = _tensors((4, 3, 5, 5), seed=1)
    assert _plan(x, w, b) is _plan(x2, w2, b2)


@pytest.mark.parametrize("other", ["channels_last", "float64", "sliced", "shape", "meta"])
def test_a_plan_is_not_reused_across_strides_dtype_or_device(other):
    x, w, b = _tensors((4, 3, 6, 5))
    first = _plan(x, w, b)
    if other == "channels_last":
        y, wy, by = _tensors((4, 3, 6, 5), channels_last=True, seed=1)
    elif other == "float64":
        y, wy, by = _tensors((4, 3, 6, 5), dtype=torch.float64, seed=1)
    elif other == "sliced":  # same shape, other strides: every other column of a wider x
        wide, wy, by = _tensors((4, 3, 6, 10), seed=1)
        y = wide[..., ::2]
    elif other == "shape":
        y, wy, by = _tensors((4, 3, 5, 6), seed=1)
    else:
        y, wy, by = (t.to("meta") for t in (x, w, b))
    second = _plan(y, wy, by)
    assert second is not first
    if other == "meta":
        assert first.direct and not second.direct
        return
    # alternate the two kinds of tensor: each call still matches torch.nn
    for t, wt, bt in ((x, w, b), (y, wy, by), (x, w, b), (y, wy, by)):
        _check_against_torch(t, wt, bt)
        _check_against_torch(t, wt, bt, training=False)


def test_a_plan_is_not_reused_for_other_parameters():
    # the plan also records the per-channel tensors' metadata: a weight of another shape or
    # device after a valid call is still refused, and x and weights of another dtype still
    # work
    x, w, b = _tensors((4, 3, 5))
    _check_against_torch(x, w, b)
    with pytest.raises(ValueError, match="`weight` must have shape"):
        batch_norm(x, None, None, torch.ones(4), b, True)
    with pytest.raises(ValueError, match="is on meta"):
        batch_norm(x, None, None, w.to("meta"), b, True)
    y = batch_norm(x.double(), None, None, w.double(), b.double(), True)
    assert y.dtype == torch.float64
    assert_close(y, F.batch_norm(x.double(), None, None, w.double(), b.double(), True),
                 torch.float64, name="y")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_tensors_take_the_direct_route(layout, dtype):
    x, w, b = _tensors((4, 3, 5, 5), dtype=dtype, channels_last=layout == "channels_last")
    pl = _plan(x, w, b)
    assert pl.direct and isinstance(pl.cpu, cpu.Plan) and pl.cpu.direct
    assert pl.cpu.rows == (layout == "channels_last")


@pytest.mark.parametrize("case", ["float16", "bfloat16", "float32_weight", "sliced"])
def test_other_tensors_take_the_general_route(case):
    x, w, b = _tensors((4, 3, 5, 6))
    if case in ("float16", "bfloat16"):
        x, w, b = (t.to(getattr(torch, case)) for t in (x, w, b))
    elif case == "float32_weight":  # bfloat16 input with float32 parameters, as torch allows
        x = x.to(torch.bfloat16)
    else:
        x = _tensors((4, 3, 5, 12))[0][..., ::2]
    assert not _plan(x, w, b).direct
    y = batch_norm(x, None, None, w, b, True)
    want = F.batch_norm(x.float(), None, None, w.float(), b.float(), True)
    assert_close(y, want, x.dtype, name="y")


def test_gradient_in_another_memory_order():
    # channels-last x whose gradient arrives NCHW (as after an average pool): the direct
    # plan does not take dy, the CPU backend reorders it
    x, w, b = _tensors((3, 20, 5, 7), channels_last=True)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert dy.is_contiguous() and not x.is_contiguous()
    batch_norm(xo, None, None, w, b, True).backward(dy)
    F.batch_norm(xt, None, None, w, b, True).backward(dy)
    assert xo.grad.is_contiguous(memory_format=torch.channels_last)  # x's order
    assert_close(xo.grad, xt.grad, torch.float32, name="dx")


def test_the_torch_statistics_dtype_is_the_numpy_rule():
    # one rule (contract §4), written for NumPy in _shapes and for torch dtypes in _ops
    import numpy as np

    from batchnorm import _shapes

    for t, n in ((torch.float64, np.float64), (torch.float32, np.float32),
                 (torch.float16, np.float16)):
        assert _ops.stats_dtype(t) == getattr(torch, _shapes.stats_dtype(n).name)
    assert _ops.stats_dtype(torch.bfloat16) == torch.float32  # NumPy has no bfloat16
