"""Triton kernels of the gpu backend; the launchers in :mod:`batchnorm.backends.gpu` drive them.

Every kernel sees a strided 3-d view ``(A, C, B)`` of its tensors, reduced over A and B, and
works on tiles ``[BLOCK_A, BLOCK_C, BLOCK_B]``. Channels-first inputs (NCHW) use tiles with
``BLOCK_C = 1`` and a long contiguous B run; channels-last inputs arrive as ``(M, C, 1)`` and
use tiles that are wide in C. Tiles of the (A, B) plane are numbered ``t = ta * n_tb + tb``;
program ``(pc, ps)`` of a split kernel owns channel block ``pc`` and tiles
``[ps * TPP, (ps + 1) * TPP)``.

Statistics are float32 whatever the input dtype. Partial results are merged in a fixed order,
so every result is deterministic run to run; no kernel waits on another program.
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
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: merge (count, mean, M2) of two disjoint sets; empty sets are neutral."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    m2 = m2_a + m2_b + delta * delta * n_a * w
    return n, mean, m2


@triton.jit
def _finish_stats(c, cmask, mean, var, unbias, eps, momentum, gamma_ptr, rmean_ptr, rvar_ptr,
                  mean_ptr, invstd_ptr, scale_ptr, HAS_GAMMA: tl.constexpr,
                  HAS_RMEAN: tl.constexpr, HAS_RVAR: tl.constexpr):
    """Per channel: invstd (0 where var + eps == 0), saved stats, running update, scale.

    Returns (invstd, scale, bad) with bad = 1.0 where mean or invstd is not finite.
    """
    denom = var + eps
    invstd = tl.where(denom == 0.0, 0.0, 1.0 / tl.sqrt(denom))
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
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + c, scale, mask=cmask)
    ok = (mean == mean) & (tl.abs(mean) < float("inf"))
    ok = ok & (invstd == invstd) & (tl.abs(invstd) < float("inf"))
    return invstd, scale, tl.where(ok, 0.0, 1.0)


# ----------------------------------------------------------------------------- forward


@triton.jit
def fwd_partial_kernel(x_ptr, sxa, sxc, sxb, A, C, B, n_tb, T, TPP,
                       pn_ptr, pmean_ptr, pm2_ptr,
                       BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                       I64: tl.constexpr):
    """Per (split, channel): count, mean and M2 of the split's tiles -> partials[S, C].

    Each tile is reduced two-pass in registers, then Chan-merged into the program's total,
    so no sum of squares ever cancels.
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
    tl.store(pn_ptr + ps * C + c1, n, mask=cmask)
    tl.store(pmean_ptr + ps * C + c1, mean, mask=cmask)
    tl.store(pm2_ptr + ps * C + c1, m2, mask=cmask)


