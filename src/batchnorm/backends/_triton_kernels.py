"""Triton kernels of the gpu backend; the launchers in :mod:`batchnorm.backends.gpu` drive them.

Every kernel sees a strided 3-d view ``(A, C, B)`` of its tensors, reduced over A and B, and
works on tiles ``[BLOCK_A, BLOCK_C, BLOCK_B]``. Channels-first inputs (NCHW) use tiles with
``BLOCK_C = 1`` and a long contiguous B run; channels-last inputs arrive as ``(M, C, 1)`` and
use tiles that are wide in C. Tiles of the (A, B) plane are numbered ``t = ta * n_tb + tb``;
program ``(pc, ps)`` of a split kernel owns channel block ``pc`` and tiles
``[ps * TPP, (ps + 1) * TPP)``.

Statistics are float32 whatever the input dtype. Partial results are merged in a fixed order,
so every result is deterministic run to run; no kernel waits on another program.

Overflow. The sum of squared deviations M2 passes float32's range when the spread of a
channel passes about 1e17 (a sum of values, when they pass about 1e34), while the answer,
invstd, is still a normal float32. Between programs M2 is therefore carried as its square
root ``r = sqrt(M2)`` (the partials, the merges, :func:`_finish_stats`), merged with a scaled
hypot; within a program the fast sums stay as they are, and a program whose sums come out
Inf or NaN sums its values again, scaled by fixed powers of two (:data:`SUM_SCALE`: in
registers for the persistent kernels, a second read of its tiles for the split ones).
Finite channels pay one test per program; a channel whose input holds Inf or NaN pays the
second read and still comes out non-finite, as it must (check_finite reports it).

The epilogue (contract §8): the forward kernels end in :func:`_epilogue` (residual add, then
relu / leaky_relu, chosen by the constexprs HAS_RES and HAS_ACT; relu is slope 0), the
backward kernels start in :func:`_bwd_tile` (g = dy * act'(pre) read off y's sign, and xhat
from x, or, with FROM_Y, recovered from y in the memory-saving mode). One copy of each kernel
serves every epilogue: the flags remove the unused code at compile time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(pc, t, n_tb, A, C, B, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_B: tl.constexpr, I64: tl.constexpr):
    """Tile ``t`` of channel block ``pc``: its origin, in-tile indices and in-bounds mask.

    Returns ``a0, c0, b0, ra, rc, rb, mask``: the origin is scalar, the in-tile indices are
    vectors broadcastable to the tile (flat values: older Triton releases cannot pass tuples
    between jit functions). I64 is the indexing width the launcher chose:
    0, all 32-bit; 1, the origin 64-bit (offsets past 2**31, in-tile spans below it);
    2, everything 64-bit. Widening happens before any product that could pass 2**31.
    """
    ta = t // n_tb
    tb = t - ta * n_tb
    if I64 >= 1:
        ta = ta.to(tl.int64)
        tb = tb.to(tl.int64)
        pc = pc.to(tl.int64)
    ra = tl.arange(0, BLOCK_A)[:, None, None]
    rc = tl.arange(0, BLOCK_C)[None, :, None]
    rb = tl.arange(0, BLOCK_B)[None, None, :]
    if I64 == 2:
        ra = ra.to(tl.int64)
        rc = rc.to(tl.int64)
        rb = rb.to(tl.int64)
    a0 = ta * BLOCK_A
    c0 = pc * BLOCK_C
    b0 = tb * BLOCK_B
    mask = (a0 + ra < A) & (c0 + rc < C) & (b0 + rb < B)
    return a0, c0, b0, ra, rc, rb, mask


@triton.jit
def _at(ptr, a0, c0, b0, ra, rc, rb, sa, sc, sb):
    """Pointers to a tile's elements of the tensor at ``ptr`` with strides (sa, sc, sb)."""
    return (ptr + (a0 * sa + c0 * sc + b0 * sb)) + (ra * sa + rc * sc + rb * sb)


