"""``batch_norm`` for tensors, and the autograd formulas of the custom ops (first and second order).

First order: the forward ops' gradients are the ``batchnorm::backward`` op (the closed form of
SPEC section 1, run by the backends). Second order: the gradient of that op is written below in
torch operations from the same closed form, so ``gradgradcheck`` and double-backward losses
(gradient penalties) work. Let ``g`` = weight, ``s`` = invstd, ``xhat = (x - mu) * s``,
sums over the reduced axes, ``M`` values per channel, ``T`` = 1 in training and 0 in
inference, and upstream gradients ``u`` (of dx), ``a`` (of dweight), ``c`` (of dbias). Then

    d/d dy   = g s (u - T (sum(u) + xhat sum(u xhat)) / M) + a xhat + c
    d/d xhat = -T g s / M (u sum(dy xhat) + dy sum(u xhat)) + a dy
    d/d g    = s sum(u (dy - T (sum(dy) + xhat sum(dy xhat)) / M))
    d/d s    = g sum(u (dy - ...)) + sum(d/d xhat * (x - mu))      (s also inside xhat)

and in training the saved mu and s are themselves functions of x
(d mu/dx = 1/M, d s/dx = -s^2 xhat / M), which the x gradient includes. The saved statistics
are treated as constants beyond that, so third derivatives are not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops  # importing it registers torch.ops.batchnorm.*
from ._ops import param_shape

_ops_ns = torch.ops.batchnorm


def _reduce_dims(x: Tensor, mode: str) -> tuple[tuple[int, ...], list[int]]:
    """(axes the statistics reduce over, shape that per-channel tensors broadcast as)."""
    if mode == "per_activation":
        return (0,), [1, *x.shape[1:]]
    return (0, *range(2, x.dim())), [1, x.shape[1]] + [1] * (x.dim() - 2)


def _count(x: Tensor, mode: str) -> int:
    c = 1
    for d in _reduce_dims(x, mode)[0]:
        c *= x.shape[d]
    return c


# ---- forward_training: (x, weight, bias, running_mean, running_var, momentum, eps, mode,
#      batches)
#      -> (y, mean, invstd, new_running_mean, new_running_var)

def _setup_training(ctx, inputs, output):
    x, weight, bias, _, _, _, _, mode, _ = inputs
    _, mean, invstd, new_mean, new_var = output
    # Statistics are outputs for reuse in backward and for the buffers; not differentiable.
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)
    ctx.mode = mode
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, mean, invstd)


def _backward_training(ctx, gy, *_stat_grads):
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = _ops_ns.backward(gy, x, weight, mean, invstd, True, ctx.mode)
    return _grads(ctx, weight, dx, dweight, dbias) + (None,) * 6


def _grads(ctx, weight, dx, dweight, dbias):
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dweight.to(weight.dtype) if need[1] else None,
        dbias.to(ctx.bias_dtype) if need[2] else None,
    )


torch.library.register_autograd(
    "batchnorm::forward_training", _backward_training, setup_context=_setup_training
)


# ---- forward_inference: (x, weight, bias, mean, var, eps, mode) -> y

def _setup_inference(ctx, inputs, output):
    x, weight, bias, mean, var, eps, mode = inputs
    ctx.mode = mode
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps


def _backward_inference(ctx, gy):
    x, weight, mean, var = ctx.saved_tensors
    sdt = _ops.stats_dtype(x.dtype)
    denom = var.to(sdt) + ctx.eps
    # invstd = 0 where var + eps == 0 (SPEC 4), matching the forward's convention.
    invstd = torch.where(denom == 0, torch.zeros_like(denom), denom.rsqrt())
    dx, dweight, dbias = _ops_ns.backward(gy, x, weight, mean.to(sdt), invstd, False, ctx.mode)
    # Gradients with respect to the given statistics are not computed (they are buffers).
    return _grads(ctx, weight, dx, dweight, dbias) + (None,) * 4


torch.library.register_autograd(
    "batchnorm::forward_inference", _backward_inference, setup_context=_setup_inference
)


# ---- backward: (dy, x, weight, mean, invstd, training, mode) -> (dx, dweight, dbias)

def _setup_backward(ctx, inputs, output):
    dy, x, weight, mean, invstd, training, mode = inputs
    ctx.training, ctx.mode = training, mode
    ctx.save_for_backward(dy, x, weight, mean, invstd)


def _backward_backward(ctx, u, a, c):
    dy, x, weight, mean, invstd = ctx.saved_tensors
    dims, bshape = _reduce_dims(x, ctx.mode)
    m = _count(x, ctx.mode)
    need = ctx.needs_input_grad
    s, mu = invstd.view(bshape), mean.view(bshape)
    g = weight.view(bshape) if weight is not None else torch.ones_like(s)
    a, c = a.view(bshape), c.view(bshape)
    xhat = (x - mu) * s

    def total(t):
        return t.sum(dims, keepdim=True)

    if ctx.training:
        sum_dy, sum_dy_xhat = total(dy), total(dy * xhat)
        sum_u, sum_u_xhat = total(u), total(u * xhat)
        gdy = g * s * (u - (sum_u + xhat * sum_u_xhat) / m) + a * xhat + c
        gxhat = -(g * s / m) * (u * sum_dy_xhat + dy * sum_u_xhat) + a * dy
        r = total(u * (dy - (sum_dy + xhat * sum_dy_xhat) / m))  # dx = g s (...), so d/dg = s r
        gw = s * r
        # x -> xhat directly, and through mu (dmu/dx = 1/M) and s (ds/dx = -s^2 xhat / M).
        g_mu = -s * total(gxhat)
        g_s = g * r + total(gxhat * (x - mu))
        gx = s * gxhat + g_mu / m - g_s * s * s * xhat / m
    else:
        gdy = g * s * u + a * xhat + c
        gx = s * a * dy
        gw = total(u * s * dy)
    return (
        gdy.to(dy.dtype) if need[0] else None,
        gx.to(x.dtype) if need[1] else None,
        gw.view(param_shape(x, ctx.mode)).to(weight.dtype) if need[2] else None,
        None, None, None, None,
    )


torch.library.register_autograd(
    "batchnorm::backward", _backward_backward, setup_context=_setup_backward
)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, mode: str = "spatial",
               batches: Tensor | None = None) -> Tensor:
    """y = weight * (input - mean) / sqrt(var + eps) + bias, as ``torch.nn.functional.batch_norm``.

    In training the batch's statistics normalize and ``running_mean`` / ``running_var`` (if
    given) are updated in place with ``momentum`` (the variance unbiased); otherwise the running
    statistics normalize. Differentiable twice with respect to input, weight and bias.

    Args:
        input: [N, C, *spatial] tensor, contiguous or channels-last (kept in the output).
        running_mean, running_var: [param_shape] or None (required when not training).
        weight, bias: [param_shape] or None.
        training: use batch statistics (and update the running ones).
        momentum: factor of the running-average update, in [0, 1].
        eps: added to the variance.
        mode: ``"spatial"`` (statistics per channel, ``param_shape = (C,)``),
            ``"spatial_persistent"`` (the same result) or ``"per_activation"``
            (statistics per feature over the batch axis only, ``param_shape = input.shape[1:]``).
        batches: optional one-element tensor counting the batches seen, this one included;
            replaces ``momentum`` by ``1 / batches`` (``torch.nn``'s ``momentum=None``) without
            reading the count in Python, which would break a compiled graph.
    """
    if training:
        size = input.shape
        per_channel = size[0] if mode == "per_activation" else size.numel() // max(size[1], 1)
        if per_channel == 1 and size.numel() > 0:
            # torch.nn.functional.batch_norm's own message, so callers see the same error.
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
        y, _, _, new_mean, new_var = _ops_ns.forward_training(
            input, weight, bias, running_mean, running_var, float(momentum), float(eps), mode,
            batches,
        )
        with torch.no_grad():  # the in-place update torch.nn.functional.batch_norm makes
            if running_mean is not None:
                running_mean.copy_(new_mean)
            if running_var is not None:
                running_var.copy_(new_var)
        return y
    if running_mean is None or running_var is None:
        # torch.nn.functional.batch_norm's error, so code written against it keeps working
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    return _ops_ns.forward_inference(
        input, weight, bias, running_mean, running_var, float(eps), mode
    )
