"""Numba kernels of the CPU backend, on the canonical ``(A, C, B)`` view.

Two data orders, two kernel families:

* ``*_cmajor`` (B > 1, e.g. NCHW): a channel's values are ``A`` runs of ``B`` contiguous
  elements. Threads take blocks of whole channels sized to a share of the cache; a block's
  statistics are taken in one read and the block is normalized right after, while its
  slice is still in this core's cache (the ``spatial_persistent`` algorithm; ``spatial``
  is the same code).
* ``*_rows`` (channels-last and per-activation, a ``(rows, C)`` matrix with C contiguous):
  threads take blocks of rows and keep per-thread partial sums of length C (vectorized
  across channels), merged once; the apply pass then revisits the same rows on the same
  thread, so its second read of x comes from that thread's cache when the block fits.

The whole calls (``fwd_train_*``, ``bwd_*``) are single-read composites; the phases of
:mod:`batchnorm.backends.protocol` (``moments_*``, ``affine_*`` / ``apply_rows``,
``grad_sums_*``, ``grad_apply_*``) are their parts, run one after another with a collective
in between under SyncBatchNorm. Both run the same per-block helpers.

Statistics are shifted sums of ``d = x - k`` (``k`` in x's dtype near the channel's start:
its first value for cmajor, the mean of its first ROWS_CHUNK rows for rows; ``x - k`` is
exact by Sterbenz's lemma when x is within a factor 2 of k, and otherwise rounded relative
to d itself), summed in x's dtype over short pieces (RUN_CHUNK elements of a run,
ROWS_CHUNK rows), where SIMD lanes keep each partial to a few terms, and in float64 across
pieces. ``var = E[d^2] - E[d]^2`` magnifies the partials' rounding by
``1 + ((mu-k)/sigma)^2``; when that exceeds 1 + REFINE (an outlying first value) the
channel's sums are taken again around its mean. A constant channel gives exactly 0.
A channel whose sums come out Inf or NaN is summed again with every term in float64: its
float32 partials overflow when ``|x - k|`` passes ~1e19 (a spread float64 holds easily), and
an Inf or NaN in x gives the same statistics either way. Finite channels pay one test.

The element-wise passes run in x's dtype (twice the SIMD width of float64 for float32) with
the mean split in two: ``y = (x - mu_hi) * scale + (beta - mu_lo * scale)`` where ``mu_hi``
is mu rounded to x's dtype (``x - mu_hi`` is exact near the mean, by Sterbenz) and ``mu_lo``
the rest, folded into the shift in float64: a large mean costs no output digits, and the
pass streams only three per-channel constants. When every channel has ``|mu_hi * scale| <= 1``
the rows kernels stream two instead, ``y = x * scale + (beta - mu * scale)``: the one
rounding of that shift is then no larger than the rounding the three-constant form makes
anyway, and the pass does less work (the constants are vectors there, one load each).
The per-channel constants of those passes live in ``p`` (rows below, x's dtype).

The epilogue (contract §8) is one description every kernel reads: ``z``, the residual
(an array of x's view, or None), and ``slope``, the activation (None for none; a scalar of
x's dtype: 0 for relu, the negative slope for leaky_relu), applied as
``v if v > 0 else v * slope`` (NaN stays NaN). The element-wise steps that depend on them
are small functions resolved by argument type when Numba compiles a kernel (``_act``,
``_plus``, ...; an argument that is None makes its step vanish), so each kernel is written
once and plain batch norm compiles to the same loops as without an epilogue. Backward reads
the activation's derivative off y's sign (``y`` an array, or None without an activation),
and with ``x`` None (the memory-saving mode) recovers x's place from y: the per-channel
origin and unit of xhat become beta and 1 / gamma instead of mean and invstd,
``xhat = (act^-1(y) - beta) / gamma``.

The x route (``xact``, backward of an activation without a residual, given beta): act' is
taken from pre recomputed from x and the statistics, which is within rounding of the
forward's pre (see XROUTE_ULPS). A piece (RUN_CHUNK elements of a run in the sums pass, a
whole run in the cmajor apply pass, ROWS_CHUNK rows in the rows kernels) is computed by the
x route while its elements whose recomputed pre lies within the band of 0 where rounding
could flip its sign are counted, and computed again off y's sign (overwriting it) in the
rare case that there is one. The result is the y route's (act' read off y's sign, contract
§8), and y is read for those pieces alone: one stream less out of dy, x and y, which pays
when the tensors stream from memory; on a cache-resident input the recomputation's
arithmetic can cost more than the read of y it saves (``batchnorm bench --pair`` shows both).

``bad`` collects ``sum(y * 0)`` per channel (of the stored y) when asked: 0 for finite
outputs, NaN as soon as one output is Inf or NaN, so ``check_finite`` needs no extra pass.
(Not ``y - y``: with reassociation allowed LLVM may rewrite ``acc + (y - y)`` as ``acc``;
``y * 0`` folds to 0 only under no-NaN/no-Inf flags, which are never set here.)

Every kernel exists twice: parallel (``prange`` over threads) and ``*_serial`` for small
inputs, where starting the thread pool costs more than the work.
"""

from __future__ import annotations

import types

import numba as nb
import numpy as np
from numba import prange
from numba.core import types as nbt
from numba.extending import overload

# reassoc lets LLVM vectorize the reductions; no nnan/ninf: NaN and Inf must propagate.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_OPTS = dict(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)

# rows of the per-channel parameter array p (x's dtype); INV doubles as the saved invstd;
# backward's x route (see XROUTE_ULPS) keeps the forward's scale and shift, and the bound
# under which pre recomputed from them may have another sign than the forward's
MU_HI, FOLD, SCALE, SHIFT, K3, INV, FSC, FSH, TOL = range(9)
NP = 9
FOLD_LIMIT = 1.0  # the rows apply folds mu into the shift when all |mu_hi * scale| <= this
BLOCKS_PER_THREAD = 4  # at least this many cmajor channel blocks per thread (balance)
TILE = 16  # copy3's tile edge: 16 float32 are one 64-byte cache line
ROWS_CHUNK = 16  # rows summed in x's dtype before a float64 fold (rows kernels)
# a shift further than this many variances (squared sigmas) from the mean costs more than
# 4 of the float32 partials' 24 bits: the channel's sums are then taken again around its mean
REFINE = 16.0
WIDE_ROWS = 1024  # channels from which the rows statistics sweep 4 rows at once
RUN_CHUNK = 256  # cmajor run pieces summed in x's dtype before a float64 fold
# backward's x route: pre recomputed from x and the saved statistics is within rounding of
# the forward's, a few units u of x's dtype relative to |(x - mu) * scale| + |shift| +
# |mu * scale| (the saved invstd and mean are rounded, the forward's shift holds mu's low
# part, the rows forward may fold mu into its shift). With |(x - mu) * scale| <=
# |pre| + |shift|, the sign is sure where |pre| > TOL = K u (2 |shift| + |mu * scale|) /
# (1 - K u), K = XROUTE_ULPS (2^7 units of margin).
XROUTE_ULPS = 128.0
# rows of the float64 statistics array st
MEAN, VAR, INVSTD, BAD = 0, 1, 2, 3
# rows of the float64 backward constants array q: the origin and unit of xhat, and mu_lo
ORG, UNIT, OLO = 0, 1, 2
NQ = 3


