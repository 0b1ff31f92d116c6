"""The reference backend: contract §1 in NumPy, computed in float64, readable top to bottom.

Every fast path is tested against these functions; they in turn are tested against central
finite differences and against PyTorch autograd. They favour clarity over speed: they work on
the input's own shape with ``keepdims`` reductions and allocate freely.

All functions take validated arguments (see ``batchnorm._api``) and a
:class:`~batchnorm._shapes.Layout`. Results are written to ``out`` when it is given; the
whole result is computed before ``out`` is written, so ``out`` may alias the input.
"""

from __future__ import annotations

import numpy as np

from ._shapes import Layout, stats_dtype

NAME = "reference"


def unavailable_reason(x) -> str | None:
    """The reference runs on any NumPy array."""
    return None if isinstance(x, np.ndarray) else "the reference backend works on NumPy arrays"


def _param(p, layout: Layout, default: float) -> np.ndarray:
    """A per-channel parameter in float64, shaped to broadcast against the input."""
    if p is None:
        return np.full(layout.broadcast_shape, default)
    return np.asarray(p, dtype=np.float64).reshape(layout.broadcast_shape)


def inverse_std(var: np.ndarray, eps: float) -> np.ndarray:
    """1 / sqrt(var + eps), with 0 where var + eps == 0 (a constant channel with eps = 0)."""
    denom = var + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.sqrt(denom)
    return np.where(denom == 0, 0.0, inv)


def _write(result: np.ndarray, out: np.ndarray | None, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow to inf in a narrow dtype is reported by
        if out is None:               # check_finite, not by a NumPy warning
            return result.astype(dtype)
        out[...] = result
    return out


def _update_running(running, momentum: float, batch_value: np.ndarray) -> None:
    # running = (1 - m) * running + m * batch   (in place: the caller asked for it)
    if running is not None:
        running[...] = (1.0 - momentum) * running.astype(np.float64) + momentum * batch_value


@np.errstate(invalid="ignore", over="ignore")  # NaN/Inf inputs propagate; check_finite reports
def forward_training(x, gamma, beta, layout: Layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with the batch's mu and biased var.

    Returns ``(y, mean, invstd, bad)``; ``mean`` and ``invstd`` have ``layout.param_shape``;
    ``bad`` is the mask of non-finite channels when ``check_finite``, else None.
    """
    sdt = stats_dtype(x.dtype)
    axes = layout.reduce_axes
    m = layout.count
    if x.size == 0:
        zeros = np.zeros(layout.param_shape, dtype=sdt)
        bad = np.zeros(layout.param_shape, dtype=bool) if check_finite else None
        return _write(np.empty(x.shape), out, x.dtype), zeros, zeros.copy(), bad

    x64 = x.astype(np.float64)
    mu = x64.mean(axis=axes, keepdims=True)                       # mu  = sum(x) / M
    var = ((x64 - mu) ** 2).mean(axis=axes, keepdims=True)        # var = sum((x-mu)^2) / M
    invstd = inverse_std(var, eps)
    xhat = (x64 - mu) * invstd
    y = _param(gamma, layout, 1.0) * xhat + _param(beta, layout, 0.0)

    mu_c = mu.reshape(layout.param_shape)
    var_c = var.reshape(layout.param_shape)
    _update_running(running_mean, momentum, mu_c)
    _update_running(running_var, momentum, var_c * m / (m - 1))   # unbiased for the average
    y = _write(y, out, x.dtype)
    mean, invstd = mu_c.astype(sdt), invstd.reshape(layout.param_shape).astype(sdt)
    bad = nonfinite_channels(y, mean, invstd, layout) if check_finite else None
    return y, mean, invstd, bad


@np.errstate(invalid="ignore", over="ignore")
def forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics."""
    if x.size == 0:
        return _write(np.empty(x.shape), out, x.dtype)
    invstd = inverse_std(_param(var, layout, 1.0), eps)
    xhat = (x.astype(np.float64) - _param(mean, layout, 0.0)) * invstd
    y = _param(gamma, layout, 1.0) * xhat + _param(beta, layout, 0.0)
    return _write(y, out, x.dtype)


@np.errstate(invalid="ignore", over="ignore")
def backward(dy, x, gamma, mean, invstd, layout: Layout, *, training=True, out=None):
    """dx, dgamma, dbeta from dy and the saved mean / invstd (contract §1).

    Training:  dx = gamma * invstd * (dy - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * dy          (mean and invstd are constants)
    ``dgamma`` is None when ``gamma`` is None.
    """
    sdt = stats_dtype(x.dtype)
    axes = layout.reduce_axes
    m = layout.count
    if x.size == 0:
        zeros = np.zeros(layout.param_shape, dtype=sdt)
        dgamma = None if gamma is None else zeros.copy()
        return _write(np.empty(x.shape), out, x.dtype), dgamma, zeros

    dy64 = dy.astype(np.float64)
    inv = _param(invstd, layout, 0.0)
    xhat = (x.astype(np.float64) - _param(mean, layout, 0.0)) * inv
    dbeta = dy64.sum(axis=axes, keepdims=True)
    dgamma = (dy64 * xhat).sum(axis=axes, keepdims=True)
    scale = _param(gamma, layout, 1.0) * inv
    if training:
        dx = scale * (dy64 - (dbeta + xhat * dgamma) / m)
    else:
        dx = scale * dy64

    dgamma_c = None if gamma is None else dgamma.reshape(layout.param_shape).astype(sdt)
    return _write(dx, out, x.dtype), dgamma_c, dbeta.reshape(layout.param_shape).astype(sdt)


def nonfinite_channels(y: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                       layout: Layout) -> np.ndarray:
    """Boolean ``param_shape`` mask of channels whose statistics or output are not finite."""
    bad = ~(np.isfinite(mean) & np.isfinite(invstd))
    if y.size:
        bad = bad | ~np.isfinite(y).all(axis=layout.reduce_axes).reshape(layout.param_shape)
    return bad