@triton.jit
def _sum_ab(v):
    """Sum a [BLOCK_A, BLOCK_C, BLOCK_B] tile over A and B -> [BLOCK_C]."""
    return tl.sum(tl.sum(v, axis=2), axis=0)


@triton.jit
def _bcast(v):
    """A per-channel [BLOCK_C] vector shaped to broadcast against a tile."""
    return v[None, :, None]


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) < float("inf"))


@triton.jit
def _any(flags):
    """True (a scalar) when any channel of the block is flagged: a branch all threads take."""
    return tl.max(flags.to(tl.int32), axis=0) > 0


@triton.jit
def _scale_of(s):
    """A scale for values up to ``s`` in magnitude: s itself where 1/s is a finite float32
    (s normal), 1 elsewhere (zero, tiny, Inf or NaN: nothing to gain, NaN kept)."""
    return tl.where((s > 1e-37) & (s < float("inf")), s, 1.0)


# Power-of-two scales of the overflow rescans: exact, and small enough that sums of scaled
# values (any float32 times 2**-64) and of squared scaled deviations (times 2**-80) cannot
# overflow. The terms they make subnormal (|x| < 2**-62, |d| < 2**17) are negligible
# wherever the unscaled sum overflowed, and a channel whose sums did not keeps them.
SUM_SCALE: tl.constexpr = tl.constexpr(2.0**-64)
SQUARES_SCALE: tl.constexpr = tl.constexpr(2.0**-80)


@triton.jit
def _scaled_mean(v, n):
    """Mean over A and B of a tile (0 where masked) whose plain sum overflows float32."""
    return (_sum_ab(v * SUM_SCALE) / n) * (1.0 / SUM_SCALE)


@triton.jit
def _scaled_root(d):
    """sqrt(sum of d^2) over A and B of a tile (0 where masked) whose plain sum of squares
    overflows float32."""
    u = d * SQUARES_SCALE
    return tl.sqrt(_sum_ab(u * u)) * (1.0 / SQUARES_SCALE)


@triton.jit
def _hypot3(a, b, c):
    """sqrt(a^2 + b^2 + c^2) for a, b, c >= 0 without overflow (NaN propagates)."""
    k = _scale_of(tl.maximum(tl.maximum(a, b), c))
    inv = 1.0 / k
    a = a * inv
    b = b * inv
    c = c * inv
    return k * tl.sqrt(a * a + b * b + c * c)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: merge (count, mean, M2) of two disjoint sets; empty sets are neutral."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    m2 = m2_a + m2_b + delta * delta * n_a * w
    return n, mean, m2


