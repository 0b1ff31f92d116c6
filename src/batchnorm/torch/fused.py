"""The fused forms of ``batch_norm`` (contract §8): ``y = act(bn(x) + residual)``, and the
memory-saving mode, with their autograd formulas (first and second order).

What backward keeps (bytes per element of the input, ``itemsize`` = the input dtype's size):

- out of place: x, and y when there is an activation (its sign gives act'): ``2 * itemsize``
  (``itemsize`` without one). The layer after usually keeps y as its own input, so y costs
  nothing more; the residual is not kept (dz = g needs only dy and y).
- the memory-saving mode (``inplace=True``): y alone, written over x: ``itemsize``. xhat is
  recovered as ``(act^-1(y) - bias) / weight``, which needs ``|weight| >= GAMMA_MIN``: the
  forward clamps ``|weight|`` to it (the sign kept, 0 counted as positive), and the gradient
  reaches the weight as if it were not clamped (In-Place ABN's rule).

Plus per-channel tensors (weight, bias, the saved mean and invstd) in both.

First order: ``g = dy * act'(pre)`` with act' read off y's sign (1 where y > 0, the slope
elsewhere); the backends compute dx, dweight, dbias from g by §1's closed form, and dz = g.

Second order, out of place: act' is piecewise constant, so its own derivative is 0 almost
everywhere and the gradient of the backward is plain batch norm's
(:func:`batchnorm.torch.function.second_order`) taken at g, its d/dg times act' giving
d/d dy (plus the upstream gradient of dz); y enters only through act', so d/dy = 0.

Second order, memory-saving mode: backward reads (dy, y, weight, bias, invstd), with
``xhat = (p - bias) / weight``, ``p = act^-1(y)`` and act' = m. With upstream gradients u (of
dx), a (of dweight), c (of dbias), sums over the reduced axes, M values per channel, s =
invstd, w = weight, T = 1 in training and 0 in inference, and

    r      = sum(u (g - T (sum(g) + xhat sum(g xhat)) / M))
    d/dg   = w s (u - T (sum(u) + xhat sum(u xhat)) / M) + a xhat + c
    d/dxhat = -T w s / M (u sum(g xhat) + g sum(u xhat)) + a g

the partial derivatives are d/d dy = m d/dg, d/dy = d/dxhat / (m w) (dp/dy = 1/m),
d/d bias = -sum(d/dxhat) / w, d/dw = s r - sum(d/dxhat xhat) / w and d/ds = w r. In training
s is a function of x (ds/dx = -s^2 xhat / M), which is why the memory-saving forward makes
invstd a differentiable output of a graph node whose input is x (before the write): the
gradient d/ds reaches x through it. Third derivatives are not supported.

As for plain batch norm, two routes: eager calls run ``autograd.Function`` classes that call
the implementations of :mod:`._ops` directly (the memory-saving mode writing y over the input
as torch's in-place operations do: the input is marked dirty); compilers and ``torch.func``
trace the custom ops ``batchnorm::forward_training_fused``, ``forward_inference_fused``,
``backward_fused`` and ``backward_recover``, which write no input (the memory-saving mode is
their ``recover`` flag: the same values, y saved instead of x) and ``batch_norm`` copies y over
the input afterwards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _compat
from .._shapes import GAMMA_MIN
from . import _args, _ops
from .function import _eager, _grads, _inference_stats, _requires_grad, second_order

_ops_ns = torch.ops.batchnorm


# ---- the clamp of the memory-saving mode

def clamp_away(weight: Tensor) -> Tensor:
    """weight with every |value| raised to at least GAMMA_MIN, the sign kept (0 counts as
    positive): the weight the memory-saving mode computes with (contract §8). A CPU weight
    with nothing to clamp is returned as it is (checked in NumPy: a few torch operations on
    a per-channel tensor cost more than the check)."""
    if weight.is_cpu and weight.dtype in _NUMPY_DTYPES and not weight.requires_grad:
        a = weight.numpy()
        if (np.abs(a) >= GAMMA_MIN).all():
            return weight
        return torch.from_numpy(np.where(a >= 0, np.maximum(a, GAMMA_MIN),
                                         np.minimum(a, -GAMMA_MIN)).astype(a.dtype))
    return torch.where(weight >= 0, weight.clamp(min=GAMMA_MIN), weight.clamp(max=-GAMMA_MIN))


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


class _ClampAway(torch.autograd.Function):
    """:func:`clamp_away` whose gradient passes through unchanged (straight-through), so that
    a weight that reaches 0 can still move away from it."""

    @staticmethod
    def forward(ctx, weight):
        return clamp_away(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _clamped(weight: Tensor | None, differentiable: bool) -> Tensor | None:
    if weight is None:
        return None
    if differentiable:
        return _ClampAway.apply(weight)
    return clamp_away(weight.detach())


# ---- the activation, in torch operations (second order and the recovered xhat)

def _name(epilogue) -> str | None:
    return None if epilogue is None else epilogue.activation


def _slope(epilogue) -> float:
    return 0.0 if epilogue is None else epilogue.negative_slope


def _act_grad(y: Tensor, epilogue):
    """act'(pre) read off y's sign: 1 where y > 0, the slope elsewhere (1 without an
    activation)."""
    if epilogue is None:
        return 1.0
    # the slope as a 0-d tensor of y's dtype (a Python float would pass through float32)
    return torch.where(y > 0, y.new_ones(()), y.new_full((), epilogue.negative_slope))


def _xhat_from_y(y: Tensor, weight, bias, layout, epilogue) -> Tensor:
    """xhat = (act^-1(y) - bias) / weight (weight clamped as the forward used it)."""
    bshape = layout.broadcast_shape
    pre = y if epilogue is None else torch.where(y > 0, y, y / epilogue.negative_slope)
    if bias is not None:
        pre = pre - bias.view(bshape)
    return pre if weight is None else pre / weight.view(bshape)


def _invstd_term(ginvstd: Tensor, y: Tensor, weight, bias, invstd: Tensor, layout,
                 epilogue) -> Tensor:
    """The x gradient that reaches it through the saved invstd (the memory-saving mode in
    training, double backward only): d invstd / dx = -invstd^2 xhat / M."""
    bshape = layout.broadcast_shape
    xhat = _xhat_from_y(y, weight, bias, layout, epilogue)
    s = invstd.view(bshape)
    return ginvstd.view(bshape) * (-(s * s) / layout.count) * xhat


def _cast(t: Tensor | None, like: Tensor | None, need: bool):
    if not need or t is None:
        return None
    return _ops._as(t, like.dtype) if like is not None else t


# ---- backward, shared by both routes

def _fused_grads(pl, gy, x, y, weight, bias, mean, invstd, training: bool, mode: str,
                 epilogue, residual: bool, want_dz: bool):
    """(dx, dweight, dbias, dz) of the out-of-place fused forms (``residual``: the forward
    added one; dz None unless ``want_dz``): directly through the backends, or through the
    differentiable ``batchnorm::backward_fused`` when a graph of the backward is being built
    (create_graph) or there is no plan (the operators' route)."""
    if pl is None or torch.is_grad_enabled():
        mean, invstd = _ops._tensor(mean, x), _ops._tensor(invstd, x)
        dx, dw, db, dz = _ops_ns.backward_fused(gy, x, y, weight, bias, mean, invstd, training,
                                                mode, _name(epilogue), _slope(epilogue),
                                                residual)
        return dx, dw, db, dz if want_dz else None
    return _ops.grad_fused(pl, gy, x, y, weight, bias, mean, invstd, training, epilogue,
                           want_dz, residual)


def _recover_grads(pl, gy, ginvstd, y, weight, bias, mean, invstd, training: bool, mode: str,
                   epilogue):
    """(dx, dweight, dbias) of the memory-saving mode from y (weight unclamped: it is
    clamped here as in the forward, the gradient passing through)."""
    graph = pl is None or torch.is_grad_enabled()
    if gy is None:  # only invstd's gradient arrived (double backward)
        gy = torch.zeros_like(y)
    w = _clamped(weight, graph)
    if graph:
        dx, dw, db = _ops_ns.backward_recover(gy, y, w, bias, invstd, training, mode,
                                              _name(epilogue), _slope(epilogue))
    else:
        dx, dw, db, _ = _ops.grad_fused(pl, gy, None, y, w, bias, mean, invstd, training,
                                        epilogue, False)
    if ginvstd is not None:
        layout = _ops.layout_of(y, mode)
        dx = dx + _invstd_term(ginvstd, y, w, bias, invstd, layout, epilogue).to(dx.dtype)
    return dx, dw, db


# ---- autograd of the operators (the compilers' route)

def _setup_training(ctx, inputs, output):
    x, weight, bias, residual, _, _, _, _, mode, _, _, activation, slope, recover = inputs
    _, mean, invstd, new_mean, new_var = output
    ctx.mode, ctx.recover, ctx.residual = mode, recover, residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.epilogue = _args.epilogue(activation, slope)
    if recover:  # invstd stays differentiable: see the module notes
        ctx.mark_non_differentiable(mean, new_mean, new_var)
        ctx.set_materialize_grads(False)  # first order: no gradient reaches invstd
        ctx.save_for_backward(output[0], weight, bias, invstd)
    else:
        ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)
        ctx.save_for_backward(x, output[0] if activation is not None else None, weight, bias,
                              mean, invstd)