@triton.jit
def fwd_finalize_kernel(pn_ptr, pmean_ptr, pm2_ptr, S, C, M, unbias, eps, momentum,
                        gamma_ptr, rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr, scale_ptr, flag_ptr,
                        HAS_GAMMA: tl.constexpr, HAS_RMEAN: tl.constexpr,
                        HAS_RVAR: tl.constexpr, CHECK: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the S partials of each channel in a fixed order, then finish the statistics.

    A chunk of BLOCK_S partials is combined exactly (mean of means weighted by count, M2 plus
    the between-partial term about the chunk's mean); chunks are Chan-merged in order.
    """
    pc = tl.program_id(0)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[:, None]
        m = (s < S) & cmask[None, :]
        off = s * C + c[None, :]
        pn = tl.load(pn_ptr + off, mask=m, other=0.0)
        pmean = tl.load(pmean_ptr + off, mask=m, other=0.0)
        pm2 = tl.load(pm2_ptr + off, mask=m, other=0.0)
        n_k = tl.sum(pn, axis=0)
        mean_k = tl.sum(pn * pmean, axis=0) / tl.maximum(n_k, 1.0)
        d = tl.where(m, pmean - mean_k[None, :], 0.0)
        m2_k = tl.sum(pm2, axis=0) + tl.sum(pn * d * d, axis=0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_k, mean_k, m2_k)
    var = m2 / M
    _, _, bad = _finish_stats(c, cmask, mean, var, unbias, eps, momentum, gamma_ptr,
                              rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr, scale_ptr,
                              HAS_GAMMA, HAS_RMEAN, HAS_RVAR)
    if CHECK:
        tl.store(flag_ptr + c, bad.to(tl.int8), mask=cmask)


@triton.jit
def fwd_apply_kernel(x_ptr, sxa, sxc, sxb, y_ptr, sya, syc, syb, A, C, B, n_tb, T, TPP,
                     mean_ptr, scale_ptr, var_ptr, gamma_ptr, beta_ptr, eps, flag_ptr,
                     FROM_VAR: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                     CHECK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_B: tl.constexpr, I64: tl.constexpr):
    """y = (x - mean) * scale + beta over the split's tiles.

    ``scale`` is gamma * invstd, read from ``scale_ptr``, or (FROM_VAR, inference) computed
    here from ``var`` and ``eps``. With CHECK, flags[ps, c] = 1 where any y is not finite.
    """
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean = tl.load(mean_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    if FROM_VAR:
        denom = tl.load(var_ptr + c1, mask=cmask, other=1.0).to(tl.float32) + eps
        scale = tl.where(denom == 0.0, 0.0, 1.0 / tl.sqrt(denom))
        if HAS_GAMMA:
            scale = scale * tl.load(gamma_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    else:
        scale = tl.load(scale_ptr + c1, mask=cmask, other=0.0)
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
        y = ((v - _bcast(mean)) * _bcast(scale) + _bcast(shift)).to(y_ptr.dtype.element_ty)
        tl.store(_at(y_ptr, a0, c0, b0, ra, rc, rb, sya, syc, syb), y, mask=mask)
        if CHECK:
            yf = y.to(tl.float32)
            nonfinite = mask & ((yf != yf) | (tl.abs(yf) == float("inf")))
            bad = tl.maximum(bad, tl.max(tl.max(nonfinite.to(tl.float32), axis=2), axis=0))
    if CHECK:
        tl.store(flag_ptr + ps * C + c1, bad.to(tl.int8), mask=cmask)


@triton.jit
def fwd_persistent_kernel(x_ptr, sxa, sxc, sxb, y_ptr, sya, syc, syb, A, C, B, M, unbias, eps,
                          momentum, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, mean_ptr,
                          invstd_ptr, scale_ptr, flag_ptr,
                          HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                          HAS_RMEAN: tl.constexpr, HAS_RVAR: tl.constexpr, CHECK: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                          I64: tl.constexpr):
    """One read of x: the channel block's whole slice stays in registers from stats to y.

    The tile covers all of A and B (BLOCK_A >= A, BLOCK_B >= B); mean and variance are
    two-pass over the registers, so this is exactly as accurate as the split path.
    """
    pc = tl.program_id(0)
    a0, c0, b0, ra, rc, rb, mask = _tile(pc, 0, 1, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
    v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                other=0.0).to(tl.float32)
    mean = _sum_ab(v) / M
    d = tl.where(mask, v - _bcast(mean), 0.0)
    var = _sum_ab(d * d) / M
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    invstd, scale, bad = _finish_stats(c1, cmask, mean, var, unbias, eps, momentum,
                                       gamma_ptr, rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr,
                                       scale_ptr, HAS_GAMMA, HAS_RMEAN, HAS_RVAR)
    y = d * _bcast(scale)
    if HAS_BETA:
        y += _bcast(tl.load(beta_ptr + c1, mask=cmask, other=0.0).to(tl.float32))
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(_at(y_ptr, a0, c0, b0, ra, rc, rb, sya, syc, syb), y, mask=mask)
    if CHECK:
        yf = y.to(tl.float32)
        nonfinite = mask & ((yf != yf) | (tl.abs(yf) == float("inf")))
        bad = tl.maximum(bad, tl.max(tl.max(nonfinite.to(tl.float32), axis=2), axis=0))
        tl.store(flag_ptr + c1, bad.to(tl.int8), mask=cmask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr, HAS_GAMMA: tl.constexpr):
    """Per channel: mean, invstd and k = gamma * invstd."""
    mean = tl.load(mean_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    k = invstd
    if HAS_GAMMA:
        k = k * tl.load(gamma_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
    return mean, invstd, k


@triton.jit
def bwd_partial_kernel(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, dx_ptr, sga, sgc, sgb,
                       A, C, B, n_tb, T, TPP, mean_ptr, invstd_ptr, gamma_ptr,
                       psum_ptr, pdot_ptr, HAS_GAMMA: tl.constexpr, WRITE_DX: tl.constexpr,
                       BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                       I64: tl.constexpr):
    """Per (split, channel): sum(dy) and sum(dy * (x - mean)) -> partials[S, C].

    With WRITE_DX (inference backward, where dx = gamma * invstd * dy does not depend on the
    sums) dx is written in the same pass, so inference backward reads x and dy once.
    """
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean, invstd, k = _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr, HAS_GAMMA)
    s_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t0 = ps * TPP
    t1 = tl.minimum(t0 + TPP, T)
    for t in range(t0, t1):
        a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
        v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.load(_at(dy_ptr, a0, c0, b0, ra, rc, rb, sda, sdc, sdb), mask=mask,
                    other=0.0).to(tl.float32)
        s_dy += _sum_ab(g)
        s_dot += _sum_ab(tl.where(mask, g * (v - _bcast(mean)), 0.0))
        if WRITE_DX:
            dx = (g * _bcast(k)).to(dx_ptr.dtype.element_ty)
            tl.store(_at(dx_ptr, a0, c0, b0, ra, rc, rb, sga, sgc, sgb), dx, mask=mask)
    tl.store(psum_ptr + ps * C + c1, s_dy, mask=cmask)
    tl.store(pdot_ptr + ps * C + c1, s_dot, mask=cmask)


@triton.jit
def bwd_finalize_kernel(psum_ptr, pdot_ptr, S, C, invstd_ptr, dgamma_ptr, dbeta_ptr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dbeta = sum of partial sum(dy); dgamma = invstd * sum of partial sum(dy * (x - mean)).

    Partials are summed in a fixed order (chunks of BLOCK_S, then chunk after chunk).
    """
    pc = tl.program_id(0)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[:, None]
        m = (s < S) & cmask[None, :]
        s_dy += tl.sum(tl.load(psum_ptr + s * C + c[None, :], mask=m, other=0.0), axis=0)
        s_dot += tl.sum(tl.load(pdot_ptr + s * C + c[None, :], mask=m, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    tl.store(dbeta_ptr + c, s_dy, mask=cmask)
    tl.store(dgamma_ptr + c, s_dot * invstd, mask=cmask)


@triton.jit
def bwd_apply_kernel(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, dx_ptr, sga, sgc, sgb,
                     A, C, B, n_tb, T, TPP, M, mean_ptr, invstd_ptr, gamma_ptr,
                     dgamma_ptr, dbeta_ptr, HAS_GAMMA: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                     I64: tl.constexpr):
    """dx = gamma * invstd * (dy - (dbeta + xhat * dgamma) / M), xhat = (x - mean) * invstd."""
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean, invstd, k = _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr, HAS_GAMMA)
    db_m = tl.load(dbeta_ptr + c1, mask=cmask, other=0.0) / M
    dg_m = tl.load(dgamma_ptr + c1, mask=cmask, other=0.0) / M
    t0 = ps * TPP
    t1 = tl.minimum(t0 + TPP, T)
    for t in range(t0, t1):
        a0, c0, b0, ra, rc, rb, mask = _tile(pc, t, n_tb, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
        v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.load(_at(dy_ptr, a0, c0, b0, ra, rc, rb, sda, sdc, sdb), mask=mask,
                    other=0.0).to(tl.float32)
        xhat = (v - _bcast(mean)) * _bcast(invstd)
        dx = _bcast(k) * (g - _bcast(db_m) - xhat * _bcast(dg_m))
        tl.store(_at(dx_ptr, a0, c0, b0, ra, rc, rb, sga, sgc, sgb),
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_persistent_kernel(x_ptr, sxa, sxc, sxb, dy_ptr, sda, sdc, sdb, dx_ptr, sga, sgc, sgb,
                          A, C, B, M, mean_ptr, invstd_ptr, gamma_ptr, dgamma_ptr, dbeta_ptr,
                          HAS_GAMMA: tl.constexpr, TRAINING: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                          I64: tl.constexpr):
    """One read of x and dy: sums and dx for a channel block whose slice fits in registers."""
    pc = tl.program_id(0)
    c1 = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    mean, invstd, k = _bwd_channel(c1, cmask, mean_ptr, invstd_ptr, gamma_ptr, HAS_GAMMA)
    a0, c0, b0, ra, rc, rb, mask = _tile(pc, 0, 1, A, C, B, BLOCK_A, BLOCK_C, BLOCK_B, I64)
    v = tl.load(_at(x_ptr, a0, c0, b0, ra, rc, rb, sxa, sxc, sxb), mask=mask,
                other=0.0).to(tl.float32)
    g = tl.load(_at(dy_ptr, a0, c0, b0, ra, rc, rb, sda, sdc, sdb), mask=mask,
                other=0.0).to(tl.float32)
    xhat = tl.where(mask, (v - _bcast(mean)) * _bcast(invstd), 0.0)
    dbeta = _sum_ab(g)
    dgamma = _sum_ab(g * xhat)
    tl.store(dbeta_ptr + c1, dbeta, mask=cmask)
    tl.store(dgamma_ptr + c1, dgamma, mask=cmask)
    if TRAINING:
        dx = _bcast(k) * (g - _bcast(dbeta / M) - xhat * _bcast(dgamma / M))
    else:
        dx = _bcast(k) * g
    tl.store(_at(dx_ptr, a0, c0, b0, ra, rc, rb, sga, sgc, sgb),
             dx.to(dx_ptr.dtype.element_ty), mask=mask)
