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
anyway, and the pass runs 10-20% faster (the constants are vectors there, one load each).
The per-channel constants of those passes live in ``p`` (rows below, x's dtype).

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

# reassoc lets LLVM vectorize the reductions; no nnan/ninf: NaN and Inf must propagate.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_OPTS = dict(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)

# rows of the per-channel parameter array p (x's dtype); INV doubles as the saved invstd
MU_HI, FOLD, SCALE, SHIFT, K3, INV = 0, 1, 2, 3, 4, 5
NP = 6
FOLD_LIMIT = 1.0  # the rows apply folds mu into the shift when all |mu_hi * scale| <= this
BLOCKS_PER_THREAD = 4  # at least this many cmajor channel blocks per thread (balance)
TILE = 16  # copy3's tile edge: 16 float32 are one 64-byte cache line
ROWS_CHUNK = 16  # rows summed in x's dtype before a float64 fold (rows kernels)
# a shift further than this many variances (squared sigmas) from the mean costs more than
# 4 of the float32 partials' 24 bits: the channel's sums are then taken again around its mean
REFINE = 16.0
WIDE_ROWS = 1024  # channels from which the rows statistics sweep 4 rows at once
RUN_CHUNK = 256  # cmajor run pieces summed in x's dtype before a float64 fold
# rows of the float64 statistics array st
MEAN, VAR, INVSTD, BAD = 0, 1, 2, 3


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
    g = np.float64(p[SCALE, c])
    st[MEAN, c] = mu
    st[VAR, c] = v
    st[INVSTD, c] = inv
    p[INV, c] = inv
    p[MU_HI, c] = mu
    ml = mu - np.float64(p[MU_HI, c])
    p[SCALE, c] = g * inv
    beta = np.float64(p[SHIFT, c])
    sc = np.float64(p[SCALE, c])
    # ((x - mu_hi) - mu_lo) * scale + beta == (x - mu_hi) * scale + (beta - mu_lo * scale)
    p[SHIFT, c] = beta - ml * sc
    p[FOLD, c] = beta - mu * sc


@nb.njit(**_OPTS)
def inference_consts(mean, var, gamma, beta, eps, p):
    """Inference apply constants into p from given statistics (float32 or float64 arrays,
    each value taken to float64 as it is read; gamma and beta empty for no affine):
    scale = gamma / sqrt(var + eps), 0 where var + eps == 0."""
    for c in range(p.shape[1]):
        m = np.float64(mean[c])
        den = np.float64(var[c]) + eps
        inv = 0.0 if den == 0.0 else 1.0 / np.sqrt(den)
        p[MU_HI, c] = m
        p[SCALE, c] = inv * np.float64(gamma[c]) if gamma.size else inv
        sc = np.float64(p[SCALE, c])
        b = np.float64(beta[c]) if beta.size else 0.0
        # (x - mu_hi) * scale + (beta - mu_lo * scale), the low part folded in float64
        p[SHIFT, c] = b - (m - np.float64(p[MU_HI, c])) * sc
        p[FOLD, c] = b - m * sc


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


def fwd_train_cmajor(x, eps, y, st, p, check, nt, block):
    """Per block of channels: shifted sums, then y = (x - mu) * gamma * invstd + beta.

    The block's slice stays in cache between the two passes; for each a its channels' runs
    are one contiguous segment, so short runs (small H*W) still stream.
    Args: x, y [A, C, B]; st [4, C] float64 out (mean, biased var, invstd, bad); p [NP, C]
    of x's dtype, rows SCALE and SHIFT holding gamma and beta on entry; nt threads; block:
    the bytes of x one block may span (see ``cpu._block_bytes``).
    """
    na, nc, nb_ = x.shape
    m = na * nb_
    zero = np.zeros(1, x.dtype)[0]
    nblk = _channel_blocks(na, nc, nb_, x.itemsize, nt, block)
    for blk in prange(nblk):
        c0 = blk * nc // nblk
        c1 = (blk + 1) * nc // nblk
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
        for a in range(na):
            for c in range(c0, c1):
                mh = p[MU_HI, c]
                sc = p[SCALE, c]
                sh = p[SHIFT, c]
                if check:  # the stored value: the cast to y's dtype may overflow
                    acc = 0.0
                    for b in range(nb_):
                        y[a, c, b] = (x[a, c, b] - mh) * sc + sh
                        acc += y[a, c, b] * 0.0
                    st[BAD, c] += acc
                else:
                    for b in range(nb_):
                        y[a, c, b] = (x[a, c, b] - mh) * sc + sh


def fwd_train_rows(x, eps, y, st, p, check, nt):
    """Rows version of :func:`fwd_train_cmajor`: one block of rows per thread.

    Args: x, y [R, C]; the rest as there.
    """
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
                    # which otherwise bound this loop (~2x faster at C >= 1024; slower at
                    # C <= 256)
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
    apply_rows(x, p, y, st, check, nt)


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


def apply_rows(x, p, y, st, check, nt):
    """y[r, c] = (x[r, c] - mu_hi[c]) * scale[c] + shift[c], a row block a thread; or
    x * scale + fold when every ``|mu_hi * scale| <= FOLD_LIMIT`` (see the module notes).

    Also the inference kernel for rows. Args: x, y [R, C]; p [NP, C] as filled by
    :func:`_finish_stats`; st [4, C] (row BAD written when check).
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
                if fold:
                    for c in range(nc):
                        y[r, c] = x[r, c] * sc[c] + fo[c]
                else:
                    for c in range(nc):
                        y[r, c] = (x[r, c] - mh[c]) * sc[c] + sh[c]
                for c in range(nc):
                    a[c] += y[r, c] * 0.0
            acc[t, :] = a
        elif fold:
            for r in range(r0, r1):
                for c in range(nc):
                    y[r, c] = x[r, c] * sc[c] + fo[c]
        else:
            for r in range(r0, r1):
                for c in range(nc):
                    y[r, c] = (x[r, c] - mh[c]) * sc[c] + sh[c]
    if check:
        for c in range(nc):
            s = 0.0
            for t in range(nt):
                s += acc[t, c]
            st[BAD, c] = s


def affine_cmajor(x, p, y, nt):
    """Inference: y = (x - mu_hi[c]) * scale[c] + shift[c] (mu_lo folded into shift).

    Args: x, y [A, C, B]; p [NP, C] of x's dtype; nt threads.
    """
    na, nc, nb_ = x.shape
    runs = na * nc
    nt = max(1, min(nt, runs))
    # Each thread takes an equal share of the (a, c) runs, so that few channels still use
    # every thread, and steps through its share: an integer division per run costs more
    # than the run itself when runs are short (4x4 and 7x7 planes).
    for t in prange(nt):
        i0 = t * runs // nt
        i1 = (t + 1) * runs // nt
        a = i0 // nc
        c = i0 - a * nc
        for _ in range(i0, i1):
            mh = p[MU_HI, c]
            sc = p[SCALE, c]
            sh = p[SHIFT, c]
            for b in range(nb_):
                y[a, c, b] = (x[a, c, b] - mh) * sc + sh
            c += 1
            if c == nc:
                c = 0
                a += 1


@nb.njit(**_OPTS)
def _bwd_consts(sd, sdx, inv, gamma, m, training, ml, c, dgb, p):
    """dgamma, dbeta of channel c; dx = k1*dy + k2*(x - mu_hi) + k3 constants into p.

    k3 absorbs -k2 * mu_lo (ml), as the forward's shift does; FOLD holds the constant of
    the folded form dx = k1*dy + k2*x + fold (see apply_rows).
    """
    dg = sdx * inv
    dgb[0, c] = dg
    dgb[1, c] = sd
    k1 = (np.float64(gamma[c]) if gamma.size else 1.0) * inv
    p[SCALE, c] = k1
    p[SHIFT, c] = -k1 * inv * dg / m if training else 0.0
    k3 = -k1 * sd / m if training else 0.0
    k2 = np.float64(p[SHIFT, c])
    p[K3, c] = k3 - k2 * ml
    p[FOLD, c] = k3 - k2 * (np.float64(p[MU_HI, c]) + ml)


def bwd_cmajor(dy, x, mean, invstd, gamma, training, dx, dgb, p, nt, block):
    """Per block of channels: dbeta = sum dy, dgamma = sum dy*xhat, then dx (in cache).

    dx = g*inv*(dy - (dbeta + xhat*dgamma)/M) in training, g*inv*dy otherwise.
    Args: dy, x, dx [A, C, B]; mean, invstd [C] float64; gamma [C] float64 or empty;
    dgb [2, C] float64 out (dgamma, dbeta); p [NP, C] scratch of x's dtype; nt threads;
    block: the bytes of x and dy one block may span.
    """
    na, nc, nb_ = x.shape
    m = na * nb_
    zero = np.zeros(1, x.dtype)[0]  # not mh - mh: NaN for an infinite mean
    nblk = _channel_blocks(na, nc, nb_, 2 * x.itemsize, nt, block)
    for blk in prange(nblk):
        c0 = blk * nc // nblk
        c1 = (blk + 1) * nc // nblk
        s1 = np.zeros(c1 - c0)
        s2 = np.zeros(c1 - c0)
        for c in range(c0, c1):
            p[MU_HI, c] = mean[c]
        # as in the forward: x's dtype within RUN_CHUNK pieces of a run, float64 across;
        # sum g * (x - mu_hi) there and subtract mu_lo * sum g once per piece
        for a in range(na):
            for c in range(c0, c1):
                mh = p[MU_HI, c]
                ml = mean[c] - np.float64(mh)
                grun = dy[a, c]
                xrun = x[a, c]
                for b0 in range(0, nb_, RUN_CHUNK):
                    gs = grun[b0:b0 + RUN_CHUNK]
                    xs = xrun[b0:b0 + RUN_CHUNK]
                    u1 = zero
                    u2 = zero
                    for b in range(gs.size):
                        h = gs[b]
                        u1 += h
                        u2 += h * (xs[b] - mh)
                    s1[c - c0] += np.float64(u1)
                    s2[c - c0] += np.float64(u2) - ml * np.float64(u1)
        for c in range(c0, c1):
            _bwd_consts(s1[c - c0], s2[c - c0], invstd[c], gamma, m, training,
                        mean[c] - np.float64(p[MU_HI, c]), c, dgb, p)
        for a in range(na):
            for c in range(c0, c1):
                k1 = p[SCALE, c]
                if training:
                    mh = p[MU_HI, c]
                    k2 = p[SHIFT, c]
                    k3 = p[K3, c]
                    for b in range(nb_):
                        dx[a, c, b] = k1 * dy[a, c, b] + k2 * (x[a, c, b] - mh) + k3
                else:
                    for b in range(nb_):
                        dx[a, c, b] = k1 * dy[a, c, b]


def bwd_rows(dy, x, mean, invstd, gamma, training, dx, dgb, p, nt):
    """Rows version of :func:`bwd_cmajor`, a row block a thread. Args: dy, x, dx [R, C]."""
    nr, nc = x.shape
    nt = max(1, min(nt, nr))
    ml = np.empty(nc)
    for c in range(nc):
        p[MU_HI, c] = mean[c]
        ml[c] = mean[c] - np.float64(p[MU_HI, c])
    mh = p[MU_HI]
    part = np.zeros((nt, 2, nc))
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        s1 = np.zeros(nc)
        s2 = np.zeros(nc)
        # 16-row chunks in x's dtype as in fwd_train_rows; sum g * (x - mu_hi) there and
        # subtract mu_lo * sum g once in float64
        t1 = np.zeros_like(mh)
        t2 = np.zeros_like(mh)
        for q0 in range(r0, r1, ROWS_CHUNK):
            q1 = min(q0 + ROWS_CHUNK, r1)
            t1[:] = 0
            t2[:] = 0
            r = q0
            if nc >= WIDE_ROWS:  # as in fwd_train_rows: 4 rows a sweep on wide rows
                while r + 4 <= q1:
                    g0 = dy[r]
                    g1 = dy[r + 1]
                    g2 = dy[r + 2]
                    g3 = dy[r + 3]
                    x0 = x[r]
                    x1 = x[r + 1]
                    x2 = x[r + 2]
                    x3 = x[r + 3]
                    for c in range(nc):
                        m = mh[c]
                        t1[c] += (g0[c] + g1[c]) + (g2[c] + g3[c])
                        t2[c] += ((g0[c] * (x0[c] - m) + g1[c] * (x1[c] - m))
                                  + (g2[c] * (x2[c] - m) + g3[c] * (x3[c] - m)))
                    r += 4
            for rr in range(r, q1):
                for c in range(nc):
                    g = dy[rr, c]
                    t1[c] += g
                    t2[c] += g * (x[rr, c] - mh[c])
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
        _bwd_consts(sd, sdx, invstd[c], gamma, nr, training, ml[c], c, dgb, p)
    k1 = p[SCALE]
    k2 = p[SHIFT]
    k3 = p[K3]
    fo = p[FOLD]
    # as in apply_rows: one constant less when |mean| <= FOLD_LIMIT sigma in every channel,
    # where rounding k3 - k2*mean costs no more than the k2 term's own rounding
    fold = True
    for c in range(nc):
        if abs(mean[c]) * invstd[c] > FOLD_LIMIT:
            fold = False
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        if training and fold:
            for r in range(r0, r1):
                for c in range(nc):
                    dx[r, c] = k1[c] * dy[r, c] + k2[c] * x[r, c] + fo[c]
        elif training:
            for r in range(r0, r1):
                for c in range(nc):
                    dx[r, c] = k1[c] * dy[r, c] + k2[c] * (x[r, c] - mh[c]) + k3[c]
        else:
            for r in range(r0, r1):
                for c in range(nc):
                    dx[r, c] = k1[c] * dy[r, c]


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


def _compile(fn, parallel: bool, extra: dict):
    # A distinct qualname per variant keeps the two in separate on-disk cache entries;
    # ``extra`` rebinds the kernels a kernel calls to the same variant.
    name = fn.__name__ + ("" if parallel else "_serial")
    clone = types.FunctionType(fn.__code__, dict(fn.__globals__, **extra), name,
                               fn.__defaults__, fn.__closure__)
    clone.__qualname__ = name
    clone.__doc__ = fn.__doc__
    clone.__module__ = fn.__module__
    return nb.njit(parallel=parallel, **_OPTS)(clone)


def _family(parallel: bool) -> types.SimpleNamespace:
    ns = types.SimpleNamespace(apply_rows=_compile(apply_rows, parallel, {}))
    for f in (fwd_train_cmajor, affine_cmajor, bwd_cmajor, bwd_rows, copy3):
        setattr(ns, f.__name__, _compile(f, parallel, {}))
    ns.fwd_train_rows = _compile(fwd_train_rows, parallel, {"apply_rows": ns.apply_rows})
    return ns


PARALLEL = _family(True)
SERIAL = _family(False)