def _operator_grads(ctx, gy, ginvstd, x, y, weight, bias, mean, invstd, training: bool):
    """(dx, dweight, dbias, dz) of a fused operator, each None unless its input needs it;
    ``x`` None in the memory-saving mode (``ctx.recover``)."""
    need = ctx.needs_input_grad
    if ctx.recover:
        dx, dw, db = _recover_grads(None, gy, ginvstd, y, weight, bias, mean, invstd,
                                    training, ctx.mode, ctx.epilogue)
        dz = None
    else:
        dx, dw, db, dz = _fused_grads(None, gy, x, y, weight, bias, mean, invstd, training,
                                      ctx.mode, ctx.epilogue, ctx.residual, need[3])
    return (*_grads(ctx, weight, dx, dw, db), dz if need[3] else None)


def _backward_training(ctx, gy, _gmean, ginvstd, *_running):
    if ctx.recover:
        (y, weight, bias, invstd), x, mean = ctx.saved_tensors, None, None
    else:
        x, y, weight, bias, mean, invstd = ctx.saved_tensors
    return _operator_grads(ctx, gy, ginvstd, x, y, weight, bias, mean, invstd,
                           True) + (None,) * 10


torch.library.register_autograd("batchnorm::forward_training_fused", _backward_training,
                                setup_context=_setup_training)