@triton.jit
def _chan_merge_root(n_a, mean_a, r_a, n_b, mean_b, r_b):
    """:func:`_chan_merge` with M2 carried as r = sqrt(M2): r = hypot(r_a, r_b, |delta|
    sqrt(n_a n_b / n)), which cannot overflow while the spread is a finite float32."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    return n, mean, _hypot3(r_a, r_b, tl.abs(delta) * tl.sqrt(n_a * w))


@triton.jit
def _finish_stats(c, cmask, mean, r, M, unbias, eps, momentum, rmean_ptr, rvar_ptr,
                  mean_ptr, invstd_ptr, HAS_RMEAN: tl.constexpr, HAS_RVAR: tl.constexpr):
    """Per channel, from the mean and r = sqrt(M2): invstd (0 where var + eps == 0), the
    saved statistics and the running update.

    Returns (invstd, bad) with bad = 1.0 where mean, r or invstd is not finite. A variance
    beyond float32 (r / sqrt(M) past ~1.8e19) still gives invstd = 1 / sd, where eps no
    longer counts; the running variance then holds Inf, the float32 value of the true one.
    """
    sd = r / tl.sqrt(M * 1.0)
    var = sd * sd
    denom = var + eps
    invstd = tl.where(denom == 0.0, 0.0,
                      tl.where(denom < float("inf"), 1.0 / tl.sqrt(denom), 1.0 / sd))
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, invstd, mask=cmask)
    # running = (1 - m) * running + m * batch, the variance unbiased by M / (M - 1); each
    # statistic is updated when it is given, independently of the other (contract §3)
    if HAS_RMEAN:
        rm = tl.load(rmean_ptr + c, mask=cmask, other=0.0)
        new_rm = (1.0 - momentum) * rm.to(tl.float32) + momentum * mean
        tl.store(rmean_ptr + c, new_rm.to(rm.dtype), mask=cmask)
    if HAS_RVAR:
        rv = tl.load(rvar_ptr + c, mask=cmask, other=0.0)
        new_rv = (1.0 - momentum) * rv.to(tl.float32) + momentum * (var * unbias)
        tl.store(rvar_ptr + c, new_rv.to(rv.dtype), mask=cmask)
    ok = _finite(mean) & _finite(r) & _finite(invstd)
    return invstd, tl.where(ok, 0.0, 1.0)


@triton.jit
def _epilogue(pre, z_ptr, sza, szc, szb, a0, c0, b0, ra, rc, rb, mask, slope,
              HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr):
    """y = act(pre + z) of one tile (contract §8), in float32: the residual tile is added,
    then relu / leaky_relu (relu is slope 0; ``pre * slope`` keeps a NaN a NaN)."""
    if HAS_RES:
        z = tl.load(_at(z_ptr, a0, c0, b0, ra, rc, rb, sza, szc, szb), mask=mask, other=0.0)
        pre += z.to(tl.float32)
    if HAS_ACT:
        pre = tl.where(pre > 0, pre, pre * slope)
    return pre


@triton.jit
def _nonfinite_channels(y, mask):
    """1.0 per channel where any in-mask value of the tile y is Inf or NaN, else 0.0."""
    yf = y.to(tl.float32)
    nonfinite = mask & ((yf != yf) | (tl.abs(yf) == float("inf")))
    return tl.max(tl.max(nonfinite.to(tl.float32), axis=2), axis=0)


# ----------------------------------------------------------------------------- forward


@triton.jit
def fwd_partial_kernel(x_ptr, sxa, sxc, sxb, A, C, B, n_tb, T, TPP,
                       pn_ptr, pmean_ptr, pr_ptr,
                       BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                       I64: tl.constexpr):
    """Per (split, channel): count, mean and r = sqrt(M2) of the split's tiles ->
    partials[S, C].

    Each tile is reduced two-pass in registers, then Chan-merged into the program's total,
    so no sum of squares ever cancels. Sums that overflow float32 are taken again, scaled
    (see the module notes).
    """
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t0 = ps * TPP
    t1 = tl.minimum(t0 + TPP, T)
    for t in range(t0, t1):
        a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
        v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                    other=0.0).to(tl.float32)
        n_t = _sum_ab(mask.to(tl.float32))
        mean_t = _sum_ab(v) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, v - _bcast(mean_t), 0.0)
        m2_t = _sum_ab(d * d)
        n, mean, m2 = _chan_merge(n, mean, m2, n_t, mean_t, m2_t)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    r = tl.sqrt(m2)
    tl.store(pn_ptr + ps * C + c1, n, mask=cmask)
    tl.store(pmean_ptr + ps * C + c1, mean, mask=cmask)
    tl.store(pr_ptr + ps * C + c1, r, mask=cmask)
    redo = cmask & ~(_finite(mean) & _finite(r))
    if _any(redo):  # a sum overflowed (or x holds Inf / NaN): the tiles again, scaled
        n = tl.zeros((BLOCK_C,), dtype=tl.float32)
        mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
        r = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t in range(t0, t1):
            a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C,
                                                 BLOCK_B, I64)
            v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                        other=0.0).to(tl.float32)
            n_t = _sum_ab(mask.to(tl.float32))
            mean_t = _scaled_mean(v, tl.maximum(n_t, 1.0))
            r_t = _scaled_root(tl.where(mask, v - _bcast(mean_t), 0.0))
            n, mean, r = _chan_merge_root(n, mean, r, n_t, mean_t, r_t)
        tl.store(pmean_ptr + ps * C + c1, mean, mask=redo)
        tl.store(pr_ptr + ps * C + c1, r, mask=redo)


@triton.jit
def fwd_finalize_kernel(pn_ptr, pmean_ptr, pr_ptr, S, C, M, unbias, eps, momentum,
                        rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr, flag_ptr,
                        HAS_RMEAN: tl.constexpr, HAS_RVAR: tl.constexpr, CHECK: tl.constexpr,
                        MOMENTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the S partials of each channel in a fixed order, then finish the statistics;
    with MOMENTS, store the merged mean and M2 instead (float64: M2 may pass float32's
    range) into ``mean_ptr`` and ``invstd_ptr``.

    A chunk of BLOCK_S partials is combined exactly (mean of means weighted by count, r the
    scaled root of the partials' M2 plus the between-partial term about the chunk's mean);
    chunks are Chan-merged in order.
    """
    pc = tl.program_id(0)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[:, None]
        m = (s < S) & cmask[None, :]
        off = s * C + c[None, :]
        pn = tl.load(pn_ptr + off, mask=m, other=0.0)
        pmean = tl.load(pmean_ptr + off, mask=m, other=0.0)
        pr = tl.load(pr_ptr + off, mask=m, other=0.0)
        n_k = tl.sum(pn, axis=0)
        mean_k = tl.sum(pn / tl.maximum(n_k, 1.0)[None, :] * pmean, axis=0)
        e = tl.sqrt(pn) * tl.abs(tl.where(m, pmean - mean_k[None, :], 0.0))
        k = _scale_of(tl.maximum(tl.max(pr, axis=0), tl.max(e, axis=0)))
        pr = pr * (1.0 / k)[None, :]
        e = e * (1.0 / k)[None, :]
        r_k = k * tl.sqrt(tl.sum(pr * pr + e * e, axis=0))
        n, mean, r = _chan_merge_root(n, mean, r, n_k, mean_k, r_k)
    if MOMENTS:
        r64 = r.to(tl.float64)
        tl.store(mean_ptr + c, mean.to(tl.float64), mask=cmask)
        tl.store(invstd_ptr + c, r64 * r64, mask=cmask)
    else:
        _, bad = _finish_stats(c, cmask, mean, r, M, unbias, eps, momentum, rmean_ptr,
                               rvar_ptr, mean_ptr, invstd_ptr, HAS_RMEAN, HAS_RVAR)
        if CHECK:
            tl.store(flag_ptr + c, bad.to(tl.int8), mask=cmask)


