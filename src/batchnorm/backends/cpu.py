"""The CPU backend: Numba kernels (see ``_cpu_kernels``) behind the protocol's signatures
(:mod:`batchnorm.backends.protocol`): the whole calls as single-read composites, the phases
for SyncBatchNorm, both with the epilogue (residual add, relu / leaky_relu) and the
memory-saving mode (``out=x`` forward, ``x=None`` backward) of contract §8.

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


def _slope(epilogue, kdt: np.dtype):
    """The kernels' activation argument: None for none, else the slope in their dtype (0 for
    relu), negative inputs being multiplied by it (contract §8)."""
    return None if epilogue is None else kdt.type(epilogue.slope)


class Plan:
    """The kernels' view of every array of one (shape, strides, dtype) under one layout.

    ``view(a)`` gives the rows (``rows`` True) or cmajor view of such an array with one
    transpose and one reshape, both views; ``direct`` is False when no such recipe exists
    (float16, an empty input, kept axes apart that a reshape cannot merge), and calls then
    take the general path, which decides (and copies) per call. :meth:`train`,
    :meth:`infer` and :meth:`grad` run the kernels on arrays the plan takes (the torch
    layer calls them directly); their epilogue arguments are keyword-only, as in the
    module's functions.
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

    def view(self, a: np.ndarray | None) -> np.ndarray | None:
        """The kernels' view of ``a`` (an array of this plan's shape, strides and dtype)."""
        if a is None:
            return None
        if self.perm is not None:
            a = a.transpose(self.perm)
        return a.reshape(self.vshape)

    def takes(self, a: np.ndarray) -> bool:
        """Whether ``a`` can use this plan's views (same strides and dtype as its x)."""
        return self.direct and a.strides == self.strides and a.dtype == self.dtype

    def runs(self, out, *inputs) -> bool:
        """Whether a call with these inputs (None for absent ones) and output (None: a fresh
        one) runs on this plan's views."""
        if not self.direct or not (self.fresh if out is None else self.takes(out)):
            return False
        for a in inputs:
            if a is not None and not self.takes(a):
                return False
        return True

    # The computations on arrays this plan takes: x, y, dy, dx, the residual and dz all
    # with its strides (the caller checks, see runs), per-channel arguments as in the
    # module's functions.

    def train(self, x, gamma, beta, eps, momentum, running_mean, running_var, y, check, *,
              residual=None, epilogue=None):
        """:func:`forward_training` into ``y``; returns ``(mean, invstd, bad)``."""
        st, p = _train_kernels(self.rows, self.view(x), self.view(y), self.view(residual),
                               gamma, beta, eps, check, _slope(epilogue, self.kdt), self.nc,
                               self.size)
        _update_running(running_mean, running_var, momentum, st, self.layout.count)
        return _train_result(st, p, self.sdt, self.pshape, check)

    def infer(self, x, gamma, beta, mean, var, eps, y, *, residual=None, epilogue=None
              ) -> None:
        """:func:`forward_inference` into ``y``."""
        nc = self.nc
        p = np.empty((K.NP, nc), dtype=self.kdt)
        K.inference_consts(_read(mean, nc), _read(var, nc), _read(gamma, nc), _read(beta, nc),
                           eps, p)
        _apply_kernels(self.rows, self.view(x), p, self.view(y), self.view(residual),
                       _slope(epilogue, self.kdt), self.size)

    def grad(self, dy, x, gamma, mean, invstd, training, dx, *, y=None, beta=None,
             epilogue=None, dz=None):
        """:func:`backward` into ``dx``; returns ``(dgamma or None, dbeta)``.

        ``dz`` receives the residual's gradient and is given exactly when the forward had a
        residual. ``x`` None: the memory-saving mode. With an activation, no residual and
        ``beta`` given, act' is taken from x (y read only near pre = 0), see
        :func:`backward`."""
        slope = _slope(epilogue, self.kdt)
        xact = _x_route(x, slope, beta, dz is not None, self.dtype)
        dg, db = _grad_kernels(self.rows, self.view(dy), self.view(x),
                               self.view(_y_read(x, y, slope)), slope, xact, mean, invstd,
                               gamma, beta, bool(training), self.view(dx), self.view(dz),
                               self.nc, self.sdt, self.size)
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