def _setup_inference(ctx, inputs, output):
    x, weight, bias, residual, mean, var, eps, mode, _, activation, slope, recover = inputs
    ctx.mode, ctx.recover, ctx.eps = mode, recover, eps
    ctx.residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.epilogue = _args.epilogue(activation, slope)
    if recover:
        ctx.save_for_backward(output, weight, bias, mean, var)
    else:
        ctx.save_for_backward(x, output if activation is not None else None, weight, bias, mean,
                              var)


def _backward_inference(ctx, gy):
    if ctx.recover:
        (y, weight, bias, mean, var), x = ctx.saved_tensors, None
    else:
        x, y, weight, bias, mean, var = ctx.saved_tensors
    dtype = (y if x is None else x).dtype
    mean, invstd = _inference_stats(mean, var, ctx.eps, _ops.stats_dtype(dtype))
    return _operator_grads(ctx, gy, None, x, y, weight, bias, mean, invstd,
                           False) + (None,) * 8


torch.library.register_autograd("batchnorm::forward_inference_fused", _backward_inference,
                                setup_context=_setup_inference)


# ---- second order: the gradients of the two backward operators

def _setup_backward_fused(ctx, inputs, output):
    dy, x, y, weight, _, mean, invstd, training, mode, activation, slope, residual = inputs
    ctx.training, ctx.mode, ctx.residual = training, mode, residual
    ctx.epilogue = _args.epilogue(activation, slope)
    ctx.save_for_backward(dy, x, y, weight, mean, invstd)


