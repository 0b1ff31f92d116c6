"""The CPU backend: Numba kernels (see ``_cpu_kernels``) behind the reference's signatures.

Each call views its arrays as ``(A, C, B)`` (:func:`batchnorm._shapes.as_3d`) and picks a
kernel family: per row block when the channel axis is the contiguous one (``B == 1``:
channels-last, per-activation, ``(N, C)``; or an NCHW-shaped array stored channels-last),
per channel otherwise (NCHW and friends). Small inputs take serial kernels. Strided inputs
are used in place when NumPy can view them as ``(A, C, B)``; when the kept axes of an
``axis=`` call are not adjacent, or a reshape cannot be a view, the input is copied to that
canonical layout first.

Those decisions depend only on the input's shape, strides, dtype and layout, which repeat on
every step of a training loop: a :class:`Plan` makes them once per combination (see
:func:`plan`), and every call with an output and gradient in x's own memory order only
applies them. Other calls (an ``out=`` or ``dy`` in another order) decide per call.

float16 has no arithmetic in Numba's CPU target, so float16 input is converted to float32,
computed with float32 statistics, and converted back (one temporary the size of the input).
Per-channel arguments and running statistics may have any float dtype and byte order the
API accepts; the kernels read float64 copies of the former, and running statistics they
cannot write in place (float16, another byte order, odd strides) are updated by NumPy.
"""

from __future__ import annotations

import numpy as np

from .. import _compat
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
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # native byte order
_EMPTY = np.empty(0)
_ST0 = np.empty((4, 0))  # statistics rows apply_rows leaves alone