# ---- the kernels of each computation, on views chosen by a plan or by the general path


def _train_kernels(rows, x, y, z, gamma, beta, eps, check, slope, nc, size):
    """Statistics and y = act(xhat * gamma + beta + z) on kernel views; returns (st, p)."""
    st = np.empty((4, nc))
    p = np.empty((K.NP, nc), dtype=x.dtype)
    p[K.SCALE] = 1.0 if gamma is None else gamma.reshape(nc)
    p[K.SHIFT] = 0.0 if beta is None else beta.reshape(nc)
    fam, nt = _family(size)
    if rows:
        fam.fwd_train_rows(x, float(eps), y, st, p, bool(check), nt, z, slope)
    else:
        fam.fwd_train_cmajor(x, float(eps), y, st, p, bool(check), nt, BLOCK_BYTES, z, slope)
    return st, p


def _train_result(st, p, sdt, pshape, check, bad_y=None):
    """``(mean, invstd, bad)`` of a training forward from the kernels' st and p."""
    mean, _, invstd, acc = st
    bad = None
    if check:
        bad = ~(np.isfinite(mean) & np.isfinite(invstd)) | (acc != 0.0)
        if bad_y is not None:
            bad |= bad_y
        bad = bad.reshape(pshape)
    if p.dtype == sdt:  # the kernel stored both rounded to x's dtype already
        mean, invstd = p[K.MU_HI], p[K.INV]
    else:
        mean, invstd = mean.astype(sdt), invstd.astype(sdt)
    if len(pshape) > 1:
        mean, invstd = mean.reshape(pshape), invstd.reshape(pshape)
    return mean, invstd, bad


def _apply_kernels(rows, x, p, y, z, slope, size):
    """y = act((x - mu_hi) * scale + shift + z) with the constants p, on kernel views."""
    fam, nt = _family(size)
    if rows:
        fam.apply_rows(x, p, y, _ST0, False, nt, z, slope)
    else:
        fam.affine_cmajor(x, p, y, nt, z, slope)


def _y_read(x, y, slope):
    """The y that backward reads: for act' (an activation) or for xhat (no x), else none."""
    return y if x is None or slope is not None else None


def _channel_args(x, mean, invstd, gamma, beta, nc, xact=False):
    """The backward kernels' per-channel arguments: float64 [C] arrays, gamma empty for
    None; beta read when x is None (xhat recovered from y) or by the x route, mean unless
    x is None."""
    recover = x is None
    return (_EMPTY if recover else _f64(mean, nc), _f64(invstd, nc), _f64(gamma, nc),
            _f64(beta, nc) if recover or xact else _EMPTY)


def _x_route(x, slope, beta, residual, dtype) -> bool:
    """Whether backward takes act' from x (``_cpu_kernels``' x route): an activation, no
    residual (pre is then a function of x and the statistics), x and beta given, and y not
    float16 (rounding a tiny positive pre to float16 may give y = 0)."""
    return (slope is not None and x is not None and beta is not None and not residual
            and dtype != np.float16)


def _grad_kernels(rows, dy, x, y, slope, xact, mean, invstd, gamma, beta, training, dx, dz,
                  nc, sdt, size):
    """The fused backward on kernel views; returns (dgamma, dbeta) as [C] in sdt."""
    args = _channel_args(x, mean, invstd, gamma, beta, nc, xact)
    dgb = np.empty((2, nc), dtype=sdt)
    fam, nt = _family(size)
    if rows:
        fam.bwd_rows(dy, x, y, slope, xact, *args, training, dx, dz, dgb, nt)
    else:
        fam.bwd_cmajor(dy, x, y, slope, xact, *args, training, dx, dz, dgb, nt, BLOCK_BYTES)
    return dgb[0], dgb[1]


# ---- the whole calls


