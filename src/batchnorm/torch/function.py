"""``batch_norm`` for tensors, and the autograd formulas of the custom ops (first and second order).

First order: the forward ops' gradients are the ``batchnorm::backward`` op (the closed form of
contract §1, run by the backends). Second order: the gradient of that op is written below in
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

Two routes to the same implementations: under ``torch.compile`` / ``torch.export`` the custom
ops (which the compiler can trace); in eager mode plain ``autograd.Function`` classes that call
the implementations directly. The dispatcher, the custom ops' argument handling and their
functional copies of the running statistics cost more than the kernels on small inputs, and
eager mode needs none of them: running statistics are updated in place, and the backward calls
the backward implementation directly unless a graph of it is being built (double backward),
when it goes through the differentiable ``batchnorm::backward`` op. Both routes look up the
call's plan (:func:`batchnorm.torch._ops.plan`): the layout, views and every choice that
depends only on the tensors' metadata are made on the first call with that metadata and
cached; the argument checks torch makes (``_args.check``) run on every call, as torch's do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _compat
from . import _args, _decomp, _ops  # importing _ops registers torch.ops.batchnorm.*

_ops_ns = torch.ops.batchnorm

# Whether eager calls take the direct route (tests turn it off to compare the two routes).
EAGER_FAST_PATH = True

# Whether a compiler traces the torch operations of _decomp (which it fuses with the layers
# around) rather than the custom ops (our kernels, opaque to it); see batch_norm.
COMPILE_DECOMPOSITION = True


# ---- forward_training: (x, weight, bias, running_mean, running_var, momentum, eps, mode,
#      batches)
#      -> (y, mean, invstd, new_running_mean, new_running_var)

def _setup_training(ctx, inputs, output):
    x, weight, bias, _, _, _, _, mode, _, _ = inputs
    _, mean, invstd, new_mean, new_var = output
    # Statistics are outputs for reuse in backward and for the buffers; not differentiable.
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)
    ctx.mode = mode
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, mean, invstd)


def _backward_training(ctx, gy, *_stat_grads):
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = _ops_ns.backward(gy, x, weight, mean, invstd, True, ctx.mode)
    return _grads(ctx, weight, dx, dweight, dbias) + (None,) * 7


def _grads(ctx, weight, dx, dweight, dbias):
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        _ops._as(dweight, weight.dtype) if need[1] else None,
        _ops._as(dbias, ctx.bias_dtype) if need[2] else None,
    )


torch.library.register_autograd(
    "batchnorm::forward_training", _backward_training, setup_context=_setup_training
)


# ---- forward_inference: (x, weight, bias, mean, var, eps, mode) -> y

def _setup_inference(ctx, inputs, output):
    x, weight, bias, mean, var, eps, mode, _ = inputs
    ctx.mode = mode
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps


def _inference_stats(mean: Tensor, var: Tensor, eps: float, sdt: torch.dtype):
    """(mean, invstd) in the statistics dtype; invstd = 0 where var + eps == 0 (contract §4),
    matching the forward's convention."""
    denom = var.to(sdt) + eps
    invstd = torch.where(denom == 0, torch.zeros_like(denom), denom.rsqrt())
    return mean.to(sdt), invstd


def _backward_inference(ctx, gy):
    x, weight, mean, var = ctx.saved_tensors
    mean, invstd = _inference_stats(mean, var, ctx.eps, _ops.stats_dtype(x.dtype))
    dx, dweight, dbias = _ops_ns.backward(gy, x, weight, mean, invstd, False, ctx.mode)
    # Gradients with respect to the given statistics are not computed (they are buffers).
    return _grads(ctx, weight, dx, dweight, dbias) + (None,) * 5


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
    need = ctx.needs_input_grad
    gdy, gx, gw = second_order(dy, x, weight, mean, invstd, ctx.training, ctx.mode, u, a, c)
    return (
        gdy.to(dy.dtype) if need[0] else None,
        gx.to(x.dtype) if need[1] else None,
        gw.to(weight.dtype) if need[2] else None,
        None, None, None, None,
    )


def second_order(dy, x, weight, mean, invstd, training: bool, mode: str, u, a, c):
    """(d/d dy, d/d x, d/d weight) of ``sum(u * dx) + a . dweight + c . dbias``, the gradient
    of the backward (the formulas of the module notes); ``dy`` is what the backward read
    (the fused forms pass g = dy * act'). Shapes: x's, x's, ``param_shape``."""
    layout = _ops.layout_of(x, mode)
    dims, bshape, m = layout.reduce_axes, layout.broadcast_shape, layout.count
    s, mu = invstd.view(bshape), mean.view(bshape)
    g = weight.view(bshape) if weight is not None else torch.ones_like(s)
    a, c = a.view(bshape), c.view(bshape)
    xhat = (x - mu) * s

    def total(t):
        return t.sum(dims, keepdim=True)

    if training:
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
    return gdy, gx, gw.view(layout.param_shape)