def unavailable_reason(x) -> str | None:
    """None for a NumPy float16/32/64 array when Numba imports; otherwise why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not isinstance(x, np.ndarray):
        return f"the cpu backend works on NumPy arrays, got {type(x).__name__}"
    if x.dtype not in _DTYPES or not x.dtype.isnative:
        return (f"the cpu backend supports float16, float32 and float64 in the machine's byte "
                f"order, got {x.dtype.str}")
    return None


def _f64(p, n: int) -> np.ndarray:
    """A per-channel array as contiguous float64 of length n (the kernels' parameter type)."""
    return _EMPTY if p is None else np.ascontiguousarray(p, dtype=np.float64).reshape(n)


def _read(p, n: int) -> np.ndarray:
    """A per-channel array for a kernel that converts each value to float64 as it reads it:
    itself when Numba can read it as a 1-d array, else a float64 copy (as :func:`_f64`)."""
    if p is not None and p.ndim == 1 and p.dtype in _KERNEL_DTYPES:
        return p
    return _f64(p, n)


def _compute_view(arr: np.ndarray, layout: Layout) -> np.ndarray:
    """The 3-d view the kernels read; float16 goes through a float32 copy (same strides)."""
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.flags.c_contiguous and layout.kept_adjacent:  # the common case, always a view
        return arr.reshape(layout.dims3)
    return as_3d(arr, layout)


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


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class Plan:
    """The kernels' view of every array of one (shape, strides, dtype) under one layout.

    ``view(a)`` gives the rows (``rows`` True) or cmajor view of such an array with one
    transpose and one reshape, both views; ``direct`` is False when no such recipe exists
    (float16, an empty input, kept axes apart that a reshape cannot merge), and calls then
    take the general path, which decides (and copies) per call. :meth:`train`,
    :meth:`infer` and :meth:`grad` run the kernels on arrays the plan takes.
    """

    __slots__ = ("layout", "shape", "strides", "dtype", "kdt", "sdt", "pshape", "nc", "size",
                 "multi", "direct", "rows", "perm", "vshape", "fresh")

    def __init__(self, x: np.ndarray, layout: Layout):
        self.layout = layout
        self.shape, self.strides, self.dtype = x.shape, x.strides, x.dtype
        self.sdt = stats_dtype(x.dtype)
        # the kernels' dtype: float16 is computed in float32
        self.kdt = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
        self.pshape, self.nc, self.size = layout.param_shape, layout.channels, x.size
        self.multi = len(self.pshape) > 1  # per-channel arrays need a reshape to (C,) and back
        self.direct, self.rows, self.perm, self.vshape = False, False, None, None
        self.fresh = False  # whether np.empty_like(x) has x's strides (x is dense)
        if x.size == 0 or x.dtype not in _KERNEL_DTYPES:
            return
        x3 = _compute_view(x, layout)
        if not np.may_share_memory(x3, x):
            return
        want = _rows(x3)
        rows = want is not None
        if not rows:  # cmajor: _compute_view's own recipe, replayed
            perm = None if layout.kept_adjacent else layout.perm
            want, vshape = x3, layout.dims3
        else:  # rows: the reduced axes in memory order, then the kept ones
            by_stride = sorted(layout.reduce_axes, key=lambda a: -abs(x.strides[a]))
            perm = (*by_stride, *layout.kept_axes)
            vshape = want.shape
        view = (x if perm is None else x.transpose(perm)).reshape(vshape)
        if (np.may_share_memory(view, x) and view.strides == want.strides
                and _address(view) == _address(want)):
            self.direct, self.rows, self.perm, self.vshape = True, rows, perm, vshape
            self.fresh = np.empty_like(x).strides == x.strides

    def view(self, a: np.ndarray) -> np.ndarray:
        """The kernels' view of ``a`` (an array of this plan's shape, strides and dtype)."""
        if self.perm is not None:
            a = a.transpose(self.perm)
        return a.reshape(self.vshape)

    def takes(self, a: np.ndarray) -> bool:
        """Whether ``a`` can use this plan's views (same strides and dtype as its x)."""
        return self.direct and a.strides == self.strides and a.dtype == self.dtype

    # The three computations on arrays this plan takes: x, y, dy and dx all with its strides
    # (the caller checks), per-channel arguments as in the public functions.

    def train(self, x, gamma, beta, eps, momentum, running_mean, running_var, y, check):
        """:func:`forward_training` into ``y``; returns ``(mean, invstd, bad)``."""
        nc = self.nc
        st = np.empty((4, nc))
        p = np.empty((K.NP, nc), dtype=self.kdt)
        p[K.SCALE] = 1.0 if gamma is None else gamma.reshape(nc)
        p[K.SHIFT] = 0.0 if beta is None else beta.reshape(nc)
        fam, nt = _family(self.size)
        if self.rows:
            fam.fwd_train_rows(self.view(x), eps, self.view(y), st, p, check, nt)
        else:
            fam.fwd_train_cmajor(self.view(x), eps, self.view(y), st, p, check, nt,
                                 BLOCK_BYTES)
        _update_running(running_mean, running_var, momentum, st, self.layout.count)
        mean, _, invstd, acc = st
        bad = None
        if check:
            bad = (~(np.isfinite(mean) & np.isfinite(invstd)) | (acc != 0.0)).reshape(
                self.pshape)
        if p.dtype == self.sdt:  # the kernel stored both rounded to x's dtype already
            mean, invstd = p[K.MU_HI], p[K.INV]
        else:
            mean, invstd = mean.astype(self.sdt), invstd.astype(self.sdt)
        if self.multi:
            mean, invstd = mean.reshape(self.pshape), invstd.reshape(self.pshape)
        return mean, invstd, bad

    def infer(self, x, gamma, beta, mean, var, eps, y) -> None:
        """:func:`forward_inference` into ``y``."""
        nc = self.nc
        p = np.empty((K.NP, nc), dtype=self.kdt)
        K.inference_consts(_read(mean, nc), _read(var, nc), _read(gamma, nc), _read(beta, nc),
                           eps, p)
        fam, nt = _family(self.size)
        if self.rows:
            fam.apply_rows(self.view(x), p, self.view(y), _ST0, False, nt)
        else:
            fam.affine_cmajor(self.view(x), p, self.view(y), nt)

    def grad(self, dy, x, gamma, mean, invstd, training, dx):
        """:func:`backward` into ``dx``; returns ``(dgamma or None, dbeta)``."""
        nc = self.nc
        dgb = np.empty((2, nc), dtype=self.sdt)
        p = np.empty((K.NP, nc), dtype=self.kdt)
        args = (_f64(mean, nc), _f64(invstd, nc), _f64(gamma, nc), training)
        fam, nt = _family(self.size)
        if self.rows:
            fam.bwd_rows(self.view(dy), self.view(x), *args, self.view(dx), dgb, p, nt)
        else:
            fam.bwd_cmajor(self.view(dy), self.view(x), *args, self.view(dx), dgb, p, nt,
                           BLOCK_BYTES)
        dg, db = dgb
        if self.multi:
            dg, db = dg.reshape(self.pshape), db.reshape(self.pshape)
        return None if gamma is None else dg, db


_PLANS: dict = {}
_MAX_PLANS = 256


def plan(x: np.ndarray, layout: Layout) -> Plan:
    """The cached :class:`Plan` of arrays with x's shape, strides and dtype under ``layout``."""
    key = (x.strides, x.dtype, layout)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= _MAX_PLANS:  # a workload of ever-new shapes: start over
            _PLANS.clear()
        p = _PLANS[key] = Plan(x, layout)
    return p


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


def _family(size: int):
    """(kernels, threads): serial below _SERIAL_BELOW elements, where starting the thread
    pool costs more than the work itself; else parallel on Numba's thread count."""
    if size < _SERIAL_BELOW:
        return K.SERIAL, 1
    return K.PARALLEL, _num_threads()


# Idle Numba threads spin this many times before they sleep (libgomp's own choice when it
# has more threads than cores). PyTorch's OpenMP runtime and Numba's are two teams on the
# same cores, and a training step alternates them: a Numba thread that spins on after a
# batch-norm call (libgomp's default is hundreds of times longer) holds the core that
# PyTorch's next operation needs, and the next batch-norm call then waits for a core that
# PyTorch's spinning threads hold. A short spin still covers the gap between the parallel
# regions of one call.
NUMBA_SPIN_COUNT = 1000


def _num_threads() -> int:
    # numba.get_num_threads() also checks that the pool is launched, several times the cost
    # of Numba's unchecked reader once it is (see _compat). Both answer per calling thread.
    global _num_threads
    _compat.launch_numba_threads(NUMBA_SPIN_COUNT)
    raw = _compat.numba_thread_count_reader()
    n = numba.get_num_threads()
    if raw is not None and raw() == n:
        def fast() -> int:
            n = raw()
            return n if n > 0 else numba.get_num_threads()
        _num_threads = fast
    else:  # pragma: no cover - a Numba without the reader
        _num_threads = numba.get_num_threads
    return n


def _block_bytes() -> int:
    """Bytes of x (and dy) one cmajor channel block may span: a quarter of a core's share of
    the L3, and no less than its share of the L2.

    A channel's slice is ``N`` runs of ``H*W`` elements, so a block sized to the L2 means
    short segments and a prefetcher restart at each; the L3 is fast enough for the second
    read, and blocks of a quarter of its share ran the NCHW forward faster on mid-sized
    layers than L2-sized ones (``batchnorm bench`` shows the effect by shape).
    """
    l2 = cache_level(2)
    l3 = cache_level(3)
    floor = l2[0] // l2[1] if l2 else 1 << 20
    share = l3[0] // l3[1] // 4 if l3 else 0
    return min(max(floor, share, 1 << 16), 1 << 30)  # sane bounds for odd reports


BLOCK_BYTES = _block_bytes()

# Below this many elements the serial kernels run: a parallel region's start-up (waking the
# pool, and waiting for a core when another process holds one) costs more than the work.
_SERIAL_BELOW = 1 << 16


def _flat_view(running, n: int):
    """running as a 1-d view the kernel can write, _EMPTY for None, or None when there is
    none (odd strides, or a dtype or byte order Numba cannot write)."""
    if running is None:
        return _EMPTY
    if running.dtype not in _KERNEL_DTYPES:
        return None
    if running.ndim == 1:  # the common case: already the view
        return running
    flat = running.reshape(n)
    return flat if np.may_share_memory(flat, running) else None


def _update_running(rm, rv, momentum: float, st: np.ndarray, m: int) -> None:
    """The running statistics, in place (the caller handed them in for this), each written
    in its own dtype."""
    if rm is None and rv is None:
        return
    nc = st.shape[1]
    fm, fv = _flat_view(rm, nc), _flat_view(rv, nc)
    unbias = m / (m - 1)
    if fm is not None and fv is not None:
        K.update_running(fm, fv, st, float(momentum), unbias)
        return
    # odd strides, or float16 (no arithmetic in Numba's CPU target): NumPy, in float64
    for run, batch in ((rm, st[0]), (rv, st[1] * unbias)):
        if run is not None:
            run[...] = ((1.0 - momentum) * run.astype(np.float64)
                        + momentum * batch.reshape(run.shape))


def forward_training(x, gamma, beta, layout: Layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False, plan_=None):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with the batch's mu and biased var.

    Args:
        x: [layout.shape] input; gamma, beta: [param_shape] or None.
        running_mean, running_var: [param_shape] updated in place when given.
        out: optional [layout.shape] array of x's dtype that receives y.
        plan_: x's :class:`Plan`, when the caller holds it (else it is looked up).

    Returns:
        ``(y, mean, invstd, bad)`` as in :func:`batchnorm.reference.forward_training`.
    """
    pl = plan(x, layout) if plan_ is None else plan_
    if pl.direct and (pl.fresh if out is None else pl.takes(out)):
        y = np.empty_like(x) if out is None else out
        mean, invstd, bad = pl.train(x, gamma, beta, float(eps), float(momentum), running_mean,
                                     running_var, y, bool(check_finite))
        return y, mean, invstd, bad
    return _forward_training(x, gamma, beta, layout, eps=eps, momentum=momentum,
                             running_mean=running_mean, running_var=running_var, out=out,
                             check_finite=check_finite)


def forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out=None, plan_=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics.

    Args:
        x: [layout.shape]; gamma, beta: [param_shape] or None; mean, var: [param_shape].
        out: optional [layout.shape] array of x's dtype that receives y.
        plan_: x's :class:`Plan`, when the caller holds it (else it is looked up).
    """
    pl = plan(x, layout) if plan_ is None else plan_
    if pl.direct and (pl.fresh if out is None else pl.takes(out)):
        y = np.empty_like(x) if out is None else out
        pl.infer(x, gamma, beta, mean, var, float(eps), y)
        return y
    return _forward_inference(x, gamma, beta, mean, var, layout, eps=eps, out=out)


def backward(dy, x, gamma, mean, invstd, layout: Layout, *, training=True, out=None,
             plan_=None):
    """dx, dgamma, dbeta from dy and the saved mean / invstd (contract §1).

    Training:  dx = gamma * invstd * (dy - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * dy
    Args:
        dy, x: [layout.shape]; gamma: [param_shape] or None; mean, invstd: [param_shape].
        out: optional [layout.shape] array of x's dtype that receives dx.
        plan_: x's :class:`Plan`, when the caller holds it (else it is looked up).
    Returns:
        ``(dx, dgamma or None, dbeta)``; dgamma and dbeta in the statistics dtype.
    """
    pl = plan(x, layout) if plan_ is None else plan_
    if pl.direct and pl.takes(dy) and (pl.fresh if out is None else pl.takes(out)):
        dx = np.empty_like(x) if out is None else out
        dg, db = pl.grad(dy, x, gamma, mean, invstd, bool(training), dx)
        return dx, dg, db
    return _backward(dy, x, gamma, mean, invstd, layout, training=training, out=out)


# ---- the general path: arrays no plan takes (float16, odd strides, an out= or a dy in
#      another memory order than x), decided per call


def _forward_training(x, gamma, beta, layout: Layout, *, eps, momentum, running_mean,
                      running_var, out, check_finite):
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
    fam, nt = _family(x3.size)
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


def _forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out):
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
    fam, nt = _family(x3.size)
    xr = _rows(x3)
    yr = None if xr is None else _rows(dst.view)
    if yr is not None:
        fam.apply_rows(xr, p, yr, _ST0, False, nt)
    else:
        fam.affine_cmajor(x3, p, dst.view, nt)
    return dst.finish()