def forward_training(x, gamma, beta, layout: Layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False, residual=None,
                     epilogue=None, plan_=None):
    """y = act(gamma * (x - mu) / sqrt(var + eps) + beta + residual) with the batch's mu and
    biased var, in one read of x (and of the residual) where the block fits the cache.

    Args:
        x: [layout.shape] input; gamma, beta: [param_shape] or None.
        running_mean, running_var: [param_shape] updated in place when given.
        out: optional [layout.shape] array of x's dtype that receives y; x itself for the
            memory-saving mode (y written over x, element by element after the statistics).
        residual: optional [layout.shape] array of x's dtype added before the activation.
        epilogue: a :class:`~batchnorm._shapes.Epilogue` or None.
        plan_: x's :class:`Plan`, when the caller holds it (else it is looked up).

    Returns:
        ``(y, mean, invstd, bad)`` as in :func:`batchnorm.reference.forward_training`.
    """
    pl = plan(x, layout) if plan_ is None else plan_
    if pl.runs(out, residual):
        y = np.empty_like(x) if out is None else out
        mean, invstd, bad = pl.train(x, gamma, beta, float(eps), float(momentum), running_mean,
                                     running_var, y, bool(check_finite), residual=residual,
                                     epilogue=epilogue)
        return y, mean, invstd, bad
    return _forward_training(x, gamma, beta, layout, eps=eps, momentum=momentum,
                             running_mean=running_mean, running_var=running_var, out=out,
                             check_finite=check_finite, residual=residual, epilogue=epilogue)


def forward_inference(x, gamma, beta, mean, var, layout: Layout, *, eps, out=None,
                      residual=None, epilogue=None, plan_=None):
    """y = act(gamma * (x - mean) / sqrt(var + eps) + beta + residual), given statistics.

    Args:
        x: [layout.shape]; gamma, beta: [param_shape] or None; mean, var: [param_shape].
        out: optional [layout.shape] array of x's dtype that receives y (x itself allowed).
        residual, epilogue: as in :func:`forward_training`.
        plan_: x's :class:`Plan`, when the caller holds it (else it is looked up).
    """
    pl = plan(x, layout) if plan_ is None else plan_
    if pl.runs(out, residual):
        y = np.empty_like(x) if out is None else out
        pl.infer(x, gamma, beta, mean, var, float(eps), y, residual=residual,
                 epilogue=epilogue)
        return y
    nc = layout.channels
    if x.size == 0:
        return np.empty_like(x) if out is None else out
    p = np.empty((K.NP, nc), dtype=pl.kdt)
    K.inference_consts(_f64(mean, nc), _f64(var, nc), _f64(gamma, nc), _f64(beta, nc),
                       float(eps), p)
    return _general_apply(x, p, layout, residual, epilogue, out)