def _backward_fused_backward(ctx, u, a, c, e):
    dy, x, y, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = _act_grad(y, ctx.epilogue) if y is not None else 1.0
    gg, gx, gw = second_order(dy * mask, x, weight, mean, invstd, ctx.training, ctx.mode,
                              u, a, c)
    if ctx.residual:  # dz = g
        gg = gg + e
    return (
        (gg * mask).to(dy.dtype) if need[0] else None,
        gx.to(x.dtype) if need[1] else None,
        None,  # y enters through act' alone, piecewise constant
        gw.to(weight.dtype) if need[3] else None,
        None,  # bias too (it only helps the backend find act', see backward_fused)
    ) + (None,) * 7


torch.library.register_autograd("batchnorm::backward_fused", _backward_fused_backward,
                                setup_context=_setup_backward_fused)


def _setup_backward_recover(ctx, inputs, output):
    dy, y, weight, bias, invstd, training, mode, activation, slope = inputs
    ctx.training, ctx.mode = training, mode
    ctx.epilogue = _args.epilogue(activation, slope)
    ctx.save_for_backward(dy, y, weight, bias, invstd)


def _backward_recover_backward(ctx, u, a, c):
    """The partial derivatives of the module notes (memory-saving mode)."""
    dy, y, weight, bias, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    layout = _ops.layout_of(y, ctx.mode)
    dims, bshape, count = layout.reduce_axes, layout.broadcast_shape, layout.count
    s = invstd.view(bshape)
    w = weight.view(bshape) if weight is not None else torch.ones_like(s)
    a, c = a.view(bshape), c.view(bshape)
    m = _act_grad(y, ctx.epilogue)
    xhat = _xhat_from_y(y, weight, bias, layout, ctx.epilogue)
    g = dy * m

    def total(t):
        return t.sum(dims, keepdim=True)

    if ctx.training:
        sum_g, sum_gx = total(g), total(g * xhat)
        sum_u, sum_ux = total(u), total(u * xhat)
        dg = w * s * (u - (sum_u + xhat * sum_ux) / count) + a * xhat + c
        gxhat = -(w * s / count) * (u * sum_gx + g * sum_ux) + a * g
        r = total(u * (g - (sum_g + xhat * sum_gx) / count))
    else:
        dg = w * s * u + a * xhat + c
        gxhat = a * g
        r = total(u * g)
    pshape = layout.param_shape
    return (
        (dg * m).to(dy.dtype) if need[0] else None,
        (gxhat / (m * w)).to(y.dtype) if need[1] else None,
        (s * r - total(gxhat * xhat) / w).view(pshape).to(weight.dtype) if need[2] else None,
        (-total(gxhat) / w).view(pshape).to(bias.dtype) if need[3] else None,
        (w * r).view(pshape).to(invstd.dtype) if need[4] else None,
    ) + (None,) * 4


torch.library.register_autograd("batchnorm::backward_recover", _backward_recover_backward,
                                setup_context=_setup_backward_recover)


# ---- the eager route

class _FusedTraining(torch.autograd.Function):
    """forward_training_fused without the dispatcher (out of place)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        pl, running_mean, running_var, momentum, eps, batches, check_finite, epilogue = call
        y, mean, invstd = _ops.train_fused(pl, x, weight, bias, residual, running_mean,
                                           running_var, momentum, eps, epilogue, False,
                                           batches, check_finite)
        ctx.plan, ctx.epilogue, ctx.stats = pl, epilogue, (mean, invstd)
        ctx.residual = residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, bias, y if epilogue is not None else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db, dz = _fused_grads(ctx.plan, gy, x, y, weight, bias, *ctx.stats, True,
                                      ctx.plan.layout.mode, ctx.epilogue, ctx.residual,
                                      need[3])
        return (*_grads(ctx, weight, dx, dw, db), dz, None)


class _FusedInference(torch.autograd.Function):
    """forward_inference_fused without the dispatcher (out of place)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, var, call):
        pl, eps, check_finite, epilogue = call
        y = _ops.infer_fused(pl, x, weight, bias, residual, mean, var, eps, epilogue, False,
                             check_finite)
        ctx.plan, ctx.epilogue, ctx.eps = pl, epilogue, eps
        ctx.residual = residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, bias, y if epilogue is not None else None, mean, var)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, y, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        mean, invstd = _inference_stats(mean, var, ctx.eps, ctx.plan.sdt)
        dx, dw, db, dz = _fused_grads(ctx.plan, gy, x, y, weight, bias, mean, invstd, False,
                                      ctx.plan.layout.mode, ctx.epilogue, ctx.residual,
                                      need[3])
        return (*_grads(ctx, weight, dx, dw, db), dz, None, None, None)


