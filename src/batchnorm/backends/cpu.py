"""The CPU backend: Numba kernels (see ``_cpu_kernels``) behind the reference's signatures.

Each call views its arrays as ``(A, C, B)`` (:func:`batchnorm._shapes.as_3d`) and picks a
kernel family: per row block when the channel axis is the contiguous one (``B == 1``:
channels-last, per-activation, ``(N, C)``; or an NCHW-shaped array stored channels-last),
per channel otherwise (NCHW and friends). Small inputs take serial kernels. Strided inputs
are used in place when NumPy can view them as ``(A, C, B)``; when the kept axes of an
``axis=`` call are not adjacent, or a reshape cannot be a view, the input is copied to that
canonical layout first.

float16 has no arithmetic in Numba's CPU target, so float16 input is converted to float32,
computed with float32 statistics, and converted back (one temporary the size of the input).
"""

from __future__ import annotations

import numpy as np

from .._cache import cache_level
from .._shapes import Layout, as_3d, from_3d, stats_dtype

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
_ST0 = np.empty((4, 0))  # statistics rows apply_rows leaves alone


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
    """The 3-d view the kernels read; float16 goes through a float32 copy (same strides)."""
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.flags.c_contiguous and layout.kept_adjacent:  # the common case, always a view
        return arr.reshape(layout.dims3)
    return as_3d(arr, layout)


class _Output:
    """Where a kernel writes: ``out``'s 3-d view, or a buffer copied into the result after.

    A fresh result copies x's memory order (``empty_like``), so a channels-last or
    transposed input is written with the pattern it is read with.
    """

    def __init__(self, x: np.ndarray, out: np.ndarray | None, layout: Layout):
        self.result = np.empty_like(x) if out is None else out
        self.layout = layout
        if x.dtype == np.float16:
            self.view = as_3d(np.empty_like(x, dtype=np.float32), layout)
            self.direct = False
        elif self.result.flags.c_contiguous and layout.kept_adjacent:
            self.view, self.direct = self.result.reshape(layout.dims3), True
        else:
            view = as_3d(self.result, layout)
            # a reshape that had to copy gives fresh memory: write there, copy back after
            self.direct = np.may_share_memory(view, self.result)
            self.view = view if self.direct else np.empty(layout.dims3, dtype=x.dtype)

    def finish(self) -> np.ndarray:
        if not self.direct:
            from_3d(self.view, self.result, self.layout)
        return self.result


def _rows(a3: np.ndarray):
    """The ``(A*B, C)`` view of a 3-d array whose channel axis is the contiguous one, or None.

    True for B == 1 (channels-last as laid out by ``as_3d``) and for NCHW-shaped arrays
    stored channels-last (a torch ``channels_last`` tensor seen through NumPy).
    """
    na, nc, nb_ = a3.shape
    if nb_ == 1:
        return a3[:, :, 0]
    it = a3.itemsize
    s0, s1, s2 = a3.strides
    if nc > 1 and s1 == it and s2 == nc * it and (na == 1 or s0 == nb_ * s2):
        return a3.transpose(0, 2, 1).reshape(na * nb_, nc)
    return None


def _strided_runs(x3: np.ndarray, dy3: np.ndarray) -> bool:
    """True when x's runs (the B axis) are contiguous and dy's are not."""
    it = x3.itemsize
    return x3.shape[2] > 1 and x3.strides[2] == it and dy3.strides[2] != it


def _family(x3: np.ndarray):
    """(kernels, threads): serial below _SERIAL_BELOW elements, where starting the thread
    pool costs more than the work itself; else parallel on Numba's thread count."""
    if x3.size < _SERIAL_BELOW:
        return K.SERIAL, 1
    return K.PARALLEL, _num_threads()


def _num_threads() -> int:
    # numba.get_num_threads() costs ~1.5 us a call (a third of it launching checks); once the
    # pool is up, its unchecked reader costs ~0.2 us. Both are per calling thread.
    global _num_threads
    try:
        from numba.np.ufunc.parallel import _get_num_threads as raw
    except ImportError:  # pragma: no cover - a Numba without it
        raw = None
    n = numba.get_num_threads()  # launches the pool
    if raw is not None and raw() == n:
        def fast() -> int:
            n = raw()
            return n if n > 0 else numba.get_num_threads()
        _num_threads = fast
    else:  # pragma: no cover
        _num_threads = numba.get_num_threads
    return n


def _block_bytes() -> int:
    """Bytes of x (and dy) one cmajor channel block may span: a quarter of a core's share of
    the L3, and no less than its share of the L2.

    Measured on a 2-core EPYC (1 MB L2, 32 MB L3): blocks that fit L2 (256 KB) ran NCHW
    forward 2x slower on 28x28 layers than 4 MB blocks, whose second read comes from L3. A
    channel's slice is ``N`` runs of ``H*W`` elements, so a small block means short segments
    and a prefetcher restart at each; the L3 is fast enough for the second read.
    """
    l2 = cache_level(2)
    l3 = cache_level(3)
    floor = l2[0] // l2[1] if l2 else 1 << 20
    share = l3[0] // l3[1] // 4 if l3 else 0
    return min(max(floor, share, 1 << 16), 1 << 30)  # sane bounds for odd reports


BLOCK_BYTES = _block_bytes()

# (8, 64, 8, 8) (32768 elements) runs its serial kernel in ~7 us, about what two threads
# take when both cores are idle and several times that when another process holds one.
_SERIAL_BELOW = 1 << 16