@triton.jit
def fwd_apply_kernel(x_ptr, sxa, sxc, sxb, z_ptr, sza, szc, szb, y_ptr, sya, syc, syb,
                     A, C, B, n_tb, T, TPP, mean_ptr, stat_ptr, gamma_ptr, beta_ptr, eps,
                     slope, flag_ptr, FROM_VAR: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     HAS_BETA: tl.constexpr, HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr,
                     CHECK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_B: tl.constexpr, I64: tl.constexpr):
    """y = act((x - mean) * invstd * gamma + beta + z) over the split's tiles.

    ``stat_ptr`` holds invstd, or with FROM_VAR (inference) the variance, from which invstd
    is computed here with ``eps``. With CHECK, flags[ps, c] = 1 where any y is not finite.
    """
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean = tl.load(mean_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    if FROM_VAR:
        denom = tl.load(stat_ptr + c1, mask=cmask, other=1.0).to(tl.float32) + eps
        scale = tl.where(denom == 0.0, 0.0, 1.0 / tl.sqrt(denom))
    else:
        scale = tl.load(stat_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BETA:
        shift = tl.load(beta_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    bad = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t0 = ps * TPP
    t1 = tl.minimum(t0 + TPP, T)
    for t in range(t0, t1):
        a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
        v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                    other=0.0).to(tl.float32)
        y = _epilogue((v - _bcast(mean)) * _bcast(scale) + _bcast(shift), z_ptr, sza, szc,
                      szb, a0, c0, b0, ra, rc, rb, mask, slope, HAS_RES, HAS_ACT)
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(_at(y_ptr, a0, c0, b0, ra, rc, rb, sya, syc, syb), y, mask=mask)
        if CHECK:
            bad = tl.maximum(bad, _nonfinite_channels(y, mask))
    if CHECK:
        tl.store(flag_ptr + ps * C + c1, bad.to(tl.int8), mask=cmask)


@triton.jit
def fwd_persistent_kernel(x_ptr, sxa, sxc, sxb, z_ptr, sza, szc, szb, y_ptr, sya, syc, syb,
                          A, C, B, M, unbias, eps, momentum, slope, gamma_ptr, beta_ptr,
                          rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr, flag_ptr,
                          HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                          HAS_RMEAN: tl.constexpr, HAS_RVAR: tl.constexpr,
                          HAS_RES: tl.constexpr, HAS_ACT: tl.constexpr, CHECK: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                          I64: tl.constexpr):
    """One read of x: the channel block's whole slice stays in registers from stats to y.

    The tile covers all of A and B (BLOCK_A >= A, BLOCK_B >= B); mean and variance are
    two-pass over the registers, so this is exactly as accurate as the split path. Sums
    that overflow are taken again from the registers, scaled (one tile live at a time: the
    mean's from x before the deviations exist, M2's from the deviations).
    """
    pc = tl.program_id(0)
    a0, c0, b0, ra, rc, rb, mask = _tile(pc, 0, 1, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
    v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                other=0.0).to(tl.float32)
    mean = _sum_ab(v) / M
    if _any(~_finite(mean)):
        mean = tl.where(_finite(mean), mean, _scaled_mean(v, M))
    d = tl.where(mask, v - _bcast(mean), 0.0)
    r = tl.sqrt(_sum_ab(d * d))
    if _any(~_finite(r)):
        r = tl.where(_finite(r), r, _scaled_root(d))
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    invstd, bad = _finish_stats(c1, cmask, mean, r, M, unbias, eps, momentum, rmean_ptr,
                                rvar_ptr, mean_ptr, invstd_ptr, HAS_RMEAN, HAS_RVAR)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    y = d * _bcast(scale)
    if HAS_BETA:
        y += _bcast(tl.load(beta_ptr + c1, mask=cmask, other=0.0).to(tl.float32))
    y = _epilogue(y, z_ptr, sza, szc, szb, a0, c0, b0, ra, rc, rb, mask, slope, HAS_RES,
                  HAS_ACT)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(_at(y_ptr, a0, c0, b0, ra, rc, rb, sya, syc, syb), y, mask=mask)
    if CHECK:
        bad = tl.maximum(bad, _nonfinite_channels(y, mask))
        tl.store(flag_ptr + c1, bad.to(tl.int8), mask=cmask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                 HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, FROM_Y: tl.constexpr):
    """Per channel: mean, invstd, k = gamma * invstd, and for the recovery from y the shift
    beta and 1 / gamma (the caller guarantees |gamma| >= GAMMA_MIN there)."""
    invstd = tl.load(invstd_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    k = invstd
    rgamma = tl.zeros_like(invstd) + 1.0
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c1, mask=cmask, other=1.0).to(tl.float32)
        k = k * gamma
        if FROM_Y:
            rgamma = 1.0 / gamma
    mean = tl.zeros_like(invstd)
    if not FROM_Y:
        mean = tl.load(mean_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.zeros_like(invstd)
    if FROM_Y and HAS_BETA:
        shift = tl.load(beta_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    return mean, invstd, k, shift, rgamma


@triton.jit
def _bwd_tile(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
              a0, c0, b0, ra, rc, rb, mask, mean, invstd, shift, rgamma, slope,
              HAS_ACT: tl.constexpr, FROM_Y: tl.constexpr, XHAT: tl.constexpr):
    """``(g, xhat)`` of one tile, 0 outside the mask (contract §8): g = dy * act'(pre), with
    act' read off the sign of y (1 where y > 0, the slope elsewhere); with XHAT, xhat from x
    or, with FROM_Y (x overwritten by y), xhat = (act^-1(y) - beta) / gamma. y is loaded
    once for both. Without XHAT the second value is g again (not used)."""
    g = tl.load(_at(dy_ptr, a0, c0, b0, ra, rc, rb, sda, sdc, sdb), mask=mask,
                other=0.0).to(tl.float32)
    if HAS_ACT or (FROM_Y and XHAT):
        yv = tl.load(_at(y_ptr, a0, c0, b0, ra, rc, rb, sya, syc, syb), mask=mask,
                     other=0.0).to(tl.float32)
        if HAS_ACT:
            g = tl.where(yv > 0, g, g * slope)
    xhat = g
    if XHAT:
        if FROM_Y:
            pre = yv
            if HAS_ACT:
                pre = tl.where(yv > 0, yv, yv * (1.0 / slope))
            xhat = (pre - _bcast(shift)) * _bcast(rgamma)
        else:
            v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                        other=0.0).to(tl.float32)
            xhat = (v - _bcast(mean)) * _bcast(invstd)
        xhat = tl.where(mask, xhat, 0.0)
    return g, xhat


@triton.jit
def bwd_partial_kernel(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
                       dx_ptr, sga, sgc, sgb, dz_ptr, sza, szc, szb, A, C, B, n_tb, T, TPP,
                       mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, slope, psum_ptr, pdot_ptr,
                       HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                       HAS_ACT: tl.constexpr, FROM_Y: tl.constexpr, WRITE_DX: tl.constexpr,
                       WRITE_DZ: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_B: tl.constexpr, I64: tl.constexpr):
    """Per (split, channel): sum(g) and sum(g * xhat) -> partials[S, C].

    With WRITE_DX (inference backward, where dx = gamma * invstd * g does not depend on the
    sums) dx, and with WRITE_DZ dz = g, are written in the same pass, so inference backward
    reads its inputs once.
    """
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean, invstd, k, shift, rgamma = _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr,
                                                  beta_ptr, HAS_GAMMA, HAS_BETA, FROM_Y)
    s_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t0 = ps * TPP
    t1 = tl.minimum(t0 + TPP, T)
    for t in range(t0, t1):
        a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
        g, xhat = _bwd_tile(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
                            a0, c0, b0, ra, rc, rb, mask, mean, invstd, shift, rgamma, slope,
                            HAS_ACT, FROM_Y, True)
        s_g += _sum_ab(g)
        s_gx += _sum_ab(g * xhat)
        if WRITE_DX:
            dx = (g * _bcast(k)).to(dx_ptr.dtype.element_ty)
            tl.store(_at(dx_ptr, a0, c0, b0, ra, rc, rb, sga, sgc, sgb), dx, mask=mask)
            if WRITE_DZ:
                tl.store(_at(dz_ptr, a0, c0, b0, ra, rc, rb, sza, szc, szb),
                         g.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(psum_ptr + ps * C + c1, s_g, mask=cmask)
    tl.store(pdot_ptr + ps * C + c1, s_gx, mask=cmask)


@triton.jit
def bwd_finalize_kernel(psum_ptr, pdot_ptr, S, C, dgamma_ptr, dbeta_ptr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dbeta = sum of the partial sum(g); dgamma = sum of the partial sum(g * xhat).

    Partials are summed in a fixed order (chunks of BLOCK_S, then chunk after chunk).
    """
    pc = tl.program_id(0)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[:, None]
        m = (s < S) & cmask[None, :]
        s_g += tl.sum(tl.load(psum_ptr + s * C + c[None, :], mask=m, other=0.0), axis=0)
        s_gx += tl.sum(tl.load(pdot_ptr + s * C + c[None, :], mask=m, other=0.0), axis=0)
    tl.store(dbeta_ptr + c, s_g, mask=cmask)
    tl.store(dgamma_ptr + c, s_gx, mask=cmask)


@triton.jit
def bwd_apply_kernel(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
                     dx_ptr, sga, sgc, sgb, dz_ptr, sza, szc, szb, A, C, B, n_tb, T, TPP, M,
                     mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, slope, dgamma_ptr, dbeta_ptr,
                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_ACT: tl.constexpr,
                     FROM_Y: tl.constexpr, WRITE_DZ: tl.constexpr, TRAINING: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                     I64: tl.constexpr):
    """dx = gamma * invstd * (g - (dbeta + xhat * dgamma) / M) (TRAINING; M the count the
    sums were taken over), else dx = gamma * invstd * g; with WRITE_DZ also dz = g."""
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean, invstd, k, shift, rgamma = _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr,
                                                  beta_ptr, HAS_GAMMA, HAS_BETA, FROM_Y)
    db_m = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dg_m = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TRAINING:
        db_m = tl.load(dbeta_ptr + c1, mask=cmask, other=0.0).to(tl.float32) / M
        dg_m = tl.load(dgamma_ptr + c1, mask=cmask, other=0.0).to(tl.float32) / M
    t0 = ps * TPP
    t1 = tl.minimum(t0 + TPP, T)
    for t in range(t0, t1):
        a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
        g, xhat = _bwd_tile(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
                            a0, c0, b0, ra, rc, rb, mask, mean, invstd, shift, rgamma, slope,
                            HAS_ACT, FROM_Y, TRAINING)
        if TRAINING:
            dx = _bcast(k) * (g - _bcast(db_m) - xhat * _bcast(dg_m))
        else:
            dx = _bcast(k) * g
        tl.store(_at(dx_ptr, a0, c0, b0, ra, rc, rb, sga, sgc, sgb),
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DZ:
            tl.store(_at(dz_ptr, a0, c0, b0, ra, rc, rb, sza, szc, szb),
                     g.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_persistent_kernel(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
                          dx_ptr, sga, sgc, sgb, dz_ptr, sza, szc, szb, A, C, B, M,
                          mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, slope, dgamma_ptr,
                          dbeta_ptr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                          HAS_ACT: tl.constexpr, FROM_Y: tl.constexpr, WRITE_DZ: tl.constexpr,
                          TRAINING: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_B: tl.constexpr, I64: tl.constexpr):
    """One read of the inputs: sums, dx (and dz) for a channel block whose slice fits in
    registers."""
    pc = tl.program_id(0)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean, invstd, k, shift, rgamma = _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr,
                                                  beta_ptr, HAS_GAMMA, HAS_BETA, FROM_Y)
    a0, c0, b0, ra, rc, rb, mask = _tile(pc, 0, 1, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
    g, xhat = _bwd_tile(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, y_ptr, sya, syc, syb,
                        a0, c0, b0, ra, rc, rb, mask, mean, invstd, shift, rgamma, slope,
                        HAS_ACT, FROM_Y, True)
    dbeta = _sum_ab(g)
    dgamma = _sum_ab(g * xhat)
    tl.store(dbeta_ptr + c1, dbeta, mask=cmask)
    tl.store(dgamma_ptr + c1, dgamma, mask=cmask)
    if WRITE_DZ:
        tl.store(_at(dz_ptr, a0, c0, b0, ra, rc, rb, sza, szc, szb),
                 g.to(dz_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        dx = _bcast(k) * (g - _bcast(dbeta / M) - xhat * _bcast(dgamma / M))
    else:
        dx = _bcast(k) * g
    tl.store(_at(dx_ptr, a0, c0, b0, ra, rc, rb, sga, sgc, sgb),
             dx.to(dx_ptr.dtype.element_ty), mask=mask)
