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
                     out=None, backend="auto", axis=None):
    """Batch-norm forward with batch statistics: y = gamma * (x - mu) / sqrt(var + eps) + beta.

    Args:
        x: [N, C, *spatial] (or channels-last with ``channel_axis=-1``) float array.
        gamma, beta: [param_shape] scale and shift, or None for no affine transform.
            ``param_shape`` is ``(C,)`` in the spatial modes and ``x.shape[1:]`` per activation.
        eps: added to the biased variance; finite and >= 0.
        mode: ``"spatial"`` (the default), ``"spatial_persistent"`` (same result, single-read
            algorithm) or ``"per_activation"``.
        channel_axis: 1 for NCHW (the default), -1 for channels-last.
        running_mean, running_var: [param_shape] arrays updated IN PLACE with
            ``(1 - momentum) * running + momentum * batch`` (the variance unbiased), if given.
        momentum: in [0, 1]; 1 replaces the running statistics.
        check_finite: raise FloatingPointError naming channels whose statistics or outputs
            are not finite.
        out: optional array of x's shape and dtype that receives y.
        backend: ``"auto"`` (the fastest that can run), ``"cpu"`` or ``"reference"``.
            CUDA tensors run on the ``"gpu"`` backend through :mod:`batchnorm.torch`.
        axis: optional tuple of axes to reduce over; replaces ``mode`` / ``channel_axis``
            (giving it with either is a ValueError, so those two default to None).

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
    out = S.check_out(out, x, gamma, beta, running_mean, running_var)
    impl = select(backend, x)
    y, mean, invstd, bad = impl.forward_training(
        x, gamma, beta, layout, eps=eps, momentum=momentum, running_mean=running_mean,
        running_var=running_var, out=out, check_finite=check_finite,
    )
    if check_finite and bad is not None and bad.any():
        S.raise_bad_channels(layout, bad)
    return y, SavedStats(mean, invstd)


def forward_inference(x, gamma, beta, mean, var, *, eps=1e-5, mode=None, channel_axis=None,
                      out=None, backend="auto", axis=None):
    """Batch-norm forward with given statistics: y = gamma * (x - mean) / sqrt(var + eps) + beta.

    Args:
        x: [N, C, *spatial] float array (channels-last with ``channel_axis=-1``).
        gamma, beta: [param_shape] or None.
        mean, var: [param_shape] statistics to normalize with (usually the running ones).
        eps, mode, channel_axis, out, backend, axis: as in :func:`forward_training`.

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
    out = S.check_out(out, x, gamma, beta, mean, var)
    impl = select(backend, x)
    return impl.forward_inference(x, gamma, beta, mean, var, layout, eps=eps, out=out)


def backward(dy, x, gamma, saved, *, mode=None, channel_axis=None, out=None,
             backend="auto", axis=None, training=True):
    """Gradients of batch norm from dy and the saved statistics (closed form, contract §1).

    dbeta = sum(dy), dgamma = sum(dy * xhat), and
    dx = gamma * invstd * (dy - (dbeta + xhat * dgamma) / M) in training, or
    dx = gamma * invstd * dy for inference (``training=False``; ``saved`` then holds the
    given mean and ``1 / sqrt(var + eps)``).

    Args:
        dy: [x.shape] upstream gradient.
        x: [N, C, *spatial] the forward input.
        gamma: [param_shape] or None (then dgamma is None).
        saved: :class:`SavedStats` from :func:`forward_training`.
        mode, channel_axis, out, backend, axis: as in :func:`forward_training`.
        training: whether the forward used batch statistics.

    Returns:
        ``(dx, dgamma, dbeta)``: dx has x's shape and dtype; dgamma and dbeta are
        [param_shape] in the statistics dtype. dbeta is always returned (backward does not
        see beta); a caller without beta ignores it.
    """
    x = S.as_array("x", x)
    dy = S.as_array("dy", dy)
    layout = S.resolve_layout(x.shape, mode, channel_axis, axis)
    S.check_same_shape("dy", dy, layout)
    if not isinstance(saved, tuple) or len(saved) != 2:
        raise TypeError("`saved` must be the SavedStats(mean, invstd) from forward_training")
    gamma = S.check_param("gamma", gamma, layout)
    mean = S.check_param("saved.mean", saved[0], layout, optional=False)
    invstd = S.check_param("saved.invstd", saved[1], layout, optional=False)
    if training:
        S.check_training_count(layout)
    out = S.check_out(out, x, dy, gamma, mean, invstd)
    impl = select(backend, x)
    return impl.backward(dy, x, gamma, mean, invstd, layout, training=training, out=out)
