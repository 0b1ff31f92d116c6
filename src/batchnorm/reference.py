"""The reference backend: contract §1 and §8 in NumPy, computed in float64, readable top to bottom.

Every fast path is tested against these functions; they in turn are tested against central
finite differences and against PyTorch autograd. They favour clarity over speed: they work on
the input's own shape with ``keepdims`` reductions and allocate freely.

The backend contract is written in phases (:mod:`batchnorm.backends.protocol`): per-channel
``moments``, ``apply`` (with the epilogue: residual add and activation), ``grad_sums`` and
``grad_apply``. The whole calls ``forward_training``, ``forward_inference`` and ``backward``
are those phases composed; here they are composed literally, so each phase is the math of one
line of contract §1.

All functions take validated arguments (see ``batchnorm._api``) and a
:class:`~batchnorm._shapes.Layout`. Results are written to ``out`` when it is given; the
whole result is computed before ``out`` is written, so ``out`` may alias the input.
"""

from __future__ import annotations

import numpy as np

from ._shapes import Epilogue, Layout, stats_dtype

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


# ---------------------------------------------------------------------------- the epilogue


def activate(pre: np.ndarray, epilogue: Epilogue | None) -> np.ndarray:
    """act(pre): the identity, relu, or leaky_relu with slope ``a`` (a >= 0)."""
    if epilogue is None:
        return pre
    return np.where(pre > 0, pre, epilogue.slope * pre)


def activation_grad(y: np.ndarray, epilogue: Epilogue | None) -> np.ndarray | float:
    """act'(pre), read off the output y = act(pre): with a slope a >= 0, y > 0 exactly where
    pre > 0. At pre = 0 the derivative is taken as the slope, as torch's relu and leaky_relu
    take it."""
    if epilogue is None:
        return 1.0
    return np.where(y > 0, 1.0, epilogue.slope)


def deactivate(y: np.ndarray, epilogue: Epilogue | None) -> np.ndarray:
    """pre from y = act(pre), for the invertible activations (identity, leaky_relu, a > 0)."""
    if epilogue is None:
        return y
    return np.where(y > 0, y, y / epilogue.negative_slope)


# ---------------------------------------------------------------------------- the phases


@np.errstate(invalid="ignore", over="ignore")
def moments(x, layout: Layout):
    """``(count, mean, m2)`` per channel: M, the mean and sum((x - mean)^2), in float64.

    Moments of disjoint parts of a batch merge exactly by Chan's formula (see
    :func:`batchnorm.backends.protocol.merge_moments`); zero-size input gives (0, 0, 0).
    """
    if x.size == 0:
        zeros = np.zeros(layout.param_shape)
        return 0, zeros, zeros.copy()
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=layout.reduce_axes, keepdims=True)             # mu = sum(x) / M
    m2 = ((x64 - mu) ** 2).sum(axis=layout.reduce_axes, keepdims=True)  # two-pass
    return layout.count, mu.reshape(layout.param_shape), m2.reshape(layout.param_shape)


@np.errstate(invalid="ignore", over="ignore")  # NaN/Inf inputs propagate; check_finite reports
def apply(x, mean, invstd, gamma, beta, layout: Layout, *, residual=None, epilogue=None,
          out=None):
    """y = act(gamma * (x - mean) * invstd + beta + residual), written in x's dtype."""
    xhat = (x.astype(np.float64) - _param(mean, layout, 0.0)) * _param(invstd, layout, 1.0)
    pre = _param(gamma, layout, 1.0) * xhat + _param(beta, layout, 0.0)
    if residual is not None:
        pre = pre + residual.astype(np.float64)
    return _write(activate(pre, epilogue), out, x.dtype)


def xhat_of(layout: Layout, mean, invstd, *, x=None, y=None, gamma=None, beta=None,
            epilogue=None) -> np.ndarray:
    """The normalized input in float64: from x and the statistics, or, in the memory-saving
    mode where x was overwritten, from the output: xhat = (act^-1(y) - beta) / gamma."""
    if x is not None:
        return (x.astype(np.float64) - _param(mean, layout, 0.0)) * _param(invstd, layout, 0.0)
    pre = deactivate(y.astype(np.float64), epilogue)
    return (pre - _param(beta, layout, 0.0)) / _param(gamma, layout, 1.0)


@np.errstate(invalid="ignore", over="ignore")
def grad_sums(dy, x, mean, invstd, layout: Layout, *, y=None, gamma=None, beta=None,
              epilogue=None):
    """``(sum(g), sum(g * xhat))`` per channel in float64, with g = dy * act'(pre).

    ``g`` is the gradient at the pre-activation (and the residual's gradient). ``y`` (the
    forward output) is needed when there is an activation; ``x`` may be None when ``y``,
    ``gamma`` and ``beta`` are given (the memory-saving mode).
    """
    if dy.size == 0:
        zeros = np.zeros(layout.param_shape)
        return zeros, zeros.copy()
    g = dy.astype(np.float64) * (1.0 if y is None else activation_grad(y, epilogue))
    xhat = xhat_of(layout, mean, invstd, x=x, y=y, gamma=gamma, beta=beta, epilogue=epilogue)
    axes = layout.reduce_axes
    return (g.sum(axis=axes).reshape(layout.param_shape),                # dbeta
            (g * xhat).sum(axis=axes).reshape(layout.param_shape))       # dgamma


