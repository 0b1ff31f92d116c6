"""The CPU backend: Numba kernels (see ``_cpu_kernels``) behind the reference's signatures.

Each call views its arrays as ``(A, C, B)`` (:func:`batchnorm._shapes.as_3d`) and picks a
kernel family: per channel when ``B > 1`` (NCHW and friends), per row block when ``B == 1``
(channels-last, per-activation, ``(N, C)``). Strided inputs are used in place when NumPy can
view them as ``(A, C, B)``; when the kept axes of an ``axis=`` call are not adjacent, or a
reshape cannot be a view, the input is copied to that canonical layout first.

float16 has no arithmetic in Numba's CPU target, so float16 input is converted to float32,
computed with float32 statistics, and converted back (one temporary the size of the input).
"""

from __future__ import annotations

import numpy as np

from .._shapes import Layout, as_3d, from_3d, stats_dtype, writable_3d

try:
    import numba
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR: str | None = f"numba is not importable: {exc}"
else:
    _IMPORT_ERROR = None
    from . import _cpu_kernels as K

NAME = "cpu"
_DTYPES = (np.float16, np.float32, np.float64)
_EMPTY = np.empty(0)


def unavailable_reason(x) -> str | None:
    """None for a NumPy float16/32/64 array when Numba imports; otherwise why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not isinstance(x, np.ndarray):
        return f"the cpu backend works on NumPy arrays, got {type(x).__name__}"
    if x.dtype not in _DTYPES:
        return f"the cpu backend supports float16, float32 and float64, got {x.dtype}"
    return None


def _f64(p, n: int) -> np.ndarray:
    """A per-channel array as contiguous float64 of length n (the kernels' parameter type)."""
    return _EMPTY if p is None else np.ascontiguousarray(p, dtype=np.float64).reshape(n)


def _compute_view(arr: np.ndarray, layout: Layout) -> np.ndarray:
    """The 3-d view the kernels read; float16 goes through a float32 copy."""
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return as_3d(arr, layout)


class _Output:
    """Where a kernel writes: ``out``'s 3-d view, or a buffer copied into the result after."""

    def __init__(self, x: np.ndarray, out: np.ndarray | None, layout: Layout):
        self.result = np.empty(x.shape, dtype=x.dtype) if out is None else out
        self.layout = layout
        if x.dtype == np.float16:
            self.view, self.direct = np.empty(layout.dims3, dtype=np.float32), False
        else:
            self.view, self.direct = writable_3d(self.result, layout)

    def finish(self) -> np.ndarray:
        if not self.direct:
            from_3d(self.view, self.result, self.layout)
        return self.result


def _rows(a3: np.ndarray) -> np.ndarray:
    return a3[:, :, 0]


def _blocks(rows: int) -> int:
    # One row block per thread of Numba's pool (whatever the caller set it to).
    return max(1, min(numba.get_num_threads(), rows))


def _update_running(running, momentum: float, batch: np.ndarray) -> None:
    # running = (1 - m) * running + m * batch, in place (the caller handed it in for this)
    if running is not None:
        running[...] = (1.0 - momentum) * running.astype(np.float64) + momentum * batch.reshape(
            running.shape)


def forward_training(x, gamma, beta, layout: Layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with the batch's mu and biased var.

    Args:
        x: [layout.shape] input; gamma, beta: [param_shape] or None.
        running_mean, running_var: [param_shape] updated in place when given.
        out: optional [layout.shape] array of x's dtype that receives y.

    Returns:
        ``(y, mean, invstd, bad)`` as in :func:`batchnorm.reference.forward_training`.
    """
    sdt = stats_dtype(x.dtype)
    pshape = layout.param_shape
    nc = layout.channels
    if x.size == 0:
        zeros = np.zeros(pshape, dtype=sdt)
        y = np.empty(x.shape, dtype=x.dtype) if out is None else out
        bad = np.zeros(pshape, dtype=bool) if check_finite else None
        return y, zeros, zeros.copy(), bad

    x3 = _compute_view(x, layout)
    dst = _Output(x, out, layout)
    mean = np.empty(nc)
    var = np.empty(nc)
    invstd = np.empty(nc)
    acc = np.zeros(nc)
    args = (_f64(gamma, nc), _f64(beta, nc), gamma is not None, beta is not None, float(eps))
    if x3.shape[2] == 1:
        K.fwd_train_rows(_rows(x3), *args, _rows(dst.view), mean, var, invstd, acc,
                         bool(check_finite), _blocks(x3.shape[0]))
    else:
        K.fwd_train_cmajor(x3, *args, dst.view, mean, var, invstd, acc, bool(check_finite))
    y = dst.finish()

    m = layout.count
    _update_running(running_mean, momentum, mean)
    _update_running(running_var, momentum, var * (m / (m - 1)))  # unbiased for the average
    bad = None
    if check_finite:
        bad = ~(np.isfinite(mean) & np.isfinite(invstd)) | (acc != 0.0)
        if x.dtype == np.float16:  # the float32 -> float16 cast may overflow on its own
            bad |= ~np.isfinite(as_3d(y, layout)).all(axis=(0, 2))
        bad = bad.reshape(pshape)
    return y, mean.astype(sdt).reshape(pshape), invstd.astype(sdt).reshape(pshape), bad


def forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics.

    Args:
        x: [layout.shape]; gamma, beta: [param_shape] or None; mean, var: [param_shape].
        out: optional [layout.shape] array of x's dtype that receives y.
    """
    nc = layout.channels
    if x.size == 0:
        return np.empty(x.shape, dtype=x.dtype) if out is None else out
    mu = _f64(mean, nc)
    den = _f64(var, nc) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(den == 0.0, 0.0, 1.0 / np.sqrt(den))
    scale = inv if gamma is None else _f64(gamma, nc) * inv
    shift = np.zeros(nc) if beta is None else _f64(beta, nc)
    x3 = _compute_view(x, layout)
    dst = _Output(x, out, layout)
    if x3.shape[2] == 1:
        K.apply_rows(_rows(x3), mu, scale, shift, _rows(dst.view), _EMPTY, False,
                     _blocks(x3.shape[0]))
    else:
        K.affine_cmajor(x3, mu, scale, shift, dst.view)
    return dst.finish()


def backward(dy, x, gamma, mean, invstd, layout: Layout, *, training=True, out=None):
    """dx, dgamma, dbeta from dy and the saved mean / invstd (SPEC section 1).

    Training:  dx = gamma * invstd * (dy - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * dy
    Args:
        dy, x: [layout.shape]; gamma: [param_shape] or None; mean, invstd: [param_shape].
        out: optional [layout.shape] array of x's dtype that receives dx.
    Returns:
        ``(dx, dgamma or None, dbeta)``; dgamma and dbeta in the statistics dtype.
    """
    sdt = stats_dtype(x.dtype)
    pshape = layout.param_shape
    nc = layout.channels
    if x.size == 0:
        zeros = np.zeros(pshape, dtype=sdt)
        dx = np.empty(x.shape, dtype=x.dtype) if out is None else out
        return dx, None if gamma is None else zeros.copy(), zeros

    x3 = _compute_view(x, layout)
    dy3 = _compute_view(dy, layout)
    dst = _Output(x, out, layout)
    dgamma = np.empty(nc)
    dbeta = np.empty(nc)
    args = (_f64(mean, nc), _f64(invstd, nc), _f64(gamma, nc), gamma is not None,
            bool(training))
    if x3.shape[2] == 1:
        K.bwd_rows(_rows(dy3), _rows(x3), *args, _rows(dst.view), dgamma, dbeta,
                   _blocks(x3.shape[0]))
    else:
        K.bwd_cmajor(dy3, x3, *args, dst.view, dgamma, dbeta)
    dx = dst.finish()
    dg = None if gamma is None else dgamma.astype(sdt).reshape(pshape)
    return dx, dg, dbeta.astype(sdt).reshape(pshape)