torch.library.register_autograd(
    "batchnorm::backward", _backward_backward, setup_context=_setup_backward
)


# ---- the eager route

def _eager_backward(ctx, gy, x, weight, mean, invstd, training: bool):
    if torch.is_grad_enabled():  # create_graph=True: the op carries the second derivative
        mean, invstd = _ops._tensor(mean, x), _ops._tensor(invstd, x)
        return _ops_ns.backward(gy, x, weight, mean, invstd, training, ctx.plan.layout.mode)
    return _ops.grad(ctx.plan, gy, x, weight, mean, invstd, training)


class _EagerTraining(torch.autograd.Function):
    """forward_training without the dispatcher; running statistics updated in place.

    Inputs are x, weight, bias and one tuple of everything else (the plan, the running
    statistics, momentum, eps, batches, check_finite): the running statistics need no
    gradient, and every argument apply() sees costs time on each call.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        pl, running_mean, running_var, momentum, eps, batches, check_finite = call
        y, mean, invstd = _ops.train(pl, x, weight, bias, running_mean, running_var,
                                     momentum, eps, batches, check_finite)
        ctx.plan, ctx.stats = pl, (mean, invstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors  # also checks neither was modified in place since
        dx, dweight, dbias = _eager_backward(ctx, gy, x, weight, *ctx.stats, True)
        return (*_grads(ctx, weight, dx, dweight, dbias), None)


class _EagerInference(torch.autograd.Function):
    """forward_inference without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, call):
        pl, eps, check_finite = call
        y = _ops.infer(pl, x, weight, bias, mean, var, eps, check_finite)
        ctx.plan, ctx.eps = pl, eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, mean, var)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, var = ctx.saved_tensors
        mean, invstd = _inference_stats(mean, var, ctx.eps, ctx.plan.sdt)
        dx, dweight, dbias = _eager_backward(ctx, gy, x, weight, mean, invstd, False)
        return (*_grads(ctx, weight, dx, dweight, dbias), None, None, None)


# apply() without its Python wrapper (see _compat.direct_apply); _eager() rules out the
# torch.func transforms that wrapper exists for.
_apply_training = _compat.direct_apply(_EagerTraining)
_apply_inference = _compat.direct_apply(_EagerInference)
_functorch_active = _compat.functorch_transforms_active()


def _eager(x: Tensor) -> bool:
    """Whether this call may bypass the custom ops: not while a compiler or exporter traces
    it, not for tensor subclasses (fake, functional) or meta tensors (the ops' fake kernels
    give their shapes), not under torch.func."""
    return (EAGER_FAST_PATH and type(x) is Tensor and not x.is_meta
            and not torch.compiler.is_compiling() and not _functorch_active())