# ---------------------------------------------------------------------------- the epilogue
#
# Each step below is a stub that Numba replaces, per argument types, by one of two bodies
# (``overload``; LLVM inlines them into the loops): the step for an array or a scalar, or
# nothing at all for None.


def _none(t) -> bool:
    return isinstance(t, nbt.NoneType)


def _part(a, i):
    """a[i]: a run or a row of an optional array (None stays None)."""


def _run(a, i, j):
    """a[i, j]: a run of an optional cmajor array (None stays None)."""


def _piece(a, i0, i1):
    """a[i0:i1] of an optional 1-d array (None stays None)."""


def _plus(v, zr, b):
    """v + zr[b], the residual add (v without a residual)."""


def _act(v, slope):
    """act(v): v if v > 0 else v * slope (v itself without an activation)."""


def _grad(h, yr, b, slope):
    """g = h * act'(pre), act' read off y's sign: h where y > 0, h * slope elsewhere."""


def _act_at(h, pre, slope):
    """h * act'(pre) from pre itself: h where pre > 0, h * slope elsewhere."""


def _unact_slope(x, slope, one):
    """The factor act^-1 applies to negative y: 1 / slope when x must be recovered from y
    through leaky_relu, else None."""


def _u(xr, yr, b, rs):
    """The value xhat is taken from: x, or act^-1(y) in the memory-saving mode."""


def _put(dr, b, v):
    """dr[b] = v for an optional output (dz)."""


def _grad3(h, y, a, c, b, slope):
    """:func:`_grad` on element (a, c, b) of a cmajor y."""


def _u3(x, y, a, c, b, rs):
    """:func:`_u` on element (a, c, b) of cmajor x or y."""


def _put3(d, a, c, b, v):
    """d[a, c, b] = v for an optional cmajor output (dz)."""


@overload(_part)
def _part_impl(a, i):
    return (lambda a, i: None) if _none(a) else (lambda a, i: a[i])


@overload(_run)
def _run_impl(a, i, j):
    return (lambda a, i, j: None) if _none(a) else (lambda a, i, j: a[i, j])


@overload(_piece)
def _piece_impl(a, i0, i1):
    return (lambda a, i0, i1: None) if _none(a) else (lambda a, i0, i1: a[i0:i1])


@overload(_plus)
def _plus_impl(v, zr, b):
    return (lambda v, zr, b: v) if _none(zr) else (lambda v, zr, b: v + zr[b])


@overload(_act)
def _act_impl(v, slope):
    if _none(slope):
        return lambda v, slope: v
    return lambda v, slope: v if v > 0 else v * slope


@overload(_grad)
def _grad_impl(h, yr, b, slope):
    if _none(slope):
        return lambda h, yr, b, slope: h
    return lambda h, yr, b, slope: h if yr[b] > 0 else h * slope


@overload(_act_at)
def _act_at_impl(h, pre, slope):
    if _none(slope):
        return lambda h, pre, slope: h
    return lambda h, pre, slope: h if pre > 0 else h * slope


@overload(_unact_slope)
def _unact_slope_impl(x, slope, one):
    if _none(x) and not _none(slope):
        return lambda x, slope, one: one / slope
    return lambda x, slope, one: None


@overload(_u)
def _u_impl(xr, yr, b, rs):
    if not _none(xr):
        return lambda xr, yr, b, rs: xr[b]
    if _none(rs):
        return lambda xr, yr, b, rs: yr[b]
    return lambda xr, yr, b, rs: yr[b] if yr[b] > 0 else yr[b] * rs


@overload(_grad3)
def _grad3_impl(h, y, a, c, b, slope):
    if _none(slope):
        return lambda h, y, a, c, b, slope: h
    return lambda h, y, a, c, b, slope: h if y[a, c, b] > 0 else h * slope


@overload(_u3)
def _u3_impl(x, y, a, c, b, rs):
    if not _none(x):
        return lambda x, y, a, c, b, rs: x[a, c, b]
    if _none(rs):
        return lambda x, y, a, c, b, rs: y[a, c, b]
    return lambda x, y, a, c, b, rs: y[a, c, b] if y[a, c, b] > 0 else y[a, c, b] * rs


@overload(_put3)
def _put3_impl(d, a, c, b, v):
    if _none(d):
        return lambda d, a, c, b, v: None

    def put(d, a, c, b, v):
        d[a, c, b] = v
    return put


@overload(_put)
def _put_impl(dr, b, v):
    if _none(dr):
        return lambda dr, b, v: None

    def put(dr, b, v):
        dr[b] = v
    return put


# The x route of the rows kernels, by chunks of rows (see the module notes; the cmajor
# kernels have it inline). Each computes its rows from x in one pass and counts the
# elements whose recomputed pre lies within the margin of 0; it returns False when there is
# one (or without an x or an activation: no x route), and the caller then computes the
# rows again by the y route, overwriting what was written.


def _rows_sums_x(dy, x, q0, q1, slope, p, t1, t2, zero, one):
    """t1 += g, t2 += g * (x - mh) over rows [q0, q1) of rows views by the x route;
    whether it was done (the caller sums the rows again from t1 = t2 = 0 when not)."""


def _rows_apply_x(dy, x, dx, q0, q1, slope, p, training, zero, one):
    """dx of rows [q0, q1) of rows views by the x route; whether it was done."""


_XOPTS = dict(jit_options=dict(fastmath=_FAST, error_model="numpy"))
# (the count of elements within the margin is kept in x's dtype: an integer count stops
# LLVM vectorizing the loop)


@overload(_rows_sums_x, **_XOPTS)
def _rows_sums_x_impl(dy, x, q0, q1, slope, p, t1, t2, zero, one):
    if _none(x) or _none(slope):
        return lambda dy, x, q0, q1, slope, p, t1, t2, zero, one: False

    def sums(dy, x, q0, q1, slope, p, t1, t2, zero, one):
        mh = p[MU_HI]
        sc = p[FSC]
        sh = p[FSH]
        tol = p[TOL]
        amb = zero
        for r in range(q0, q1):
            gr = dy[r]
            xr = x[r]
            for c in range(xr.size):
                d = xr[c] - mh[c]
                pre = d * sc[c] + sh[c]
                amb += one if abs(pre) <= tol[c] else zero
                h = gr[c] if pre > 0 else gr[c] * slope
                t1[c] += h
                t2[c] += h * d
        return amb == 0
    return sums


