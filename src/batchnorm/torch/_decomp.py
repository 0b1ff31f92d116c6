"""Batch norm in torch operations, for the compilers: what ``torch.compile`` traces.

A custom op is opaque to a compiler: under ``torch.compile`` with Inductor its input and
output are materialized in memory and the convolution, ReLU and residual add around it
cannot be fused with it, while ``torch.nn``'s batch norm is decomposed into reductions and
element-wise operations that Inductor fuses with its neighbours. So while a compiler traces
:func:`batchnorm.torch.batch_norm` (``torch.compile`` with any backend, ``torch.export``),
it traces these functions instead of the custom ops: the compiler generates and fuses the
kernels (C++ on CPUs, Triton on GPUs), and autograd differentiates the traced operations.
Our kernels run in eager mode, through the custom ops under ``torch.func`` transforms and
for tensor subclasses, and under a compiler for calls with ``check_finite=True`` (the
kernels name the non-finite channels).

They compute what contract §1-§4 say, in the statistics dtype (float32, or float64 for
float64 input): biased variance by ``var_mean`` (compilers reduce it with Welford's method,
free of cancellation), ``invstd = 0`` where ``var + eps == 0``, the running variance
unbiased, ``momentum`` replaced by ``1 / batches`` when a count is given, running
statistics returned in their own dtype for the caller to copy into the buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _shapes as S
from ._ops import layout_of, stats_dtype


@torch.compiler.assume_constant_result
def _reduce_axes(ndim: int, mode: str) -> tuple[int, ...]:
    # evaluated, not traced: the axes depend on the rank and the mode only
    return S.mode_axes(ndim, mode)[1]


def _geometry(x: Tensor, mode: str):
    """(reduced axes, broadcast shape, values per channel) of x in ``mode``, computed
    without :class:`~batchnorm._shapes.Layout`'s caches, which a compiler cannot trace."""
    axes = _reduce_axes(x.dim(), mode)
    shape = tuple(x.shape)
    return axes, S.broadcast_of(shape, axes), S.count_of(shape, axes)


def _invstd(var: Tensor, eps: float) -> Tensor:
    """1 / sqrt(var + eps), 0 where var + eps == 0 (contract §4), with a zero gradient
    there: the rsqrt is taken of 1 in those places, so no inf * 0 reaches autograd."""
    denom = var + eps
    zero = denom == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, denom).rsqrt())


def _updated(running: Tensor | None, batch: Tensor, momentum) -> Tensor | None:
    """(1 - momentum) * running + momentum * batch in the running statistic's dtype."""
    if running is None:
        return None
    r = running.to(batch.dtype)
    return (r + momentum * (batch - r)).to(running.dtype)


def forward_training(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                     eps: float, mode: str, batches: Tensor | None = None):
    """(y, mean, invstd, new_running_mean or None, new_running_var or None) with the
    batch's statistics; the arguments of ``batchnorm::forward_training``."""
    dims, bshape, m = _geometry(x, mode)
    if m == 1 and x.numel() > 0:
        S.check_training_count(layout_of(x, mode), x.shape)  # raises torch.nn's error
    sdt = stats_dtype(x.dtype)
    xs = x.to(sdt)
    if m == 0:  # an empty batch: saved statistics 0, running ones unchanged (contract §5)
        zeros = xs.new_zeros(tuple(n for a, n in enumerate(x.shape) if a not in dims))
        y = _normalized(xs, x.dtype, zeros, zeros, weight, bias, bshape)  # empty, in the graph
        return (y, zeros, zeros.clone(),
                None if running_mean is None else running_mean.clone(),
                None if running_var is None else running_var.clone())
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    invstd = _invstd(var, eps)
    y = _normalized(xs, x.dtype, mean, invstd, weight, bias, bshape)
    if batches is not None:  # a cumulative average, read in the graph
        momentum = 1.0 / batches.clamp(min=1).to(sdt)
    # m / (m - 1) for the unbiased variance; check_training_count refused m == 1 above
    unbiased = var * (m / (m - 1)) if m > 1 else var
    return (y, mean, invstd, _updated(running_mean, mean, momentum),
            _updated(running_var, unbiased, momentum))


def forward_inference(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                      var: Tensor, eps: float, mode: str) -> Tensor:
    """y with the given statistics; the arguments of ``batchnorm::forward_inference``."""
    sdt = stats_dtype(x.dtype)
    return _normalized(x.to(sdt), x.dtype, mean.to(sdt), _invstd(var.to(sdt), eps), weight,
                       bias, _geometry(x, mode)[1])


def _normalized(xs, dtype, mean, invstd, weight, bias, bshape) -> Tensor:
    """(x - mean) * invstd * weight + bias in the statistics dtype, returned in ``dtype``."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (xs - mean.view(bshape)) * scale.view(bshape)
    if bias is not None:
        y = y + bias.to(invstd.dtype).view(bshape)
    return y.to(dtype)