def _backward(dy, x, gamma, mean, invstd, layout: Layout, *, training, out):
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
    fam, nt = _family(x3.size)
    xr = _rows(x3)
    dyr = _rows(dy3)
    if (xr is None) != (dyr is None) or _strided_runs(x3, dy3):
        # dy stored in another order than x (a channels-last x with an NCHW gradient, as
        # after an average pool): dy is copied into x's order by tiles (an input-sized
        # temporary), which costs less than the kernels reading dy with a stride
        src, dy3 = dy3, _compute_view(np.empty_like(x, dtype=dy3.dtype), layout)
        fam.copy3(src, dy3)
        dyr = _rows(dy3)
    dst = _Output(x, out, layout)
    dgb = np.empty((2, nc), dtype=sdt)
    p = np.empty((K.NP, nc), dtype=x3.dtype)
    args = (_f64(mean, nc), _f64(invstd, nc), _f64(gamma, nc), bool(training))
    dxr = None if xr is None or dyr is None else _rows(dst.view)
    if dxr is not None:
        fam.bwd_rows(dyr, xr, *args, dxr, dgb, p, nt)
    else:
        fam.bwd_cmajor(dy3, x3, *args, dst.view, dgb, p, nt, BLOCK_BYTES)
    dx = dst.finish()
    dg = None if gamma is None else dgb[0].reshape(pshape)
    return dx, dg, dgb[1].reshape(pshape)