def backward(dy, x, gamma, mean, invstd, layout: Layout, *, training=True, out=None, y=None,
             beta=None, epilogue=None, residual=False, out_dz=None, plan_=None):
    """dx, dgamma, dbeta (and dz) from dy and the saved mean / invstd (contract §1, §8).

    With g = dy * act'(pre) (g = dy without an activation), xhat = (x - mean) * invstd:
    Training:  dx = gamma * invstd * (g - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * g
    dbeta = sum(g), dgamma = sum(g * xhat), dz = g (the residual's gradient).

    What it reads, per element (itemsize bytes each): dy and x without an activation (2);
    dy, x and y with one and a residual (3); dy and x with one, no residual and ``beta``
    given (2): act' is then taken from pre recomputed from x and the statistics, and y is
    read only for the pieces (up to a run, or 16 rows) holding an element within rounding
    of pre = 0, where it decides, so the result is y's (contract §8); without ``beta`` y
    is read (3). In the memory-saving mode (``x`` None) dy and y (2), with
    xhat = (act^-1(y) - beta) / gamma. It writes dx, and dz when ``residual``. Each block
    of channels (cmajor) or rows (rows kernels) is read twice, the second time from cache
    when the block fits.

    Args:
        dy: [layout.shape]; x: [layout.shape] or None; gamma: [param_shape] or None;
        mean, invstd: [param_shape] the saved statistics.
        out: optional [layout.shape] array of dy's dtype that receives dx.
        y: [layout.shape] the forward's output (with an activation, or x None).
        beta: [param_shape] or None, read only when x is None.
        epilogue: the forward's :class:`~batchnorm._shapes.Epilogue` or None.
        residual: whether to return dz; out_dz: optional array that receives it.
        plan_: the :class:`Plan` of x (or of y when x is None), when the caller holds it.
    Returns:
        ``(dx, dgamma or None, dbeta)``, and dz last when ``residual``; dgamma and dbeta in
        the statistics dtype.
    """
    ref = y if x is None else x
    pl = plan(ref, layout) if plan_ is None else plan_
    slope = _slope(epilogue, pl.kdt)
    yr = _y_read(x, y, slope)
    if pl.runs(out, dy, yr, x) and (not residual or pl.runs(out_dz)):
        dx = np.empty_like(dy) if out is None else out
        dz = (np.empty_like(dy) if out_dz is None else out_dz) if residual else None
        dg, db = pl.grad(dy, x, gamma, mean, invstd, training, dx, y=y, beta=beta,
                         epilogue=epilogue, dz=dz)
        return (dx, dg, db, dz) if residual else (dx, dg, db)
    return _backward(dy, x, gamma, mean, invstd, layout, training=training, out=out, y=yr,
                     beta=beta, slope=slope, residual=residual, out_dz=out_dz,
                     xact=_x_route(x, slope, beta, residual, dy.dtype))


# ---- the phases (protocol.Backend): what SyncBatchNorm runs with a collective between


def moments(x, layout: Layout):
    """``(count, mean, m2)`` per channel: M, the mean and sum((x - mean)^2), float64
    [param_shape], from shifted sums in one read of x (see ``_cpu_kernels``). Moments of
    parts merge exactly with :func:`batchnorm.backends.protocol.merge_moments`."""
    pshape, nc = layout.param_shape, layout.channels
    if x.size == 0:
        return 0, np.zeros(pshape), np.zeros(pshape)
    pl = plan(x, layout)
    if pl.direct:
        rows, xv = pl.rows, pl.view(x)
    else:
        rows, (xv,), _ = _general_views(layout, x, (x,), ())
    st = np.empty((4, nc))
    p = np.empty((K.NP, nc), dtype=xv.dtype)
    p[K.SCALE] = 1.0
    p[K.SHIFT] = 0.0
    fam, nt = _family(xv.size)
    if rows:
        fam.stats_rows(xv, 0.0, st, p, nt)
    else:
        fam.moments_cmajor(xv, st, p, nt, BLOCK_BYTES)
    m = layout.count
    return m, st[K.MEAN].reshape(pshape), (st[K.VAR] * m).reshape(pshape)


def apply(x, mean, invstd, gamma, beta, layout: Layout, *, residual=None, epilogue=None,
          out=None):
    """y = act(gamma * (x - mean) * invstd + beta + residual) in x's dtype: one read of x
    (and of the residual), one write of y. Arguments as in :func:`forward_inference`, with
    ``invstd`` [param_shape] in place of var and eps."""
    nc = layout.channels
    if x.size == 0:
        return np.empty_like(x) if out is None else out
    pl = plan(x, layout)
    p = np.empty((K.NP, nc), dtype=pl.kdt)
    K.apply_consts(_read(mean, nc), _read(invstd, nc), _read(gamma, nc), _read(beta, nc), p)
    if pl.runs(out, residual):
        y = np.empty_like(x) if out is None else out
        _apply_kernels(pl.rows, pl.view(x), p, pl.view(y), pl.view(residual),
                       _slope(epilogue, pl.kdt), pl.size)
        return y
    return _general_apply(x, p, layout, residual, epilogue, out)


