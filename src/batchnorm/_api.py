"""The public functions of contract §6: validate once, pick a backend, run it.

Validation lives in :mod:`batchnorm._shapes`; the math lives in the backends. This module
only wires them together, so every backend sees the same checked arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _shapes as S
from .backends import select


class SavedStats(NamedTuple):
    """What forward training saves for backward.

    Attributes:
        mean: [param_shape] batch mean (float32, or float64 for float64 input).
        invstd: [param_shape] 1 / sqrt(biased batch var + eps); 0 where var + eps == 0.
    """

    mean: np.ndarray
    invstd: np.ndarray


def forward_training(x, gamma=None, beta=None, *, eps=1e-5, mode=None, channel_axis=None,
                     running_mean=None, running_var=None, momentum=0.1, check_finite=False,
                     out=None, backend="auto", axis=None, activation=None, negative_slope=0.01,
                     residual=None):
    """Batch-norm forward with batch statistics: y = gamma * (x - mu) / sqrt(var + eps) + beta.

    With the epilogue (contract §8): ``y = act(gamma * xhat + beta + residual)``.

    Args:
        x: [N, C, *spatial] (or channels-last with ``channel_axis=-1``) float array.
        gamma, beta: [param_shape] scale and shift, or None for no affine transform.
            ``param_shape`` is ``(C,)`` in the spatial modes and ``x.shape[1:]`` per activation.
        eps: added to the biased variance; finite and >= 0.
        mode: ``"spatial"`` (the default), ``"spatial_persistent"`` (the same result and
            algorithm choice, contract §2) or ``"per_activation"``.
        channel_axis: 1 for NCHW (the default), -1 for channels-last.
        running_mean, running_var: [param_shape] arrays updated IN PLACE with
            ``(1 - momentum) * running + momentum * batch`` (the variance unbiased), if given.
        momentum: in [0, 1]; 1 replaces the running statistics.
        check_finite: raise FloatingPointError naming channels whose statistics or outputs
            are not finite; the running statistics and ``out`` are then left as they were
            (with ``out``, y is computed into a fresh array and copied there once finite).
        out: optional array of x's shape and dtype that receives y.
        backend: ``"auto"`` (the fastest that can run), ``"cpu"`` or ``"reference"``.
            CUDA tensors run on the ``"gpu"`` backend through :mod:`batchnorm.torch`.
        axis: optional tuple of axes to reduce over; replaces ``mode`` / ``channel_axis``
            (giving it with either is a ValueError, so those two default to None).
        activation: None, ``"relu"`` or ``"leaky_relu"``, applied after the affine transform
            and the residual add.
        negative_slope: leaky_relu's slope for negative inputs, >= 0.
        residual: optional array of x's shape and dtype added before the activation.
            ``out=x`` (the memory-saving mode: y overwrites x) is allowed when the activation
            is invertible (none, or leaky_relu with a slope > 0), there is no residual, and
            every ``|gamma| >= GAMMA_MIN``; :func:`backward` then recovers xhat from y.

    Returns:
        ``(y, SavedStats(mean, invstd))``; y has x's shape and dtype.
    """
    x = S.as_array("x", x)
    layout = S.resolve_layout(x.shape, mode, channel_axis, axis)
    eps, momentum = S.check_scalars(eps, momentum)
    gamma = S.check_param("gamma", gamma, layout)
    beta = S.check_param("beta", beta, layout)
    running_mean = S.check_running("running_mean", running_mean, layout)
    running_var = S.check_running("running_var", running_var, layout)
    S.check_training_count(layout)
    epilogue, residual, inplace = S.check_epilogue_args(x, gamma, out, layout, activation,
                                                        negative_slope, residual)
    out = S.check_out(out, x, gamma, beta, running_mean, running_var, residual,
                      inplace=inplace)
    S.check_running_aliases(running_mean, running_var, x, gamma, beta, residual)
    fused = dict(residual=residual, epilogue=epilogue)
    impl = select(backend, x)
    if not check_finite:
        y, mean, invstd, _ = impl.forward_training(
            x, gamma, beta, layout, eps=eps, momentum=momentum, running_mean=running_mean,
            running_var=running_var, out=out, **fused,
        )
        return y, SavedStats(mean, invstd)
    # A refused call leaves every array of the caller as it was (contract §3): the backend
    # updates copies of the running statistics (per-channel, cheap) and writes y to a fresh
    # array, and both are copied to the caller's arrays once y is known to be finite.
    staged = [None if r is None else r.copy() for r in (running_mean, running_var)]
    y, mean, invstd, bad = impl.forward_training(
        x, gamma, beta, layout, eps=eps, momentum=momentum, running_mean=staged[0],
        running_var=staged[1], check_finite=True, **fused,
    )
    if bad is not None and bad.any():
        S.raise_bad_channels(layout, bad)
    for target, value in zip((running_mean, running_var), staged, strict=True):
        if target is not None:
            np.copyto(target, value)
    if out is not None:
        np.copyto(out, y)
        y = out
    return y, SavedStats(mean, invstd)


def forward_inference(x, gamma, beta, mean, var, *, eps=1e-5, mode=None, channel_axis=None,
                      out=None, backend="auto", axis=None, activation=None, negative_slope=0.01,
                      residual=None):
    """Batch-norm forward with given statistics: y = gamma * (x - mean) / sqrt(var + eps) + beta.

    Args:
        x: [N, C, *spatial] float array (channels-last with ``channel_axis=-1``).
        gamma, beta: [param_shape] or None.
        mean, var: [param_shape] statistics to normalize with (usually the running ones).
        eps, mode, channel_axis, out, backend, axis, activation, negative_slope, residual:
            as in :func:`forward_training` (``out=x`` under the same conditions).

    Returns:
        y with x's shape and dtype.
    """
    x = S.as_array("x", x)
    layout = S.resolve_layout(x.shape, mode, channel_axis, axis)
    eps, _ = S.check_scalars(eps)
    gamma = S.check_param("gamma", gamma, layout)
    beta = S.check_param("beta", beta, layout)
    mean = S.check_param("mean", mean, layout, optional=False)
    var = S.check_param("var", var, layout, optional=False)
    epilogue, residual, inplace = S.check_epilogue_args(x, gamma, out, layout, activation,
                                                        negative_slope, residual)
    out = S.check_out(out, x, gamma, beta, mean, var, residual, inplace=inplace)
    impl = select(backend, x)
    return impl.forward_inference(x, gamma, beta, mean, var, layout, eps=eps, out=out,
                                  residual=residual, epilogue=epilogue)


def backward(dy, x, gamma, saved, *, mode=None, channel_axis=None, out=None,
             backend="auto", axis=None, training=True, activation=None, negative_slope=0.01,
             y=None, beta=None, residual=False):
    """Gradients of batch norm from dy and the saved statistics (closed form, contract §1, §8).

    With g = dy * act'(pre) (g = dy without an activation): dbeta = sum(g),
    dgamma = sum(g * xhat), and dx = gamma * invstd * (g - (dbeta + xhat * dgamma) / M) in
    training, or dx = gamma * invstd * g for inference (``training=False``; ``saved`` then
    holds the given mean and ``1 / sqrt(var + eps)``). The residual's gradient is dz = g.

    Args:
        dy: [x.shape] upstream gradient.
        x: [N, C, *spatial] the forward input, or None in the memory-saving mode (the forward
            wrote y over x): xhat is then recovered as ``(act^-1(y) - beta) / gamma``.
        gamma: [param_shape] or None (then dgamma is None).
        saved: :class:`SavedStats` from :func:`forward_training`.
        mode, channel_axis, out, backend, axis: as in :func:`forward_training`.
        training: whether the forward used batch statistics.
        activation, negative_slope: the forward's epilogue.
        y: [x.shape] the forward's output; required with an activation (its sign gives
            act') and when ``x`` is None.
        beta: [param_shape] the forward's shift; used only when ``x`` is None.
        residual: whether the forward added a residual; dz is then returned too.

    Returns:
        ``(dx, dgamma, dbeta)``, and ``dz`` last when ``residual``: dx and dz have dy's shape
        and dtype; dgamma and dbeta are [param_shape] in the statistics dtype. dbeta is
        always returned (backward does not need beta); a caller without beta ignores it.
    """
    x = None if x is None else S.as_array("x", x)
    dy = S.as_array("dy", dy)
    layout = S.resolve_layout((dy if x is None else x).shape, mode, channel_axis, axis)
    S.check_same_shape("dy", dy, layout)
    if x is not None:
        S.check_same_dtype("dy", dy, x)
    if not isinstance(saved, tuple) or len(saved) != 2:
        raise TypeError("`saved` must be the SavedStats(mean, invstd) from forward_training")
    gamma = S.check_param("gamma", gamma, layout)
    beta = S.check_param("beta", beta, layout)
    mean = S.check_param("saved.mean", saved[0], layout, optional=False)
    invstd = S.check_param("saved.invstd", saved[1], layout, optional=False)
    if training:
        S.check_training_count(layout)
    epilogue, y = S.check_backward_epilogue(dy, x, y, gamma, layout, activation,
                                            negative_slope)
    out = S.check_out(out, dy, x, y, gamma, beta, mean, invstd)
    impl = select(backend, dy)
    return impl.backward(dy, x, gamma, mean, invstd, layout, training=training, out=out,
                         y=y, beta=beta, epilogue=epilogue, residual=bool(residual))