class _RecoverStatistics(torch.autograd.Function):
    """The memory-saving mode in training, first of two graph nodes: runs the whole forward,
    writing y over x, and returns invstd, a differentiable function of x.

    Its backward runs in double backward only, when the formula of ``backward_recover``
    sends a gradient to invstd: d invstd / dx = -invstd^2 xhat / M, xhat recovered from y.
    The write over x is declared by the next node, :class:`_RecoverOutput`, which marks x
    dirty right after (no operation runs in between) and returns it as y: an
    ``autograd.Function`` that modifies a view may return only that view, so invstd cannot
    be a second output of the node that marks x dirty.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        pl, running_mean, running_var, momentum, eps, batches, check_finite, epilogue = call
        w = _clamped(weight, False)
        _, mean, invstd = _ops.train_fused(pl, x, w, bias, None, running_mean, running_var,
                                           momentum, eps, epilogue, True, batches,
                                           check_finite)
        mean, invstd = _ops._tensor(mean, x), _ops._tensor(invstd, x)  # graph outputs
        # The weight and bias as this forward used them. y is handed over by the next node's
        # backward when it builds a graph (double backward); holding it from here would keep
        # every layer's y until the whole backward is over.
        ctx.w, ctx.b = w, None if bias is None else bias.detach()
        ctx.s, ctx.layout, ctx.epilogue = invstd.detach(), pl.layout, epilogue
        ctx.y = None
        ctx.mark_non_differentiable(mean)
        ctx.set_materialize_grads(False)  # first order: no gradient reaches invstd
        return invstd, mean

    @staticmethod
    def backward(ctx, ginvstd, _gmean):
        if ginvstd is None:
            return None, None, None, None
        y = ctx.y  # set when the backward of the next node built a graph
        dx = _invstd_term(ginvstd, y, ctx.w, ctx.b, ctx.s, ctx.layout, ctx.epilogue)
        return dx.to(y.dtype), None, None, None


class _RecoverOutput(torch.autograd.Function):
    """The memory-saving mode in training, second node: x (holding y since the first node)
    marked dirty and returned as y; only y is saved, with the per-channel tensors."""

    @staticmethod
    def forward(ctx, x, invstd, weight, bias, first):
        ctx.mark_dirty(x)
        ctx.plan, ctx.epilogue, ctx.mean = first
        ctx.save_for_backward(x, weight, bias, invstd)
        ctx.statistics = invstd.grad_fn  # the first node (no reference back: no cycle)
        return x

    @staticmethod
    def backward(ctx, gy):
        y, weight, bias, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled() and ctx.statistics is not None:
            ctx.statistics.y = y.detach()  # double backward: the first node's formula reads y
        dx, dw, db = _recover_grads(ctx.plan, gy, None, y, weight, bias, ctx.mean, invstd,
                                    True, ctx.plan.layout.mode, ctx.epilogue)
        return (dx if need[0] else None, None, _cast(dw, weight, need[2]),
                _cast(db, bias, need[3]), None)


def _recover_training(x, weight, bias, call):
    """y of the memory-saving mode in training, through its two graph nodes."""
    invstd, mean = _apply_recover_statistics(x, weight, bias, call)
    return _apply_recover_output(x, invstd, weight, bias, (call[0], call[7], mean))


class _RecoverInference(torch.autograd.Function):
    """The memory-saving mode with given statistics: y written over x, only y saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, call):
        pl, eps, check_finite, epilogue = call
        w = _clamped(weight, False)
        y = _ops.infer_fused(pl, x, w, bias, None, mean, var, eps, epilogue, True,
                             check_finite)
        ctx.mark_dirty(x)
        ctx.plan, ctx.epilogue, ctx.eps = pl, epilogue, eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(y, weight, bias, mean, var)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, weight, bias, mean, var = ctx.saved_tensors
        mean, invstd = _inference_stats(mean, var, ctx.eps, ctx.plan.sdt)
        dx, dw, db = _recover_grads(ctx.plan, gy, None, y, weight, bias, mean, invstd, False,
                                    ctx.plan.layout.mode, ctx.epilogue)
        return (*_grads(ctx, weight, dx, dw, db), None, None, None)