def grad_sums(dy, x, mean, invstd, layout: Layout, *, y=None, gamma=None, beta=None,
              epilogue=None):
    """``(sum(g), sum(g * xhat))`` per channel, float64 [param_shape], g = dy * act'(pre).

    Reads dy and x, plus y with an activation; dy and y when ``x`` is None (the memory-saving
    mode, xhat = (act^-1(y) - beta) / gamma). Sums of parts add (SyncBatchNorm's
    all_reduce).
    """
    pshape, nc = layout.param_shape, layout.channels
    if dy.size == 0:
        return np.zeros(pshape), np.zeros(pshape)
    ref = y if x is None else x
    pl = plan(ref, layout)
    slope = _slope(epilogue, pl.kdt)
    y = _y_read(x, y, slope)
    args = _channel_args(x, mean, invstd, gamma, beta, nc)
    sums = np.empty((2, nc))
    if pl.runs(None, dy, y, x):
        rows, views = pl.rows, [pl.view(a) for a in (dy, x, y)]
    else:
        rows, views, _ = _general_views(layout, ref, (dy, x, y), ())
    fam, nt = _family(dy.size)
    if rows:
        fam.grad_sums_rows(*views, slope, *args, sums, nt)
    else:
        fam.grad_sums_cmajor(*views, slope, *args, sums, nt, BLOCK_BYTES)
    return sums[0].reshape(pshape), sums[1].reshape(pshape)


def grad_apply(dy, x, mean, invstd, gamma, sums, layout: Layout, *, count, training=True,
               y=None, beta=None, epilogue=None, out=None, out_dz=None, want_dz=False):
    """``(dx, dz)`` from dy and the channel sums of :func:`grad_sums` over ``count`` values
    per channel (the global count under SyncBatchNorm); dz = g is None unless ``want_dz``.

    Training:  dx = gamma * invstd * (g - (sum(g) + xhat * sum(g xhat)) / count)
    Inference: dx = gamma * invstd * g
    Reads as :func:`grad_sums` (inference reads no x); writes dx, and dz when asked.
    """
    nc = layout.channels
    ref = y if x is None else x
    if dy.size == 0:
        dx = np.empty_like(dy) if out is None else out
        dz = (np.empty_like(dy) if out_dz is None else out_dz) if want_dz else None
        return dx, dz
    pl = plan(ref, layout)
    slope = _slope(epilogue, pl.kdt)
    y = _y_read(x, y, slope)
    args = _channel_args(x, mean, invstd, gamma, beta, nc)
    sums = np.stack([_f64(s, nc) for s in sums])
    fam, nt = _family(dy.size)
    if pl.runs(out, dy, y, x) and (not want_dz or pl.runs(out_dz)):
        dx = np.empty_like(dy) if out is None else out
        dz = (np.empty_like(dy) if out_dz is None else out_dz) if want_dz else None
        views = [pl.view(a) for a in (dy, x, y, dx, dz)]
        rows, dsts = pl.rows, None
    else:
        outs = (out, out_dz) if want_dz else (out,)
        rows, views, dsts = _general_views(layout, ref, (dy, x, y), outs)
        views += [None] * (5 - len(views))
    dyv, xv, yv, dxv, dzv = views
    if rows:
        fam.grad_apply_rows(dyv, xv, yv, slope, *args, sums, float(count), bool(training),
                            dxv, dzv, nt)
    else:
        fam.grad_apply_cmajor(dyv, xv, yv, slope, *args, sums, float(count), bool(training),
                              dxv, dzv, nt)
    if dsts is None:
        return dx, dz
    results = [d.finish() for d in dsts]
    return results[0], results[1] if want_dz else None


# ---- the general path: arrays no plan takes (float16, odd strides, an out= or a dy in
#      another memory order than x), decided per call


