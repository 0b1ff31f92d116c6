"""Numba kernels of the CPU backend, on the canonical ``(A, C, B)`` view.

Two data orders, two kernel families:

* ``*_cmajor`` (B > 1, e.g. NCHW): a channel's values are ``A`` runs of ``B`` contiguous
  elements. Threads take whole channels; a channel's statistics are taken in one read and
  the channel is normalized right after, while its slice is still in this core's cache
  (the ``spatial_persistent`` algorithm; ``spatial`` is the same code).
* ``*_rows`` (B == 1: channels-last and per-activation, a ``(rows, C)`` matrix with C
  contiguous): threads take blocks of rows and keep per-thread partial sums of length C
  (vectorized across channels), merged once; the apply pass then revisits the same rows on
  the same thread, so a block that fits in cache is read from memory only once.

Statistics are shifted sums in float64: with ``k`` a value of the channel,
``var = E[(x-k)^2] - E[x-k]^2``, whose cancellation is bounded by ``((mu-k)/sigma)^2`` and
absorbed by float64's 53 bits (a constant channel gives exactly 0). Outputs are formed in
float64 as ``(x - mu) * scale + beta`` so a large mean does not cost float32 digits.

``bad`` collects ``sum(y - y)`` per channel (of the stored y) when asked: 0 for finite
outputs, NaN as soon as one output is Inf or NaN, so ``check_finite`` needs no extra pass.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

# reassoc lets LLVM vectorize the reductions; no nnan/ninf: NaN and Inf must propagate.
_OPTS = dict(parallel=True, cache=True, nogil=True, error_model="numpy",
             fastmath={"reassoc", "contract", "nsz", "arcp"})


@nb.njit(cache=True, nogil=True)
def _finish_stats(s1, s2, k, m, eps, gamma, beta, has_gamma, has_beta, c, mean, var, invstd,
                  scale, shift):
    """Mean, biased var and invstd of channel c from shifted sums; scale/shift of its apply."""
    dm = s1 / m
    v = s2 / m - dm * dm
    if v < 0.0:  # rounding only; keeps NaN
        v = 0.0
    mu = k + dm
    den = v + eps
    inv = 0.0 if den == 0.0 else 1.0 / np.sqrt(den)
    g = np.float64(gamma[c]) if has_gamma else 1.0
    mean[c] = mu
    var[c] = v
    invstd[c] = inv
    scale[c] = g * inv
    shift[c] = np.float64(beta[c]) if has_beta else 0.0


@nb.njit(**_OPTS)
def fwd_train_cmajor(x, gamma, beta, has_gamma, has_beta, eps, y, mean, var, invstd, bad,
                     check):
    """Per channel: shifted sums, then y = (x - mu) * gamma * invstd + beta (slice in cache).

    Args: x, y [A, C, B]; gamma, beta [C] (ignored unless has_*); mean, var, invstd, bad [C]
    float64 outputs (var biased).
    """
    na, nc, nb_ = x.shape
    m = na * nb_
    scale = np.empty(nc)
    shift = np.empty(nc)
    for c in prange(nc):
        k = np.float64(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        for a in range(na):
            for b in range(nb_):
                d = np.float64(x[a, c, b]) - k
                s1 += d
                s2 += d * d
        _finish_stats(s1, s2, k, m, eps, gamma, beta, has_gamma, has_beta, c, mean, var,
                      invstd, scale, shift)
        mu = mean[c]
        sc = scale[c]
        sh = shift[c]
        acc = 0.0
        for a in range(na):
            for b in range(nb_):
                y[a, c, b] = (np.float64(x[a, c, b]) - mu) * sc + sh
                if check:  # the stored value: the cast to y's dtype may overflow
                    w = y[a, c, b]
                    acc += w - w
        bad[c] = acc


@nb.njit(**_OPTS)
def fwd_train_rows(x, gamma, beta, has_gamma, has_beta, eps, y, mean, var, invstd, bad,
                   check, nt):
    """Rows version of :func:`fwd_train_cmajor` with nt row blocks (one per thread).

    Args: x, y [R, C]; the rest as there.
    """
    nr, nc = x.shape
    k = np.empty(nc)
    for c in range(nc):
        k[c] = np.float64(x[0, c])
    p1 = np.zeros((nt, nc))
    p2 = np.zeros((nt, nc))
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        s1 = np.zeros(nc)
        s2 = np.zeros(nc)
        for r in range(r0, r1):
            for c in range(nc):
                d = np.float64(x[r, c]) - k[c]
                s1[c] += d
                s2[c] += d * d
        p1[t, :] = s1
        p2[t, :] = s2
    scale = np.empty(nc)
    shift = np.empty(nc)
    for c in range(nc):
        s1 = 0.0
        s2 = 0.0
        for t in range(nt):
            s1 += p1[t, c]
            s2 += p2[t, c]
        _finish_stats(s1, s2, k[c], nr, eps, gamma, beta, has_gamma, has_beta, c, mean, var,
                      invstd, scale, shift)
    apply_rows(x, mean, scale, shift, y, bad, check, nt)


@nb.njit(**_OPTS)
def apply_rows(x, mu, scale, shift, y, bad, check, nt):
    """y[r, c] = (x[r, c] - mu[c]) * scale[c] + shift[c], rows split into nt blocks.

    Also the inference kernel for rows. Args: x, y [R, C]; mu, scale, shift, bad [C].
    """
    nr, nc = x.shape
    acc = np.zeros((nt, nc))
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        if check:
            a = np.zeros(nc)
            for r in range(r0, r1):
                for c in range(nc):
                    y[r, c] = (np.float64(x[r, c]) - mu[c]) * scale[c] + shift[c]
                    w = y[r, c]
                    a[c] += w - w
            acc[t, :] = a
        else:
            for r in range(r0, r1):
                for c in range(nc):
                    y[r, c] = (np.float64(x[r, c]) - mu[c]) * scale[c] + shift[c]
    if check:
        for c in range(nc):
            s = 0.0
            for t in range(nt):
                s += acc[t, c]
            bad[c] = s


@nb.njit(**_OPTS)
def affine_cmajor(x, mu, scale, shift, y):
    """Inference: y = (x - mu[c]) * scale[c] + shift[c]. Args: x, y [A, C, B]; rest [C]."""
    na, nc, nb_ = x.shape
    # Parallel over (a, c) runs so that few channels still use every thread.
    for i in prange(na * nc):
        a = i // nc
        c = i - a * nc
        m = mu[c]
        sc = scale[c]
        sh = shift[c]
        for b in range(nb_):
            y[a, c, b] = (np.float64(x[a, c, b]) - m) * sc + sh


@nb.njit(**_OPTS)
def bwd_cmajor(dy, x, mean, invstd, gamma, has_gamma, training, dx, dgamma, dbeta):
    """Per channel: dbeta = sum dy, dgamma = sum dy*xhat, then dx, slice still in cache.

    dx = g*inv*(dy - (dbeta + xhat*dgamma)/M) in training, g*inv*dy otherwise.
    Args: dy, x, dx [A, C, B]; mean, invstd, gamma [C]; dgamma, dbeta [C] float64 outputs.
    """
    na, nc, nb_ = x.shape
    m = na * nb_
    for c in prange(nc):
        mu = np.float64(mean[c])
        inv = np.float64(invstd[c])
        sd = 0.0
        sdx = 0.0
        for a in range(na):
            for b in range(nb_):
                g = np.float64(dy[a, c, b])
                sd += g
                sdx += g * (np.float64(x[a, c, b]) - mu)
        dg = sdx * inv
        dbeta[c] = sd
        dgamma[c] = dg
        k1 = (np.float64(gamma[c]) if has_gamma else 1.0) * inv
        if training:
            k2 = -k1 * inv * dg / m
            k3 = -k1 * sd / m
            for a in range(na):
                for b in range(nb_):
                    dx[a, c, b] = (k1 * np.float64(dy[a, c, b])
                                   + k2 * (np.float64(x[a, c, b]) - mu) + k3)
        else:
            for a in range(na):
                for b in range(nb_):
                    dx[a, c, b] = k1 * np.float64(dy[a, c, b])


@nb.njit(**_OPTS)
def bwd_rows(dy, x, mean, invstd, gamma, has_gamma, training, dx, dgamma, dbeta, nt):
    """Rows version of :func:`bwd_cmajor` with nt row blocks. Args: dy, x, dx [R, C]."""
    nr, nc = x.shape
    mu = np.empty(nc)
    for c in range(nc):
        mu[c] = np.float64(mean[c])
    p1 = np.zeros((nt, nc))
    p2 = np.zeros((nt, nc))
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        s1 = np.zeros(nc)
        s2 = np.zeros(nc)
        for r in range(r0, r1):
            for c in range(nc):
                g = np.float64(dy[r, c])
                s1[c] += g
                s2[c] += g * (np.float64(x[r, c]) - mu[c])
        p1[t, :] = s1
        p2[t, :] = s2
    k1 = np.empty(nc)
    k2 = np.empty(nc)
    k3 = np.empty(nc)
    for c in range(nc):
        sd = 0.0
        sdx = 0.0
        for t in range(nt):
            sd += p1[t, c]
            sdx += p2[t, c]
        inv = np.float64(invstd[c])
        dg = sdx * inv
        dbeta[c] = sd
        dgamma[c] = dg
        k1[c] = (np.float64(gamma[c]) if has_gamma else 1.0) * inv
        k2[c] = -k1[c] * inv * dg / nr if training else 0.0
        k3[c] = -k1[c] * sd / nr if training else 0.0
    for t in prange(nt):
        r0 = t * nr // nt
        r1 = (t + 1) * nr // nt
        if training:
            for r in range(r0, r1):
                for c in range(nc):
                    dx[r, c] = (k1[c] * np.float64(dy[r, c])
                                + k2[c] * (np.float64(x[r, c]) - mu[c]) + k3[c])
        else:
            for r in range(r0, r1):
                for c in range(nc):
                    dx[r, c] = k1[c] * np.float64(dy[r, c])