def _requires_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, mode: str = "spatial",
               batches: Tensor | None = None, check_finite: bool = False,
               activation: str | None = None, negative_slope: float = 0.01,
               residual: Tensor | None = None, inplace: bool = False) -> Tensor:
    """y = weight * (input - mean) / sqrt(var + eps) + bias, as ``torch.nn.functional.batch_norm``;
    with the fused forms, ``y = act(that + residual)`` (contract §8).

    In training the batch's statistics normalize and ``running_mean`` / ``running_var`` (if
    given) are updated in place with ``momentum`` (the variance unbiased); otherwise the running
    statistics normalize. Differentiable twice with respect to input, weight and bias.

    Args:
        input: [N, C, *spatial] tensor, contiguous or channels-last (kept in the output).
        running_mean, running_var: [param_shape] or None (required when not training).
        weight, bias: [param_shape] or None.
        training: use batch statistics (and update the running ones).
        momentum: factor of the running-average update; any real number, as in torch.
        eps: added to the variance; > 0 in training, >= 0 otherwise, as in torch.
        mode: ``"spatial"`` (statistics per channel, ``param_shape = (C,)``),
            ``"spatial_persistent"`` (the same result) or ``"per_activation"``
            (statistics per feature over the batch axis only, ``param_shape = input.shape[1:]``).
        batches: optional one-element tensor counting the batches seen, this one included;
            replaces ``momentum`` by ``1 / batches`` (``torch.nn``'s ``momentum=None``) without
            reading the count in Python, which would break a compiled graph.
        check_finite: raise FloatingPointError naming the channels whose batch statistics or
            outputs are not finite (in training, at no extra pass over the data; in inference,
            one extra read of the output); the running statistics are then left unchanged.
        activation: None, ``"relu"`` or ``"leaky_relu"``, applied after the affine transform
            and the residual add.
        negative_slope: leaky_relu's slope for negative inputs, >= 0 (backward reads the
            sign of the input of the activation off y).
        residual: optional tensor of the input's shape, dtype and device, added before the
            activation (the shortcut of a residual block); differentiable.
        inplace: the memory-saving mode: y is written over ``input`` (which is returned, and
            marked modified as by torch's in-place operations) and backward keeps y alone,
            recovering the normalized input from it. Needs no activation or leaky_relu with a
            slope > 0, and no residual; ``|weight|`` is clamped to at least 1e-5
            (``GAMMA_MIN``) in the forward, the gradient reaching ``weight`` unclamped.
            Refused, as by torch's in-place operations, for a leaf that requires grad.

    What backward keeps, per element of the input: the input alone (plain), the input and y
    (with an activation), y alone (``inplace``); see :mod:`batchnorm.torch.fused`.
    """
    weight, bias, momentum, eps = _args.check(
        input, running_mean, running_var, weight, bias, training, momentum, eps, mode)
    if activation is not None or residual is not None or inplace is not False:
        return _fused_call(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, mode, batches, check_finite, activation, negative_slope,
                           residual, inplace)
    if input.dim() == 1:  # an empty rank-1 input (the only one check lets through)
        return input.clone()
    if _eager(input):
        # the layout, views and kernel choice for this metadata: computed once, then cached
        if training:
            pl = _ops.plan(input, mode, "training", weight, bias, running_mean, running_var)
            call = (pl, running_mean, running_var, momentum, eps, batches, check_finite)
            if torch.is_grad_enabled() and (input.requires_grad or _requires_grad(weight)
                                            or _requires_grad(bias)):
                return _apply_training(input, weight, bias, call)
            return _ops.train(pl, input, weight, bias, *call[1:])[0]
        pl = _ops.plan(input, mode, "inference", weight, bias, running_mean, running_var)
        if torch.is_grad_enabled() and (input.requires_grad or _requires_grad(weight)
                                        or _requires_grad(bias)):
            return _apply_inference(input, weight, bias, running_mean, running_var,
                                    (pl, eps, check_finite))
        return _ops.infer(pl, input, weight, bias, running_mean, running_var, eps,
                          check_finite)
    # A compiler traces torch operations it can fuse with the layers around (see _decomp);
    # otherwise (and for check_finite, which the kernels answer) the custom ops.
    decompose = COMPILE_DECOMPOSITION and not check_finite and torch.compiler.is_compiling()
    if training:
        if decompose:
            y, _, _, new_mean, new_var = _decomp.forward_training(
                input, weight, bias, running_mean, running_var, momentum, eps, mode, batches)
        else:
            y, _, _, new_mean, new_var = _ops_ns.forward_training(
                input, weight, bias, running_mean, running_var, momentum, eps, mode,
                batches, check_finite)
        with torch.no_grad():  # the in-place update torch.nn.functional.batch_norm makes
            if running_mean is not None:
                running_mean.copy_(new_mean)
            if running_var is not None:
                running_var.copy_(new_var)
        return y
    if decompose:
        return _decomp.forward_inference(input, weight, bias, running_mean, running_var,
                                         eps, mode)
    return _ops_ns.forward_inference(input, weight, bias, running_mean, running_var,
                                     eps, mode, check_finite)


def _fused_call(input, running_mean, running_var, weight, bias, training, momentum, eps, mode,
                batches, check_finite, activation, negative_slope, residual, inplace):
    """batch_norm's fused forms: their own arguments checked, then batchnorm.torch.fused."""
    epilogue = _args.epilogue(activation, negative_slope)
    if residual is not None:
        _args.check_residual(residual, input)
    if inplace is not True and inplace is not False:
        raise _args.ArgumentTypeError(f"`inplace` must be a bool, got {type(inplace).__name__}")
    if inplace:
        _args.check_inplace(input, epilogue, residual,
                            (weight, bias, running_mean, running_var))
    if input.dim() == 1:  # an empty rank-1 input
        return input if inplace else input.clone()
    return _fused.batch_norm(input, running_mean, running_var, weight, bias, training,
                             momentum, eps, mode, batches, check_finite, epilogue, residual,
                             inplace)


from . import fused as _fused  # noqa: E402  (it builds on this module's formulas)