def _flat_view(running, n: int):
    """running as a writable 1-d view, _EMPTY for None, or None when no view exists."""
    if running is None:
        return _EMPTY
    if running.ndim == 1:  # the common case: already the view (reshape + check cost ~0.5 us)
        return running
    flat = running.reshape(n)
    return flat if np.may_share_memory(flat, running) else None


def _update_running(rm, rv, momentum: float, st: np.ndarray, m: int) -> None:
    """The running statistics, in place (the caller handed them in for this)."""
    if rm is None and rv is None:
        return
    nc = st.shape[1]
    fm, fv = _flat_view(rm, nc), _flat_view(rv, nc)
    unbias = m / (m - 1)
    if fm is not None and fv is not None and np.float16 not in (fm.dtype, fv.dtype):
        K.update_running(fm, fv, st, float(momentum), unbias)
        return
    # odd strides, or float16 (no arithmetic in Numba's CPU target): NumPy
    for run, batch in ((rm, st[0]), (rv, st[1] * unbias)):
        if run is not None:
            run[...] = ((1.0 - momentum) * run.astype(np.float64)
                        + momentum * batch.reshape(run.shape))


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
        y = np.empty_like(x) if out is None else out
        bad = np.zeros(pshape, dtype=bool) if check_finite else None
        return y, zeros, zeros.copy(), bad

    x3 = _compute_view(x, layout)
    dst = _Output(x, out, layout)
    st = np.empty((4, nc))
    p = np.empty((K.NP, nc), dtype=x3.dtype)
    p[K.SCALE] = 1.0 if gamma is None else gamma.reshape(nc)
    p[K.SHIFT] = 0.0 if beta is None else beta.reshape(nc)
    fam, nt = _family(x3)
    check = bool(check_finite)
    xr = _rows(x3)
    yr = None if xr is None else _rows(dst.view)
    if yr is not None:
        fam.fwd_train_rows(xr, float(eps), yr, st, p, check, nt)
    else:
        fam.fwd_train_cmajor(x3, float(eps), dst.view, st, p, check, nt, BLOCK_BYTES)
    y = dst.finish()

    _update_running(running_mean, running_var, momentum, st, layout.count)
    mean, _, invstd, acc = st
    bad = None
    if check_finite:
        bad = ~(np.isfinite(mean) & np.isfinite(invstd)) | (acc != 0.0)
        if x.dtype == np.float16:  # the float32 -> float16 cast may overflow on its own
            bad |= ~np.isfinite(as_3d(y, layout)).all(axis=(0, 2))
        bad = bad.reshape(pshape)
    if p.dtype == sdt:  # the kernel stored both rounded to x's dtype already
        return y, p[K.MU_HI].reshape(pshape), p[K.INV].reshape(pshape), bad
    return y, mean.astype(sdt).reshape(pshape), invstd.astype(sdt).reshape(pshape), bad


def forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics.

    Args:
        x: [layout.shape]; gamma, beta: [param_shape] or None; mean, var: [param_shape].
        out: optional [layout.shape] array of x's dtype that receives y.
    """
    nc = layout.channels
    if x.size == 0:
        return np.empty_like(x) if out is None else out
    x3 = _compute_view(x, layout)
    p = np.empty((K.NP, nc), dtype=x3.dtype)
    K.inference_consts(_f64(mean, nc), _f64(var, nc), _f64(gamma, nc), _f64(beta, nc),
                       float(eps), p)
    dst = _Output(x, out, layout)
    fam, nt = _family(x3)
    xr = _rows(x3)
    yr = None if xr is None else _rows(dst.view)
    if yr is not None:
        fam.apply_rows(xr, p, yr, _ST0, False, nt)
    else:
        fam.affine_cmajor(x3, p, dst.view)
    return dst.finish()


def backward(dy, x, gamma, mean, invstd, layout: Layout, *, training=True, out=None):
    """dx, dgamma, dbeta from dy and the saved mean / invstd (contract §1).

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
        dx = np.empty_like(x) if out is None else out
        return dx, None if gamma is None else zeros.copy(), zeros

    x3 = _compute_view(x, layout)
    dy3 = _compute_view(dy, layout)
    fam, nt = _family(x3)
    xr = _rows(x3)
    dyr = _rows(dy3)
    if (xr is None) != (dyr is None) or _strided_runs(x3, dy3):
        # dy stored in another order than x (a channels-last x with an NCHW gradient, as
        # after an average pool): dy is copied into x's order (an input-sized temporary)
        # by tiles; with the fast kernels after it, (32, 32, 32, 32) takes 1.3 ms where
        # reading dy with a stride took 1.7 ms (0.27 ms with both in one order)
        src, dy3 = dy3, _compute_view(np.empty_like(x, dtype=dy3.dtype), layout)
        fam.copy3(src, dy3)
        dyr = _rows(dy3)
    dst = _Output(x, out, layout)
    dgb = np.empty((2, nc))
    p = np.empty((K.NP, nc), dtype=x3.dtype)
    args = (_f64(mean, nc), _f64(invstd, nc), _f64(gamma, nc), bool(training))
    dxr = None if xr is None or dyr is None else _rows(dst.view)
    if dxr is not None:
        fam.bwd_rows(dyr, xr, *args, dxr, dgb, p, nt)
    else:
        fam.bwd_cmajor(dy3, x3, *args, dst.view, dgb, p, nt, BLOCK_BYTES)
    dx = dst.finish()
    dg = None if gamma is None else dgb[0].astype(sdt).reshape(pshape)
    return dx, dg, dgb[1].astype(sdt).reshape(pshape)