def _general_views(layout: Layout, ref, inputs, outs):
    """``(rows, views, outputs)``: the kernels' views of ``inputs`` (None stays None) and of
    the outputs, all in ``ref``'s order, with ``outputs`` the :class:`_Output` of each entry
    of ``outs`` (an array to write, or None for a fresh one like ``ref``).

    An input stored in another order than ``ref`` (a channels-last x with an NCHW gradient,
    as after an average pool) is copied into ref's order by tiles (an input-sized temporary),
    which costs less than the kernels reading it with a stride. The rows kernels run when
    every view has its channels contiguous, the cmajor ones otherwise.
    """
    r3 = _compute_view(ref, layout)
    rr = _rows(r3)
    fam = _family(r3.size)[0]
    v3 = []
    for a in inputs:
        if a is None or a is ref:
            v3.append(None if a is None else r3)
            continue
        a3 = _compute_view(a, layout)
        if (rr is None) != (_rows(a3) is None) or _strided_runs(r3, a3):
            src, a3 = a3, _compute_view(np.empty_like(ref, dtype=a3.dtype), layout)
            fam.copy3(src, a3)
        v3.append(a3)
    dsts = [_Output(ref, o, layout) for o in outs]
    v3 += [d.view for d in dsts]
    if rr is not None:
        vr = [None if v is None else _rows(v) for v in v3]
        if all(r is not None for r, v in zip(vr, v3, strict=True) if v is not None):
            return True, vr, dsts
    return False, v3, dsts


def _general_apply(x, p, layout: Layout, residual, epilogue, out):
    rows, (xv, zv, yv), (dst,) = _general_views(layout, x, (x, residual), (out,))
    _apply_kernels(rows, xv, p, yv, zv, _slope(epilogue, xv.dtype), xv.size)
    return dst.finish()


def _forward_training(x, gamma, beta, layout: Layout, *, eps, momentum, running_mean,
                      running_var, out, check_finite, residual, epilogue):
    """:func:`forward_training` on the general path."""
    sdt = stats_dtype(x.dtype)
    pshape = layout.param_shape
    if x.size == 0:
        zeros = np.zeros(pshape, dtype=sdt)
        y = np.empty_like(x) if out is None else out
        bad = np.zeros(pshape, dtype=bool) if check_finite else None
        return y, zeros, zeros.copy(), bad
    rows, (xv, zv, yv), (dst,) = _general_views(layout, x, (x, residual), (out,))
    st, p = _train_kernels(rows, xv, yv, zv, gamma, beta, eps, check_finite,
                           _slope(epilogue, xv.dtype), layout.channels, xv.size)
    y = dst.finish()
    _update_running(running_mean, running_var, momentum, st, layout.count)
    bad_y = None
    if check_finite and x.dtype == np.float16:  # the float32 -> float16 cast may overflow
        bad_y = ~np.isfinite(as_3d(y, layout)).all(axis=(0, 2))
    mean, invstd, bad = _train_result(st, p, sdt, pshape, check_finite, bad_y)
    return y, mean.reshape(pshape), invstd.reshape(pshape), bad


def _backward(dy, x, gamma, mean, invstd, layout: Layout, *, training, out, y, beta, slope,
              residual, out_dz, xact):
    """:func:`backward` on the general path; ``y`` only when the kernels read it."""
    ref = y if x is None else x
    sdt = stats_dtype(dy.dtype)
    pshape = layout.param_shape
    if dy.size == 0:
        zeros = np.zeros(pshape, dtype=sdt)
        dx = np.empty_like(dy) if out is None else out
        grads = (dx, None if gamma is None else zeros.copy(), zeros)
        if residual:
            grads += (np.empty_like(dy) if out_dz is None else out_dz,)
        return grads
    outs = (out, out_dz) if residual else (out,)
    rows, views, dsts = _general_views(layout, ref, (dy, x, y), outs)
    dyv, xv, yv, dxv = views[:4]
    dzv = views[4] if residual else None
    dg, db = _grad_kernels(rows, dyv, xv, yv, slope, xact, mean, invstd, gamma, beta,
                           bool(training), dxv, dzv, layout.channels, sdt, dyv.size)
    results = [d.finish() for d in dsts]
    grads = (results[0], None if gamma is None else dg.reshape(pshape), db.reshape(pshape))
    return grads + (results[1],) if residual else grads