@overload(_rows_apply_x, **_XOPTS)
def _rows_apply_x_impl(dy, x, dx, q0, q1, slope, p, training, zero, one):
    if _none(x) or _none(slope):
        return lambda dy, x, dx, q0, q1, slope, p, training, zero, one: False

    def apply(dy, x, dx, q0, q1, slope, p, training, zero, one):
        mh = p[MU_HI]
        sc = p[FSC]
        sh = p[FSH]
        tol = p[TOL]
        k1 = p[SCALE]
        k2 = p[SHIFT]
        k3 = p[K3]
        amb = zero
        for r in range(q0, q1):
            gr = dy[r]
            xr = x[r]
            dxr = dx[r]
            if training:
                for c in range(xr.size):
                    d = xr[c] - mh[c]
                    pre = d * sc[c] + sh[c]
                    amb += one if abs(pre) <= tol[c] else zero
                    h = gr[c] if pre > 0 else gr[c] * slope
                    dxr[c] = k1[c] * h + k2[c] * d + k3[c]
            else:
                for c in range(xr.size):
                    d = xr[c] - mh[c]
                    pre = d * sc[c] + sh[c]
                    amb += one if abs(pre) <= tol[c] else zero
                    dxr[c] = k1[c] * (gr[c] if pre > 0 else gr[c] * slope)
        return amb == 0
    return apply


@nb.njit(**_OPTS)
def _finish_stats(s1, s2, k, m, eps, c, st, p):
    """Mean, biased var, invstd of channel c from shifted sums; its apply constants in p.

    On entry p[SCALE, c] and p[SHIFT, c] hold gamma and beta (1 and 0 without affine).
    """
    dm = s1 / m
    v = s2 / m - dm * dm
    if v < 0.0:  # rounding only; keeps NaN
        v = 0.0
    mu = k + dm
    den = v + eps
    inv = 0.0 if den == 0.0 else 1.0 / np.sqrt(den)
    st[MEAN, c] = mu
    st[VAR, c] = v
    st[INVSTD, c] = inv
    p[INV, c] = inv
    _affine_consts(mu, inv * np.float64(p[SCALE, c]), np.float64(p[SHIFT, c]), c, p)


@nb.njit(**_OPTS)
def _affine_consts(mu, sc, beta, c, p):
    """The apply constants of channel c into p: y = (x - mu_hi) * scale + shift, and the
    folded form's x * scale + fold (see the module notes)."""
    p[MU_HI, c] = mu
    p[SCALE, c] = sc
    sc = np.float64(p[SCALE, c])
    # ((x - mu_hi) - mu_lo) * scale + beta == (x - mu_hi) * scale + (beta - mu_lo * scale)
    p[SHIFT, c] = beta - (mu - np.float64(p[MU_HI, c])) * sc
    p[FOLD, c] = beta - mu * sc


@nb.njit(**_OPTS)
def inference_consts(mean, var, gamma, beta, eps, p):
    """Inference apply constants into p from given statistics (float32 or float64 arrays,
    each value taken to float64 as it is read; gamma and beta empty for no affine):
    scale = gamma / sqrt(var + eps), 0 where var + eps == 0."""
    for c in range(p.shape[1]):
        den = np.float64(var[c]) + eps
        inv = 0.0 if den == 0.0 else 1.0 / np.sqrt(den)
        g = np.float64(gamma[c]) if gamma.size else 1.0
        b = np.float64(beta[c]) if beta.size else 0.0
        _affine_consts(np.float64(mean[c]), inv * g, b, c, p)


@nb.njit(**_OPTS)
def apply_consts(mean, invstd, gamma, beta, p):
    """The apply phase's constants into p from a mean and an invstd (as inference_consts)."""
    for c in range(p.shape[1]):
        g = np.float64(gamma[c]) if gamma.size else 1.0
        b = np.float64(beta[c]) if beta.size else 0.0
        _affine_consts(np.float64(mean[c]), np.float64(invstd[c]) * g, b, c, p)