@np.errstate(invalid="ignore", over="ignore")
def grad_apply(dy, x, mean, invstd, gamma, sums, layout: Layout, *, count, training=True,
               y=None, beta=None, epilogue=None, out=None, out_dz=None, want_dz=False):
    """dx (and dz, the residual's gradient) from dy and the channel sums of :func:`grad_sums`.

    Training:  dx = gamma * invstd * (g - (sum(g) + xhat * sum(g xhat)) / M)
    Inference: dx = gamma * invstd * g          (the statistics are constants)
    with g = dy * act'(pre) = dz, and M = ``count`` (the global count under SyncBatchNorm).

    Returns ``(dx, dz)``; dz is None unless ``want_dz``.
    """
    if dy.size == 0:
        dz = _write(np.empty(dy.shape), out_dz, dy.dtype) if want_dz else None
        return _write(np.empty(dy.shape), out, dy.dtype), dz
    g = dy.astype(np.float64) * (1.0 if y is None else activation_grad(y, epilogue))
    inv = _param(invstd, layout, 0.0)
    scale = _param(gamma, layout, 1.0) * inv
    if training:
        xhat = xhat_of(layout, mean, invstd, x=x, y=y, gamma=gamma, beta=beta,
                       epilogue=epilogue)
        sum_g, sum_gx = (_param(s, layout, 0.0) for s in sums)
        dx = scale * (g - (sum_g + xhat * sum_gx) / count)
    else:
        dx = scale * g
    dz = _write(g, out_dz, dy.dtype) if want_dz else None
    return _write(dx, out, dy.dtype), dz


# ---------------------------------------------------------------------------- whole calls


def _update_running(running, momentum: float, batch_value: np.ndarray) -> None:
    # running = (1 - m) * running + m * batch   (in place: the caller asked for it)
    if running is not None:
        running[...] = (1.0 - momentum) * running.astype(np.float64) + momentum * batch_value


@np.errstate(invalid="ignore", over="ignore")
def forward_training(x, gamma, beta, layout: Layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False, residual=None,
                     epilogue=None):
    """y = act(gamma * (x - mu) / sqrt(var + eps) + beta + residual) with the batch's mu and
    biased var.

    Returns ``(y, mean, invstd, bad)``; ``mean`` and ``invstd`` have ``layout.param_shape``;
    ``bad`` is the mask of non-finite channels when ``check_finite``, else None.
    """
    sdt = stats_dtype(x.dtype)
    m, mu, m2 = moments(x, layout)
    if m == 0:  # zero-size input: saved statistics 0, running statistics unchanged
        zeros = np.zeros(layout.param_shape, dtype=sdt)
        bad = np.zeros(layout.param_shape, dtype=bool) if check_finite else None
        return _write(np.empty(x.shape), out, x.dtype), zeros, zeros.copy(), bad
    var = m2 / m                                                  # var = sum((x-mu)^2) / M
    invstd = inverse_std(var, eps)
    y = apply(x, mu, invstd, gamma, beta, layout, residual=residual, epilogue=epilogue,
              out=out)
    _update_running(running_mean, momentum, mu)
    _update_running(running_var, momentum, var * m / (m - 1))  # unbiased for the average
    mean, invstd = mu.astype(sdt), invstd.astype(sdt)
    bad = nonfinite_channels(y, mean, invstd, layout) if check_finite else None
    return y, mean, invstd, bad


def forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out=None,
                      residual=None, epilogue=None):
    """y = act(gamma * (x - mean) / sqrt(var + eps) + beta + residual), given statistics."""
    invstd = inverse_std(np.asarray(var, dtype=np.float64), eps)
    return apply(x, mean, invstd, gamma, beta, layout, residual=residual, epilogue=epilogue,
                 out=out)


def backward(dy, x, gamma, mean, invstd, layout: Layout, *, training=True, out=None, y=None,
             beta=None, epilogue=None, residual=False, out_dz=None):
    """dx, dgamma, dbeta (and dz when ``residual``) from dy and the saved mean / invstd.

    Training:  dx = gamma * invstd * (g - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * g          (mean and invstd are constants)
    with g = dy * act'(pre), dbeta = sum(g), dgamma = sum(g * xhat) (contract §1, §8).
    ``dgamma`` is None when ``gamma`` is None. ``y`` is the forward's output, needed with an
    activation; ``x`` may be None when ``y`` and ``beta`` are given (memory-saving mode).
    """
    sdt = stats_dtype(dy.dtype)
    sums = grad_sums(dy, x, mean, invstd, layout, y=y, gamma=gamma, beta=beta,
                     epilogue=epilogue)
    dx, dz = grad_apply(dy, x, mean, invstd, gamma, sums, layout, count=layout.count,
                        training=training, y=y, beta=beta, epilogue=epilogue, out=out,
                        out_dz=out_dz, want_dz=residual)
    dgamma = None if gamma is None else sums[1].astype(sdt)
    grads = (dx, dgamma, sums[0].astype(sdt))
    return grads + (dz,) if residual else grads


def nonfinite_channels(y: np.ndarray, mean: np.ndarray, invstd: np.ndarray,
                       layout: Layout) -> np.ndarray:
    """Boolean ``param_shape`` mask of channels whose statistics or output are not finite."""
    bad = ~(np.isfinite(mean) & np.isfinite(invstd))
    if y.size:
        bad = bad | ~np.isfinite(y).all(axis=layout.reduce_axes).reshape(layout.param_shape)
    return bad