_apply_training = _compat.direct_apply(_FusedTraining)
_apply_inference = _compat.direct_apply(_FusedInference)
_apply_recover_statistics = _compat.direct_apply(_RecoverStatistics)
_apply_recover_output = _compat.direct_apply(_RecoverOutput)
_apply_recover_inference = _compat.direct_apply(_RecoverInference)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
               eps: float, mode: str, batches: Tensor | None, check_finite: bool, epilogue,
               residual: Tensor | None, inplace: bool) -> Tensor:
    """The fused forms of :func:`batchnorm.torch.batch_norm`, its arguments checked
    (``epilogue`` from :func:`._args.epilogue`, the residual and the memory-saving mode's
    conditions too)."""
    grad = torch.is_grad_enabled() and (input.requires_grad or _requires_grad(weight)
                                        or _requires_grad(bias) or _requires_grad(residual))
    if _eager(input):
        if training:
            pl = _ops.plan(input, mode, "training", weight, bias, running_mean, running_var)
            call = (pl, running_mean, running_var, momentum, eps, batches, check_finite,
                    epilogue)
            if inplace:
                if grad:
                    return _recover_training(input, weight, bias, call)
                return _ops.train_fused(pl, input, _clamped(weight, False), bias, None,
                                        *call[1:5], epilogue, True, batches, check_finite)[0]
            if grad:
                return _apply_training(input, weight, bias, residual, call)
            return _ops.train_fused(pl, input, weight, bias, residual, *call[1:5], epilogue,
                                    False, batches, check_finite)[0]
        pl = _ops.plan(input, mode, "inference", weight, bias, running_mean, running_var)
        call = (pl, eps, check_finite, epilogue)
        if inplace:
            if grad:
                return _apply_recover_inference(input, weight, bias, running_mean, running_var,
                                                call)
            return _ops.infer_fused(pl, input, _clamped(weight, False), bias, None,
                                    running_mean, running_var, eps, epilogue, True,
                                    check_finite)
        if grad:
            return _apply_inference(input, weight, bias, residual, running_mean, running_var,
                                    call)
        return _ops.infer_fused(pl, input, weight, bias, residual, running_mean, running_var,
                                eps, epilogue, False, check_finite)
    # The operators' route. The memory-saving mode computes with the clamped weight (its
    # gradient passing through) and the operator saves y; y is then written over the input.
    w = _clamped(weight, grad) if inplace else weight
    name, slope = _name(epilogue), _slope(epilogue)
    if training:
        y, _, _, new_mean, new_var = _ops_ns.forward_training_fused(
            input, w, bias, residual, running_mean, running_var, momentum, eps, mode,
            batches, check_finite, name, slope, inplace)
        with torch.no_grad():  # the in-place update torch.nn.functional.batch_norm makes
            if running_mean is not None:
                running_mean.copy_(new_mean)
            if running_var is not None:
                running_var.copy_(new_var)
    else:
        y = _ops_ns.forward_inference_fused(input, w, bias, residual, running_mean,
                                            running_var, eps, mode, check_finite, name, slope,
                                            inplace)
    if inplace:
        return input.copy_(y)
    return y