@nb.njit(**_OPTS)
def _channel_blocks(na, nc, nb_, nbytes, nt, block):
    """How many cmajor blocks to cut the channels into: enough that each fits ``block``
    bytes (nbytes per element read), at least BLOCKS_PER_THREAD per thread, and a multiple
    of the thread count. Block i holds channels [i*nc//n, (i+1)*nc//n), so the threads'
    shares differ by at most one channel a block."""
    fit = max(1, block // max(1, na * nb_ * nbytes))
    n = max((nc + fit - 1) // fit, BLOCKS_PER_THREAD * nt)
    n = (n + nt - 1) // nt * nt
    return max(1, min(n, nc))


@nb.njit(**_OPTS)
def _channel_sums(x, c, k):
    """Shifted sums (float64) of channel c of a cmajor x around k (x's dtype), in pieces."""
    na, _, nb_ = x.shape
    zero = np.zeros(1, x.dtype)[0]
    s1 = 0.0
    s2 = 0.0
    for a in range(na):
        run = x[a, c]
        for b0 in range(0, nb_, RUN_CHUNK):
            seg = run[b0:b0 + RUN_CHUNK]
            u1 = zero
            u2 = zero
            for b in range(seg.size):
                e = seg[b] - k
                u1 += e
                u2 += e * e
            s1 += np.float64(u1)
            s2 += np.float64(u2)
    return s1, s2


@nb.njit(**_OPTS)
def _channel_sums64(x, c, k):
    """Shifted sums of channel c of a cmajor x around k, every term in float64.

    For the channels whose x's-dtype partials overflowed (see WIDE in the module notes).
    """
    na, _, nb_ = x.shape
    s1 = 0.0
    s2 = 0.0
    for a in range(na):
        for b in range(nb_):
            e = np.float64(x[a, c, b]) - k
            s1 += e
            s2 += e * e
    return s1, s2


@nb.njit(**_OPTS)
def _column_sums64(x, c, k):
    """:func:`_channel_sums64` for column c of a rows x [R, C]."""
    s1 = 0.0
    s2 = 0.0
    for r in range(x.shape[0]):
        e = np.float64(x[r, c]) - k
        s1 += e
        s2 += e * e
    return s1, s2


@nb.njit(**_OPTS)
def _finite(s1, s2):
    return np.isfinite(s1) and np.isfinite(s2)


@nb.njit(**_OPTS)
def _needs_refine(s1, s2, m):
    """True when the shift of these sums sits over sqrt(REFINE) sigmas from the mean."""
    dm = s1 / m
    return dm * dm > REFINE * (s2 / m - dm * dm)


# ---------------------------------------------------------------------------- forward


@nb.njit(**_OPTS)
def _block_stats(x, c0, c1, eps, st, p):
    """Statistics of cmajor channels [c0, c1) into st and their apply constants into p (rows
    SCALE and SHIFT holding gamma and beta on entry): one read of the block's slice."""
    na, _, nb_ = x.shape
    m = na * nb_
    zero = np.zeros(1, x.dtype)[0]
    s1 = np.zeros(c1 - c0)
    s2 = np.zeros(c1 - c0)
    # sums in x's dtype (full SIMD width, no conversions) over at most RUN_CHUNK
    # elements of a run, float64 across them, as the rows kernels do with ROWS_CHUNK rows
    for a in range(na):
        for c in range(c0, c1):
            k = x[0, c, 0]
            run = x[a, c]
            for b0 in range(0, nb_, RUN_CHUNK):
                # a slice, not range(b0, min(...)): that bound stops LLVM vectorizing
                seg = run[b0:b0 + RUN_CHUNK]
                u1 = zero
                u2 = zero
                for b in range(seg.size):
                    e = seg[b] - k
                    u1 += e
                    u2 += e * e
                s1[c - c0] += np.float64(u1)
                s2[c - c0] += np.float64(u2)
    for c in range(c0, c1):
        k = np.float64(x[0, c, 0])
        t1 = s1[c - c0]
        t2 = s2[c - c0]
        wide = not _finite(t1, t2)
        if wide:  # partials overflowed x's dtype, or x holds Inf / NaN: float64 sums
            t1, t2 = _channel_sums64(x, c, k)
        if _needs_refine(t1, t2, m):  # an outlying first value: again around the mean
            p[MU_HI, c] = k + t1 / m
            k = np.float64(p[MU_HI, c])
            if wide:
                t1, t2 = _channel_sums64(x, c, k)
            else:
                t1, t2 = _channel_sums(x, c, p[MU_HI, c])
        _finish_stats(t1, t2, k, m, eps, c, st, p)
        st[BAD, c] = 0.0


@nb.njit(**_OPTS)
def _block_apply(x, y, p, c0, c1, check, st, z, slope):
    """y = act((x - mu_hi) * scale + shift + z) on cmajor channels [c0, c1); with check,
    st[BAD] += sum(y * 0) of the stored values (the cast to y's dtype may overflow)."""
    na, _, nb_ = x.shape
    for a in range(na):
        for c in range(c0, c1):
            mh = p[MU_HI, c]
            sc = p[SCALE, c]
            sh = p[SHIFT, c]
            xr = x[a, c]
            yr = y[a, c]
            zr = _run(z, a, c)
            if check:
                acc = 0.0
                for b in range(nb_):
                    yr[b] = _act(_plus((xr[b] - mh) * sc + sh, zr, b), slope)
                    acc += yr[b] * 0.0
                st[BAD, c] += acc
            else:
                for b in range(nb_):
                    yr[b] = _act(_plus((xr[b] - mh) * sc + sh, zr, b), slope)


def fwd_train_cmajor(x, eps, y, st, p, check, nt, block, z, slope):
    """Per block of channels: shifted sums, then y = act((x - mu) * gamma * invstd + beta + z).

    The block's slice stays in cache between the two passes; for each a its channels' runs
    are one contiguous segment, so short runs (small H*W) still stream.
    Args: x, y [A, C, B]; st [4, C] float64 out (mean, biased var, invstd, bad); p [NP, C]
    of x's dtype, rows SCALE and SHIFT holding gamma and beta on entry; nt threads; block:
    the bytes of x one block may span (see ``cpu._block_bytes``); z [A, C, B] or None;
    slope: None or the activation's slope in x's dtype.
    """
    na, nc, nb_ = x.shape
    nblk = _channel_blocks(na, nc, nb_, x.itemsize, nt, block)
    for blk in prange(nblk):
        c0 = blk * nc // nblk
        c1 = (blk + 1) * nc // nblk
        _block_stats(x, c0, c1, eps, st, p)
        _block_apply(x, y, p, c0, c1, check, st, z, slope)


def moments_cmajor(x, st, p, nt, block):
    """The moments phase: st[MEAN], st[VAR] (biased) per channel of a cmajor x [A, C, B].

    p [NP, C] scratch of x's dtype with rows SCALE = 1 and SHIFT = 0 on entry.
    """
    na, nc, nb_ = x.shape
    nblk = _channel_blocks(na, nc, nb_, x.itemsize, nt, block)
    for blk in prange(nblk):
        _block_stats(x, blk * nc // nblk, (blk + 1) * nc // nblk, 0.0, st, p)


def stats_rows(x, eps, st, p, nt):
    """Statistics of a rows x [R, C] into st, apply constants into p (rows SCALE and SHIFT
    holding gamma and beta on entry), one block of rows per thread."""
    nr, nc = x.shape
    nt = max(1, min(nt, nr))
    # the shifts: the mean of the first rows (one row would do for exactness, but an
    # outlying first row would cost float32 bits; see REFINE)
    nk = min(nr, ROWS_CHUNK)
    ka = np.zeros(nc)
    for r in range(nk):  # row by row: contiguous, vectorized across channels
        for c in range(nc):
            ka[c] += np.float64(x[r, c])
    kx = np.empty(nc, x.dtype)
    for c in range(nc):
        kx[c] = ka[c] / nk
    part = np.zeros((nt, 2, nc))
    tot = np.empty((2, nc))
    for attempt in range(2):
        for t in prange(nt):
            r0 = t * nr // nt
            r1 = (t + 1) * nr // nt
            s1 = np.zeros(nc)
            s2 = np.zeros(nc)
            # x's dtype within chunks of ROWS_CHUNK rows (twice the lanes of float64 for
            # float32), float64 across chunks: a float32 partial sums at most 16 values
            t1 = np.zeros_like(kx)
            t2 = np.zeros_like(kx)
            for q0 in range(r0, r1, ROWS_CHUNK):
                q1 = min(q0 + ROWS_CHUNK, r1)
                t1[:] = 0
                t2[:] = 0
                r = q0
                if nc >= WIDE_ROWS:
                    # wide rows: 4 rows per sweep quarter the partials' loads and stores,
                    # which otherwise bound this loop (a loss on narrow rows: their partials
                    # fit in registers anyway)
                    while r + 4 <= q1:
                        x0 = x[r]
                        x1 = x[r + 1]
                        x2 = x[r + 2]
                        x3 = x[r + 3]
                        for c in range(nc):
                            k = kx[c]
                            d0 = x0[c] - k
                            d1 = x1[c] - k
                            d2 = x2[c] - k
                            d3 = x3[c] - k
                            t1[c] += (d0 + d1) + (d2 + d3)
                            t2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                        r += 4
                for rr in range(r, q1):
                    for c in range(nc):
                        d = x[rr, c] - kx[c]
                        t1[c] += d
                        t2[c] += d * d
                for c in range(nc):
                    s1[c] += np.float64(t1[c])
                    s2[c] += np.float64(t2[c])
            part[t, 0, :] = s1
            part[t, 1, :] = s2
        again = False
        for c in range(nc):
            s1 = 0.0
            s2 = 0.0
            for t in range(nt):
                s1 += part[t, 0, c]
                s2 += part[t, 1, c]
            tot[0, c] = s1
            tot[1, c] = s2
            if attempt == 0 and _needs_refine(s1, s2, nr):
                kx[c] = np.float64(kx[c]) + s1 / nr  # this channel's mean, x's dtype
                again = True
        if not again:
            break
        # a channel's shift was far from its mean: all sums again around the new shifts
        # (the other channels' unchanged), a second read of x only such inputs pay
    _widen_rows(x, tot, kx)
    for c in range(nc):
        _finish_stats(tot[0, c], tot[1, c], np.float64(kx[c]), nr, eps, c, st, p)


def fwd_train_rows(x, eps, y, st, p, check, nt, z, slope):
    """Rows version of :func:`fwd_train_cmajor`: :func:`stats_rows`, then :func:`apply_rows`
    on the same row blocks.

    Args: x, y [R, C]; z [R, C] or None; the rest as there.
    """
    stats_rows(x, eps, st, p, nt)
    apply_rows(x, p, y, st, check, nt, z, slope)


@nb.njit(**_OPTS)
def _widen_rows(x, tot, kx):
    """As in fwd_train_cmajor: the sums of a channel that came out Inf or NaN taken again
    with float64 terms (and around its mean if the shift was far from it)."""
    nr = x.shape[0]
    for c in range(x.shape[1]):
        if _finite(tot[0, c], tot[1, c]):
            continue
        k = np.float64(kx[c])
        t1, t2 = _column_sums64(x, c, k)
        if _needs_refine(t1, t2, nr):
            kx[c] = k + t1 / nr
            t1, t2 = _column_sums64(x, c, np.float64(kx[c]))
        tot[0, c] = t1
        tot[1, c] = t2


def apply_rows(x, p, y, st, check, nt, z, slope):
    """y[r, c] = act((x[r, c] - mu_hi[c]) * scale[c] + shift[c] + z[r, c]), a row block a
    thread; or x * scale + fold when every ``|mu_hi * scale| <= FOLD_LIMIT`` (see the module
    notes).

    Also the inference and apply-phase kernel for rows. Args: x, y [R, C]; p [NP, C] as
    filled by :func:`_finish_stats`; st [4, C] (row BAD written when check); z [R, C] or
    None; slope None or the activation's slope in x's dtype.
    """
    nr, nc = x.shape
    nt = max(1, min(nt, nr))
    acc = np.zeros((nt, nc))
    mh = p[MU_HI]
    sc = p[SCALE]
    sh = p[SHIFT]
    fo = p[FOLD]
    fold = True
    for c in range(nc):
        if abs(np.float64(mh[c]) * np.float64(sc[c])) > FOLD_LIMIT:
            fold = False
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        if check:
            a = np.zeros(nc)
            for r in range(r0, r1):
                xr = x[r]
                yr = y[r]
                zr = _part(z, r)
                if fold:
                    for c in range(nc):
                        yr[c] = _act(_plus(xr[c] * sc[c] + fo[c], zr, c), slope)
                else:
                    for c in range(nc):
                        yr[c] = _act(_plus((xr[c] - mh[c]) * sc[c] + sh[c], zr, c), slope)
                for c in range(nc):
                    a[c] += yr[c] * 0.0
            acc[t, :] = a
        elif fold:
            for r in range(r0, r1):
                xr = x[r]
                yr = y[r]
                zr = _part(z, r)
                for c in range(nc):
                    yr[c] = _act(_plus(xr[c] * sc[c] + fo[c], zr, c), slope)
        else:
            for r in range(r0, r1):
                xr = x[r]
                yr = y[r]
                zr = _part(z, r)
                for c in range(nc):
                    yr[c] = _act(_plus((xr[c] - mh[c]) * sc[c] + sh[c], zr, c), slope)
    if check:
        for c in range(nc):
            s = 0.0
            for t in range(nt):
                s += acc[t, c]
            st[BAD, c] = s


def affine_cmajor(x, p, y, nt, z, slope):
    """Inference and the apply phase: y = act((x - mu_hi[c]) * scale[c] + shift[c] + z).

    Args: x, y [A, C, B]; p [NP, C] of x's dtype; nt threads; z [A, C, B] or None; slope
    None or the activation's slope in x's dtype.
    """
    na, nc, nb_ = x.shape
    runs = na * nc
    nt = max(1, min(nt, runs))
    # Each thread takes an equal share of the (a, c) runs, so that few channels still use
    # every thread, and walks it as nested loops over a and over a range of c: no integer
    # division per run, which costs more than the run itself when runs are short (4x4 and
    # 7x7 planes), and plain counted loops, which LLVM compiles tighter than a stepped index.
    for t in prange(nt):
        i0 = t * runs // nt
        i1 = (t + 1) * runs // nt
        for a in range(i0 // nc, (i1 + nc - 1) // nc):
            xa = x[a]
            ya = y[a]
            for c in range(max(i0 - a * nc, 0), min(i1 - a * nc, nc)):
                mh = p[MU_HI, c]
                sc = p[SCALE, c]
                sh = p[SHIFT, c]
                xr = xa[c]
                yr = ya[c]
                zr = _run(z, a, c)
                for b in range(nb_):
                    yr[b] = _act(_plus((xr[b] - mh) * sc + sh, zr, b), slope)


# ---------------------------------------------------------------------------- backward
#
# With g = dy * act'(pre) (act' read off y's sign) and xhat = (u - origin) * unit, where u is
# x (origin mean, unit invstd) or, in the memory-saving mode, act^-1(y) (origin beta, unit
# 1 / gamma): dgamma = sum(g * xhat), dbeta = sum(g), and
#     dx = k1 * g + k2 * (u - origin_hi) + k3
# with k1 = gamma * invstd, k2 = -k1 * unit * dgamma / M, k3 = -k1 * dbeta / M - k2 * origin_lo
# in training (k2 = k3 = 0 in inference). origin_hi is the origin rounded to x's dtype, as
# mu_hi in the forward.


@nb.njit(**_OPTS)
def _bwd_origin(mean, invstd, gamma, beta, recover, q, p):
    """Each channel's origin and unit of xhat into q (float64) and p[MU_HI] (x's dtype):
    (mean, invstd) from x, or (beta, 1 / gamma) when ``recover`` (x rebuilt from y)."""
    for c in range(q.shape[1]):
        if recover:
            o = np.float64(beta[c]) if beta.size else 0.0
            s = 1.0 / np.float64(gamma[c]) if gamma.size else 1.0
        else:
            o = np.float64(mean[c])
            s = np.float64(invstd[c])
        p[MU_HI, c] = o
        q[ORG, c] = o
        q[UNIT, c] = s
        q[OLO, c] = o - np.float64(p[MU_HI, c])


@nb.njit(**_OPTS)
def _bwd_setup(dy, x, mean, invstd, gamma, beta, xact=False):
    """(q, p): the backward constants of every channel, origin and unit set (see above);
    with ``xact`` (x given, beta given) the x route's constants too."""
    nc = invstd.size
    q = np.empty((NQ, nc))
    p = np.empty((NP, nc), dy.dtype)
    _bwd_origin(mean, invstd, gamma, beta, x is None, q, p)
    if xact:
        # the forward's y = act((x - mu_hi) * scale + shift) with scale = gamma * invstd and
        # shift = beta - mu_lo * scale; pre from them errs by rounding of its terms
        ku = XROUTE_ULPS * (2.0**-23 if dy.itemsize == 4 else 2.0**-52)
        tiny = 1e-30 if dy.itemsize == 4 else 1e-300
        for c in range(nc):
            sc = (np.float64(gamma[c]) if gamma.size else 1.0) * np.float64(invstd[c])
            sh = np.float64(beta[c]) - q[OLO, c] * sc
            p[FSC, c] = sc
            p[FSH, c] = sh
            p[TOL, c] = ku * (2.0 * abs(sh) + abs(q[ORG, c] * sc)) / (1.0 - ku) + tiny
    return q, p


@nb.njit(**_OPTS)
def _bwd_consts(sd, dg, invstd, gamma, m, training, c, q, p):
    """dx's constants of channel c into p from dbeta = sd and dgamma = dg (sums over m
    values): SCALE = k1, SHIFT = k2, K3 = k3, and FOLD the constant of the folded form
    dx = k1*g + k2*u + fold (see apply_rows)."""
    k1 = (np.float64(gamma[c]) if gamma.size else 1.0) * np.float64(invstd[c])
    p[SCALE, c] = k1
    p[SHIFT, c] = -k1 * q[UNIT, c] * dg / m if training else 0.0
    k3 = -k1 * sd / m if training else 0.0
    k2 = np.float64(p[SHIFT, c])
    p[K3, c] = k3 - k2 * q[OLO, c]
    p[FOLD, c] = k3 - k2 * q[ORG, c]


@nb.njit(**_OPTS)
def _block_grad_sums(dy, x, y, slope, xact, p, q, c0, c1, s1, s2):
    """s1 = sum(g), s2 = sum(g * (u - origin)) (float64) of cmajor channels [c0, c1)."""
    na, _, nb_ = dy.shape
    zero = np.zeros(1, dy.dtype)[0]  # not mh - mh: NaN for an infinite mean
    one = np.ones(1, dy.dtype)[0]
    rs = _unact_slope(x, slope, one)
    # as in the forward: x's dtype within RUN_CHUNK pieces of a run, float64 across; sum
    # g * (u - origin_hi) there and subtract origin_lo * sum g once per piece. (The loops
    # stay in this function: a call per piece passing its slices costs more than a short
    # piece, since slices passed to a call are reference-counted.)
    for a in range(na):
        for c in range(c0, c1):
            mh = p[MU_HI, c]
            ml = q[OLO, c]
            sc = p[FSC, c]
            sh = p[FSH, c]
            tol = p[TOL, c]
            grun = dy[a, c]
            xrun = _run(x, a, c)
            yrun = _run(y, a, c)
            for b0 in range(0, nb_, RUN_CHUNK):
                # slices, not range(b0, min(...)): that bound stops LLVM vectorizing
                gs = grun[b0:b0 + RUN_CHUNK]
                xs = _piece(xrun, b0, b0 + RUN_CHUNK)
                ys = _piece(yrun, b0, b0 + RUN_CHUNK)
                u1 = zero
                u2 = zero
                amb = one
                if xact:  # act' from x (see the module notes); amb counts the band
                    amb = zero
                    for b in range(gs.size):
                        d = _u(xs, ys, b, rs) - mh
                        pre = d * sc + sh
                        amb += one if abs(pre) <= tol else zero
                        h = _act_at(gs[b], pre, slope)
                        u1 += h
                        u2 += h * d
                if amb != zero:  # the y route: act' off y's sign
                    u1 = zero
                    u2 = zero
                    for b in range(gs.size):
                        h = _grad(gs[b], ys, b, slope)
                        u1 += h
                        u2 += h * (_u(xs, ys, b, rs) - mh)
                s1[c - c0] += np.float64(u1)
                s2[c - c0] += np.float64(u2) - ml * np.float64(u1)


@nb.njit(**_OPTS)
def _block_grad_apply(dy, x, y, slope, xact, p, c0, c1, training, dx, dz, a0, a1):
    """dx = k1 * g + k2 * (u - origin_hi) + k3 (training) or k1 * g, and dz = g when dz is
    an array, on cmajor channels [c0, c1) of rows a in [a0, a1).

    Indexes the 3-d arrays, slicing no runs: a slice costs more than a short run (7x7).
    The x route takes a whole run, and a run with an element in the band is computed again
    by the y route.
    """
    nb_ = dy.shape[2]
    zero = np.zeros(1, dy.dtype)[0]
    one = np.ones(1, dy.dtype)[0]
    rs = _unact_slope(x, slope, one)
    for a in range(a0, a1):
        for c in range(c0, c1):
            mh = p[MU_HI, c]
            k1 = p[SCALE, c]
            k2 = p[SHIFT, c]
            k3 = p[K3, c]
            amb = one
            if xact:  # act' from x (no residual, so no dz); amb counts the band
                sc = p[FSC, c]
                sh = p[FSH, c]
                tol = p[TOL, c]
                amb = zero
                if training:
                    for b in range(nb_):
                        d = _u3(x, y, a, c, b, rs) - mh
                        pre = d * sc + sh
                        amb += one if abs(pre) <= tol else zero
                        dx[a, c, b] = k1 * _act_at(dy[a, c, b], pre, slope) + k2 * d + k3
                else:
                    for b in range(nb_):
                        pre = (_u3(x, y, a, c, b, rs) - mh) * sc + sh
                        amb += one if abs(pre) <= tol else zero
                        dx[a, c, b] = k1 * _act_at(dy[a, c, b], pre, slope)
            if amb == zero:
                continue
            if training:  # the y route: act' off y's sign
                for b in range(nb_):
                    h = _grad3(dy[a, c, b], y, a, c, b, slope)
                    _put3(dz, a, c, b, h)
                    dx[a, c, b] = k1 * h + k2 * (_u3(x, y, a, c, b, rs) - mh) + k3
            else:
                for b in range(nb_):
                    h = _grad3(dy[a, c, b], y, a, c, b, slope)
                    _put3(dz, a, c, b, h)
                    dx[a, c, b] = k1 * h


def bwd_cmajor(dy, x, y, slope, xact, mean, invstd, gamma, beta, training, dx, dz, dgb, nt,
               block):
    """Per block of channels: dbeta = sum g, dgamma = sum g*xhat, then dx (in cache).

    dx = gamma*invstd*(g - (dbeta + xhat*dgamma)/M) in training, gamma*invstd*g otherwise,
    with g = dy * act'(pre); dz = g when dz is an array (the residual's gradient).
    Reads dy and x, plus y with an activation (only near pre = 0 by the x route, ``xact``);
    in the memory-saving mode dy and y only.
    Args: dy, dx [A, C, B]; x [A, C, B] or None (then u = act^-1(y)); y [A, C, B] or None
    (no activation and x given); slope None or the activation's slope in x's dtype; xact:
    the x route (an activation, x and beta given, no residual); mean, invstd, gamma, beta
    [C] float64 (gamma, beta empty for None; beta read without x or with xact); dz
    [A, C, B] or None; dgb [2, C] out (dgamma, dbeta); nt threads; block: the bytes one
    block may span.
    """
    na, nc, nb_ = dy.shape
    m = na * nb_
    q, p = _bwd_setup(dy, x, mean, invstd, gamma, beta, xact)
    nread = 2 if y is None or xact else 3
    nblk = _channel_blocks(na, nc, nb_, nread * dy.itemsize, nt, block)
    for blk in prange(nblk):
        c0 = blk * nc // nblk
        c1 = (blk + 1) * nc // nblk
        s1 = np.zeros(c1 - c0)
        s2 = np.zeros(c1 - c0)
        _block_grad_sums(dy, x, y, slope, xact, p, q, c0, c1, s1, s2)
        for c in range(c0, c1):
            dg = s2[c - c0] * q[UNIT, c]
            dgb[0, c] = dg
            dgb[1, c] = s1[c - c0]
            _bwd_consts(s1[c - c0], dg, invstd, gamma, m, training, c, q, p)
        _block_grad_apply(dy, x, y, slope, xact, p, c0, c1, training, dx, dz, 0, na)


def grad_sums_cmajor(dy, x, y, slope, mean, invstd, gamma, beta, sums, nt, block):
    """The grad_sums phase on cmajor views: sums[0] = sum g, sums[1] = sum g * xhat
    (float64 [2, C]); arguments as in :func:`bwd_cmajor`."""
    na, nc, nb_ = dy.shape
    q, p = _bwd_setup(dy, x, mean, invstd, gamma, beta)
    nblk = _channel_blocks(na, nc, nb_, 3 * dy.itemsize, nt, block)
    for blk in prange(nblk):
        c0 = blk * nc // nblk
        c1 = (blk + 1) * nc // nblk
        s1 = np.zeros(c1 - c0)
        s2 = np.zeros(c1 - c0)
        _block_grad_sums(dy, x, y, slope, False, p, q, c0, c1, s1, s2)
        for c in range(c0, c1):
            sums[0, c] = s1[c - c0]
            sums[1, c] = s2[c - c0] * q[UNIT, c]


@nb.njit(**_OPTS)
def _grad_setup(dy, x, mean, invstd, gamma, beta, sums, count, training):
    """(q, p) of the grad_apply phase: origin, unit and dx's constants from the channel
    sums (sum g, sum g * xhat) over count values (the global count under SyncBatchNorm)."""
    q, p = _bwd_setup(dy, x, mean, invstd, gamma, beta)
    for c in range(invstd.size):
        _bwd_consts(sums[0, c], sums[1, c], invstd, gamma, count, training, c, q, p)
    return q, p


def grad_apply_cmajor(dy, x, y, slope, mean, invstd, gamma, beta, sums, count, training,
                      dx, dz, nt):
    """The grad_apply phase on cmajor views; arguments as in :func:`bwd_cmajor`, sums
    [2, C] float64 (sum g, sum g * xhat) over count values. Threads take blocks of whole
    rows a (or of channels when A is smaller than the thread count)."""
    na, nc, _ = dy.shape
    _, p = _grad_setup(dy, x, mean, invstd, gamma, beta, sums, count, training)
    if na >= nt:
        n = max(1, min(nt, na))
        for t in prange(n):
            _block_grad_apply(dy, x, y, slope, False, p, 0, nc, training, dx, dz,
                              t * na // n, (t + 1) * na // n)
    else:
        n = max(1, min(nt, nc))
        for t in prange(n):
            _block_grad_apply(dy, x, y, slope, False, p, t * nc // n, (t + 1) * nc // n,
                              training, dx, dz, 0, na)


def _rows_grad_sums(dy, x, y, slope, xact, sums, q, p, nt):
    """sums[0] = sum g, sums[1] = sum g * xhat of rows views [R, C], a row block a thread,
    with q and p set by :func:`_bwd_setup`."""
    nr, nc = dy.shape
    nt = max(1, min(nt, nr))
    zero = np.zeros(1, dy.dtype)[0]
    one = np.ones(1, dy.dtype)[0]
    rs = _unact_slope(x, slope, one)
    mh = p[MU_HI]
    ml = q[OLO]
    part = np.zeros((nt, 2, nc))
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        s1 = np.zeros(nc)
        s2 = np.zeros(nc)
        # 16-row chunks in x's dtype as in stats_rows; sum g * (u - origin_hi) there and
        # subtract origin_lo * sum g once in float64
        t1 = np.zeros_like(mh)
        t2 = np.zeros_like(mh)
        for q0 in range(r0, r1, ROWS_CHUNK):
            q1 = min(q0 + ROWS_CHUNK, r1)
            t1[:] = 0
            t2[:] = 0
            if xact:
                if _rows_sums_x(dy, x, q0, q1, slope, p, t1, t2, zero, one):
                    r = q1
                else:  # a value of pre near 0: the chunk again by the y route
                    t1[:] = 0
                    t2[:] = 0
                    r = q0
            else:
                r = q0
            if nc >= WIDE_ROWS and not xact:  # as in stats_rows: 4 rows a sweep
                while r + 4 <= q1:
                    g0 = dy[r]
                    g1 = dy[r + 1]
                    g2 = dy[r + 2]
                    g3 = dy[r + 3]
                    x0 = _part(x, r)
                    x1 = _part(x, r + 1)
                    x2 = _part(x, r + 2)
                    x3 = _part(x, r + 3)
                    y0 = _part(y, r)
                    y1 = _part(y, r + 1)
                    y2 = _part(y, r + 2)
                    y3 = _part(y, r + 3)
                    for c in range(nc):
                        m = mh[c]
                        h0 = _grad(g0[c], y0, c, slope)
                        h1 = _grad(g1[c], y1, c, slope)
                        h2 = _grad(g2[c], y2, c, slope)
                        h3 = _grad(g3[c], y3, c, slope)
                        t1[c] += (h0 + h1) + (h2 + h3)
                        t2[c] += ((h0 * (_u(x0, y0, c, rs) - m) + h1 * (_u(x1, y1, c, rs) - m))
                                  + (h2 * (_u(x2, y2, c, rs) - m)
                                     + h3 * (_u(x3, y3, c, rs) - m)))
                    r += 4
            for rr in range(r, q1):
                gr = dy[rr]
                xr = _part(x, rr)
                yr = _part(y, rr)
                for c in range(nc):
                    h = _grad(gr[c], yr, c, slope)
                    t1[c] += h
                    t2[c] += h * (_u(xr, yr, c, rs) - mh[c])
            for c in range(nc):
                s1[c] += np.float64(t1[c])
                s2[c] += np.float64(t2[c]) - ml[c] * np.float64(t1[c])
        part[t, 0, :] = s1
        part[t, 1, :] = s2
    for c in range(nc):
        sd = 0.0
        sdx = 0.0
        for t in range(nt):
            sd += part[t, 0, c]
            sdx += part[t, 1, c]
        sums[0, c] = sd
        sums[1, c] = sdx * q[UNIT, c]


def _rows_grad_apply(dy, x, y, slope, xact, p, q, training, dx, dz, nt):
    """dx (and dz) of rows views [R, C], a row block a thread, with p holding dx's
    constants. One constant less when every |origin * unit| <= FOLD_LIMIT, where rounding
    k3 - k2 * origin costs no more than the k2 term's own rounding."""
    nr, nc = dy.shape
    nt = max(1, min(nt, nr))
    zero = np.zeros(1, dy.dtype)[0]
    one = np.ones(1, dy.dtype)[0]
    rs = _unact_slope(x, slope, one)
    k1 = p[SCALE]
    k2 = p[SHIFT]
    k3 = p[K3]
    fo = p[FOLD]
    mh = p[MU_HI]
    fold = True
    for c in range(nc):
        if abs(q[ORG, c] * q[UNIT, c]) > FOLD_LIMIT:
            fold = False
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        for q0 in range(r0, r1, ROWS_CHUNK):
            q1 = min(q0 + ROWS_CHUNK, r1)
            if xact and _rows_apply_x(dy, x, dx, q0, q1, slope, p, training, zero, one):
                continue
            for r in range(q0, q1):
                gr = dy[r]
                dxr = dx[r]
                xr = _part(x, r)
                yr = _part(y, r)
                dzr = _part(dz, r)
                if training and fold:
                    for c in range(nc):
                        h = _grad(gr[c], yr, c, slope)
                        _put(dzr, c, h)
                        dxr[c] = k1[c] * h + k2[c] * _u(xr, yr, c, rs) + fo[c]
                elif training:
                    for c in range(nc):
                        h = _grad(gr[c], yr, c, slope)
                        _put(dzr, c, h)
                        dxr[c] = k1[c] * h + k2[c] * (_u(xr, yr, c, rs) - mh[c]) + k3[c]
                else:
                    for c in range(nc):
                        h = _grad(gr[c], yr, c, slope)
                        _put(dzr, c, h)
                        dxr[c] = k1[c] * h


def grad_sums_rows(dy, x, y, slope, mean, invstd, gamma, beta, sums, nt):
    """The grad_sums phase on rows views [R, C]; as :func:`grad_sums_cmajor`."""
    q, p = _bwd_setup(dy, x, mean, invstd, gamma, beta)
    _rows_grad_sums(dy, x, y, slope, False, sums, q, p, nt)


def grad_apply_rows(dy, x, y, slope, mean, invstd, gamma, beta, sums, count, training, dx,
                    dz, nt):
    """The grad_apply phase on rows views [R, C]; as :func:`grad_apply_cmajor`."""
    q, p = _grad_setup(dy, x, mean, invstd, gamma, beta, sums, count, training)
    _rows_grad_apply(dy, x, y, slope, False, p, q, training, dx, dz, nt)


def bwd_rows(dy, x, y, slope, xact, mean, invstd, gamma, beta, training, dx, dz, dgb, nt):
    """Rows version of :func:`bwd_cmajor`: the sums, the constants, then dx on the same row
    blocks. Args: dy, x, y, dx, dz [R, C]."""
    nr, nc = dy.shape
    q, p = _bwd_setup(dy, x, mean, invstd, gamma, beta, xact)
    sums = np.empty((2, nc))
    _rows_grad_sums(dy, x, y, slope, xact, sums, q, p, nt)
    for c in range(nc):
        dgb[0, c] = sums[1, c]
        dgb[1, c] = sums[0, c]
        _bwd_consts(sums[0, c], sums[1, c], invstd, gamma, nr, training, c, q, p)
    _rows_grad_apply(dy, x, y, slope, xact, p, q, training, dx, dz, nt)


def copy3(src, dst):
    """dst[...] = src for two (A, C, B) views stored in different orders (a transpose).

    Tiles of TILE x TILE (channel, position) keep both sides' cache lines in L1 while the
    inner loop walks dst's contiguous axis; a plain strided copy reloads a line per element.
    """
    na, nc, nb_ = src.shape
    ntc = (nc + TILE - 1) // TILE
    ntb = (nb_ + TILE - 1) // TILE
    c_inner = dst.strides[1] <= dst.strides[2]
    for i in prange(na * ntc):
        a = i // ntc
        c0 = (i - a * ntc) * TILE
        c1 = c0 + TILE
        for j in range(ntb):
            b0 = j * TILE
            # slices, so that the loop indices start at 0 (Numba then skips the
            # negative-index wraparound it otherwise checks on every access)
            s = src[a, c0:c1, b0:b0 + TILE]
            d = dst[a, c0:c1, b0:b0 + TILE]
            if c_inner:
                for b in range(s.shape[1]):
                    for c in range(s.shape[0]):
                        d[c, b] = s[c, b]
            else:
                for c in range(s.shape[0]):
                    for b in range(s.shape[1]):
                        d[c, b] = s[c, b]


@nb.njit(**_OPTS)
def update_running(rm, rv, st, momentum, unbias):
    """running = (1 - momentum) * running + momentum * batch, in place (var unbiased).

    Args: rm, rv [C] (any float dtype; empty to skip); st [4, C] as filled by the forward.
    """
    for c in range(rm.size):
        rm[c] = (1.0 - momentum) * np.float64(rm[c]) + momentum * st[MEAN, c]
    for c in range(rv.size):
        rv[c] = (1.0 - momentum) * np.float64(rv[c]) + momentum * (st[VAR, c] * unbias)


def _compile(fn, parallel: bool, extra: dict, loops: bool = True):
    # A distinct qualname per variant keeps the two in separate on-disk cache entries;
    # ``extra`` rebinds the kernels a kernel calls to the same variant. ``loops`` False: a
    # composite of kernels without prange loops of its own (compiled serial either way).
    name = fn.__name__ + ("" if parallel else "_serial")
    clone = types.FunctionType(fn.__code__, dict(fn.__globals__, **extra), name,
                               fn.__defaults__, fn.__closure__)
    clone.__qualname__ = name
    clone.__doc__ = fn.__doc__
    clone.__module__ = fn.__module__
    return nb.njit(parallel=parallel and loops, **_OPTS)(clone)


def _family(parallel: bool) -> types.SimpleNamespace:
    ns = types.SimpleNamespace()
    for f in (apply_rows, stats_rows, _rows_grad_sums, _rows_grad_apply, fwd_train_cmajor,
              moments_cmajor, affine_cmajor, bwd_cmajor, grad_sums_cmajor, grad_apply_cmajor,
              copy3):
        setattr(ns, f.__name__, _compile(f, parallel, {}))
    rows = {"apply_rows": ns.apply_rows, "stats_rows": ns.stats_rows,
            "_rows_grad_sums": ns._rows_grad_sums, "_rows_grad_apply": ns._rows_grad_apply}
    for f in (fwd_train_rows, grad_sums_rows, grad_apply_rows, bwd_rows):
        setattr(ns, f.__name__, _compile(f, parallel, rows, loops=False))
    return ns


PARALLEL = _family(True)
SERIAL = _family(False)
