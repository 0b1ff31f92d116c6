"""The gpu backend: Triton kernels on CUDA ``torch.Tensor`` s (float16, bfloat16, float32).

Launchers with the signatures of :mod:`batchnorm.reference`; they take and return torch
tensors on x's device. Statistics, saved mean / invstd are float32; outputs have x's dtype.

Algorithms (kernels in :mod:`batchnorm.backends._triton_kernels`):

* persistent, when a block of channels' whole slice fits in one program's registers: one
  read of x, statistics two-pass in registers, then y (``mode="spatial_persistent"`` gets
  the same result; the algorithm is chosen by fit, for every mode);
* otherwise split: many programs each reduce a run of tiles to (count, mean, M2) partials,
  a small kernel merges them per channel in a fixed order (Chan's formula) and fuses the
  running-statistics update, then an apply kernel writes y. No program waits on another.

Backward is the same shape: fused partial sums of (dy, dy * (x - mean)), merge, apply.

Layouts: the kernels read strides, so NCHW, channels_last NCHW and NHWC tensors are used in
place. The input is copied only when it cannot be viewed as ``(A, C, B)``: when the kept
axes are not adjacent (an ``axis`` tuple such as ``(0, 2)`` on a rank-4 input) or when
reshaping a non-dense tensor needs it; outputs are then written to a buffer and copied back.

Interpreter: with ``TRITON_INTERPRET=1`` in the environment the launchers also accept CPU
tensors (the kernels then run in Triton's interpreter; used by the test suite). Even then
:func:`unavailable_reason` refuses CPU tensors, so ``backend="auto"`` never picks this
backend for CPU data.
"""

from __future__ import annotations

import os

import torch
import triton

from . import _triton_kernels as K

NAME = "gpu"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A program keeps at most this many elements of one tensor in registers (persistent path).
PERSISTENT_MAX_ELEMS = 8192
# Elements of one tile in the split kernels.
TILE_ELEMS = 2048
# Channel-block width for channels-last tiles: wide enough for coalesced loads.
CL_BLOCK_C = 64
# Split kernels aim for about this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 4
# Partials merged per step of the finalize kernels.
FINALIZE_BLOCK_S = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(x) -> str | None:
    """None for a CUDA float16 / bfloat16 / float32 tensor when Triton and CUDA work."""
    if not isinstance(x, torch.Tensor):
        return "the gpu backend works on CUDA torch tensors; use batchnorm.torch"
    if x.dtype not in _DTYPES:
        return f"the gpu backend supports float16, bfloat16 and float32, got {x.dtype}"
    if not x.is_cuda:
        return f"the gpu backend needs a CUDA tensor, got one on {x.device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _check_device(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError("the gpu backend works on torch tensors; use batchnorm.torch")
    if x.dtype not in _DTYPES:
        raise TypeError(f"the gpu backend supports float16, bfloat16 and float32, got {x.dtype}")
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(
            "the gpu backend needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a few programs, so the split path still has several splits


# ----------------------------------------------------------------------------- views


def _view3(t: torch.Tensor, layout) -> torch.Tensor | None:
    """The (A, C, B) view of t without copying, or None when none exists."""
    if not layout.kept_adjacent:
        t = t.permute(layout.perm)
    try:
        return t.view(layout.dims3)
    except RuntimeError:
        return None


def _input3(t: torch.Tensor, layout) -> torch.Tensor:
    """The (A, C, B) view of an input, copied to a contiguous buffer when no view exists."""
    v = _view3(t, layout)
    if v is None:
        v = t.permute(layout.perm).reshape(layout.dims3) if not layout.kept_adjacent \
            else t.reshape(layout.dims3)
    return v


class _Output:
    """An output tensor of x's shape plus the (A, C, B) tensor the kernels write.

    When ``out`` (or a fresh tensor like x) cannot be viewed as (A, C, B), the kernels write
    a contiguous buffer and :meth:`finish` copies it back.
    """

    def __init__(self, x: torch.Tensor, layout, out: torch.Tensor | None):
        self.full = torch.empty_like(x) if out is None else out
        v = _view3(self.full, layout)
        self.copy_back = v is None
        self.v3 = torch.empty(layout.dims3, dtype=x.dtype, device=x.device) if v is None else v
        self.layout = layout

    def finish(self) -> torch.Tensor:
        if self.copy_back:
            perm = self.layout.perm
            shape = [self.layout.shape[a] for a in perm]
            self.full.permute(perm).copy_(self.v3.view(shape))
        return self.full


def _geometry(tensors, dims3):
    """(A, C, B) and each tensor's strides, with A and B merged into A when all allow it.

    Merging turns channels-last views (N, C, HW) with strides (HW*C, 1, C) into (N*HW, C, 1),
    so the kernels see one long reduced axis and tiles wide in C.
    """
    A, C, B = dims3
    strides = [t.stride() for t in tensors]
    if B > 1 and all(s[0] == B * s[2] for s in strides):
        return (A * B, C, 1), [(s[2], s[1], 0) for s in strides]
    if B == 1:
        strides = [(s[0], s[1], 0) for s in strides]
    return (A, C, B), strides


def _blocks(dims3) -> tuple[int, int, int]:
    """Tile (BLOCK_A, BLOCK_C, BLOCK_B) of about TILE_ELEMS elements for the split kernels."""
    A, C, B = dims3
    np2 = triton.next_power_of_2
    if B == 1:  # channels-last: wide in C, which is the contiguous axis
        bc = min(np2(C), CL_BLOCK_C)
        return max(1, min(np2(A), TILE_ELEMS // bc)), bc, 1
    bb = min(np2(B), TILE_ELEMS)
    bc = min(np2(C), max(1, 32 // bb))  # short spatial runs: take a few channels at once
    return max(1, min(np2(A), TILE_ELEMS // (bb * bc))), bc, bb


def _persistent_blocks(dims3, limit=None) -> tuple[int, int, int] | None:
    """Tile covering all of A and B for a block of channels, or None when it does not fit."""
    limit = PERSISTENT_MAX_ELEMS if limit is None else limit
    A, C, B = dims3
    np2 = triton.next_power_of_2
    ba, bb = np2(A), np2(B)
    bc = min(np2(C), CL_BLOCK_C) if B == 1 else 1
    while bc > 16 and ba * bb * bc > limit:
        bc //= 2
    if ba * bb * bc > limit:
        return None
    return ba, bc, bb


def _needs_i64(tensors) -> bool:
    return any(
        sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)) >= 2**31 - 1
        for t in tensors
    )


def _split(dims3, blocks, device) -> tuple[int, int, int, int, int]:
    """(n_c, n_tb, T, TPP, S): channel blocks, tiles along B, tiles, tiles per split, splits."""
    A, C, B = dims3
    ba, bc, bb = blocks
    n_c = triton.cdiv(C, bc)
    n_tb = triton.cdiv(B, bb)
    T = triton.cdiv(A, ba) * n_tb
    want = max(1, PROGRAMS_PER_SM * _num_sms(device))
    splits = min(T, max(1, triton.cdiv(want, n_c)))
    tpp = triton.cdiv(T, splits)
    return n_c, n_tb, T, tpp, triton.cdiv(T, tpp)


def _param(p, device) -> torch.Tensor | None:
    """A per-channel parameter as a flat contiguous tensor on the device (dtype kept)."""
    if p is None:
        return None
    return torch.as_tensor(p, device=device).reshape(-1).contiguous()


def _warps(blocks) -> int:
    n = blocks[0] * blocks[1] * blocks[2]
    return 8 if n >= 4096 else 4 if n >= 1024 else 2


# ----------------------------------------------------------------------------- forward


def forward_training(x, gamma, beta, layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with the batch's mu and biased var.

    Args:
        x: [layout.shape] CUDA tensor (float16 / bfloat16 / float32).
        gamma, beta: [layout.param_shape] or None.
        running_mean, running_var: [layout.param_shape] tensors on x's device, updated in place.
        out: optional tensor of x's shape and dtype that receives y.

    Returns:
        (y, mean, invstd, bad): mean / invstd float32 [param_shape]; bad a bool
        [param_shape] tensor of non-finite channels when check_finite, else None.
    """
    _check_device(x)
    dev = x.device
    C, M = layout.channels, layout.count
    mean = torch.zeros(layout.param_shape, dtype=torch.float32, device=dev)
    invstd = torch.zeros(layout.param_shape, dtype=torch.float32, device=dev)
    res = _Output(x, layout, out)
    if x.numel() == 0:
        bad = torch.zeros(layout.param_shape, dtype=torch.bool, device=dev) if check_finite \
            else None
        return res.finish(), mean, invstd, bad

    x3 = _input3(x, layout)
    dims, ((sxa, sxc, sxb), (sya, syc, syb)) = _geometry([x3, res.v3], layout.dims3)
    g, b = _param(gamma, dev), _param(beta, dev)
    rm, rv = _running(running_mean, dev), _running(running_var, dev)
    has_running = rm is not None
    scale = torch.empty(C, dtype=torch.float32, device=dev)
    stat_flags = torch.zeros(C, dtype=torch.int8, device=dev)
    dummy = scale
    unbias = M / max(M - 1, 1)
    i64 = _needs_i64([x3, res.v3])
    A3, C3, B3 = dims

    pblocks = _persistent_blocks(dims)
    if pblocks is not None:
        ba, bc, bb = pblocks
        K.fwd_persistent_kernel[(triton.cdiv(C3, bc),)](
            x3, sxa, sxc, sxb, res.v3, sya, syc, syb, A3, C3, B3, M, unbias, eps, momentum,
            _or(g, dummy), _or(b, dummy), _or(rm, dummy), _or(rv, dummy), mean, invstd, scale,
            stat_flags, HAS_GAMMA=g is not None, HAS_BETA=b is not None,
            HAS_RUNNING=has_running, CHECK=bool(check_finite), BLOCK_A=ba, BLOCK_C=bc,
            BLOCK_B=bb, I64=i64, num_warps=_warps(pblocks),
        )
        bad = stat_flags.bool() if check_finite else None
    else:
        blocks = _blocks(dims)
        n_c, n_tb, T, tpp, S = _split(dims, blocks, dev)
        pn = torch.empty((S, C), dtype=torch.float32, device=dev)
        pmean, pm2 = torch.empty_like(pn), torch.empty_like(pn)
        tiles = dict(BLOCK_A=blocks[0], BLOCK_C=blocks[1], BLOCK_B=blocks[2], I64=i64,
                     num_warps=_warps(blocks))
        K.fwd_partial_kernel[(n_c, S)](x3, sxa, sxc, sxb, A3, C3, B3, n_tb, T, tpp,
                                       pn, pmean, pm2, **tiles)
        fb = min(triton.next_power_of_2(C), 128)
        K.fwd_finalize_kernel[(triton.cdiv(C, fb),)](
            pn, pmean, pm2, S, C, M, unbias, eps, momentum, _or(g, dummy), _or(rm, dummy),
            _or(rv, dummy), mean, invstd, scale, stat_flags, HAS_GAMMA=g is not None,
            HAS_RUNNING=has_running, CHECK=bool(check_finite),
            BLOCK_S=min(FINALIZE_BLOCK_S, triton.next_power_of_2(S)), BLOCK_C=fb,
        )
        flags = torch.zeros((S, C), dtype=torch.int8, device=dev) if check_finite else stat_flags
        K.fwd_apply_kernel[(n_c, S)](
            x3, sxa, sxc, sxb, res.v3, sya, syc, syb, A3, C3, B3, n_tb, T, tpp,
            mean, scale, dummy, dummy, _or(b, dummy), eps, flags, FROM_VAR=False,
            HAS_GAMMA=False, HAS_BETA=b is not None, CHECK=bool(check_finite), **tiles,
        )
        bad = (stat_flags.bool() | flags.bool().any(dim=0)).reshape(layout.param_shape) \
            if check_finite else None
    _copy_running(running_mean, rm)
    _copy_running(running_var, rv)
    if bad is not None:
        bad = bad.reshape(layout.param_shape)
    return res.finish(), mean, invstd, bad


def forward_inference(x, gamma, beta, mean, var, layout, *, eps, out=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics.

    Args:
        x: [layout.shape] CUDA tensor; gamma, beta: [param_shape] or None;
        mean, var: [param_shape]; out: optional tensor of x's shape and dtype.
    """
    _check_device(x)
    dev = x.device
    res = _Output(x, layout, out)
    if x.numel() == 0:
        return res.finish()
    x3 = _input3(x, layout)
    dims, ((sxa, sxc, sxb), (sya, syc, syb)) = _geometry([x3, res.v3], layout.dims3)
    g, b = _param(gamma, dev), _param(beta, dev)
    mu, var = _param(mean, dev), _param(var, dev)
    blocks = _blocks(dims)
    n_c, n_tb, T, tpp, S = _split(dims, blocks, dev)
    A3, C3, B3 = dims
    K.fwd_apply_kernel[(n_c, S)](
        x3, sxa, sxc, sxb, res.v3, sya, syc, syb, A3, C3, B3, n_tb, T, tpp,
        mu, mu, var, _or(g, mu), _or(b, mu), eps, mu, FROM_VAR=True, HAS_GAMMA=g is not None,
        HAS_BETA=b is not None, CHECK=False, BLOCK_A=blocks[0], BLOCK_C=blocks[1],
        BLOCK_B=blocks[2], I64=_needs_i64([x3, res.v3]), num_warps=_warps(blocks),
    )
    return res.finish()


def backward(dy, x, gamma, mean, invstd, layout, *, training=True, out=None):
    """dx, dgamma, dbeta from dy and the saved mean / invstd (contract §1).

    Training:  dx = gamma * invstd * (dy - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * dy

    Args:
        dy, x: [layout.shape] CUDA tensors of one dtype (strides may differ).
        gamma: [param_shape] or None; mean, invstd: [param_shape] saved statistics.
        out: optional tensor of x's shape and dtype that receives dx.

    Returns:
        (dx, dgamma, dbeta): dgamma / dbeta float32 [param_shape]; dgamma None without gamma.
    """
    _check_device(x)
    dev = x.device
    C, M = layout.channels, layout.count
    dgamma = torch.zeros(layout.param_shape, dtype=torch.float32, device=dev)
    dbeta = torch.zeros(layout.param_shape, dtype=torch.float32, device=dev)
    res = _Output(x, layout, out)
    if x.numel() == 0:
        return res.finish(), (None if gamma is None else dgamma), dbeta

    x3, dy3 = _input3(x, layout), _input3(dy, layout)
    dims, strides = _geometry([x3, dy3, res.v3], layout.dims3)
    (sxa, sxc, sxb), (sda, sdc, sdb), (sga, sgc, sgb) = strides
    g = _param(gamma, dev)
    mu, inv = _param(mean, dev), _param(invstd, dev)
    i64 = _needs_i64([x3, dy3, res.v3])
    A3, C3, B3 = dims
    ptrs = (x3, sxa, sxc, sxb, dy3, sda, sdc, sdb, res.v3, sga, sgc, sgb, A3, C3, B3)

    # two tensors stay in registers, so half the forward's budget
    pblocks = _persistent_blocks(dims, PERSISTENT_MAX_ELEMS // 2)
    if pblocks is not None:
        ba, bc, bb = pblocks
        K.bwd_persistent_kernel[(triton.cdiv(C3, bc),)](
            *ptrs, M, mu, inv, _or(g, inv), dgamma, dbeta, HAS_GAMMA=g is not None,
            TRAINING=bool(training), BLOCK_A=ba, BLOCK_C=bc, BLOCK_B=bb, I64=i64,
            num_warps=_warps(pblocks),
        )
    else:
        blocks = _blocks(dims)
        n_c, n_tb, T, tpp, S = _split(dims, blocks, dev)
        psum = torch.empty((S, C), dtype=torch.float32, device=dev)
        pdot = torch.empty_like(psum)
        tiles = dict(BLOCK_A=blocks[0], BLOCK_C=blocks[1], BLOCK_B=blocks[2], I64=i64,
                     num_warps=_warps(blocks))
        K.bwd_partial_kernel[(n_c, S)](
            *ptrs, n_tb, T, tpp, mu, inv, _or(g, inv), psum, pdot, HAS_GAMMA=g is not None,
            WRITE_DX=not training, **tiles,
        )
        fb = min(triton.next_power_of_2(C), 128)
        K.bwd_finalize_kernel[(triton.cdiv(C, fb),)](
            psum, pdot, S, C, inv, dgamma, dbeta,
            BLOCK_S=min(FINALIZE_BLOCK_S, triton.next_power_of_2(S)), BLOCK_C=fb,
        )
        if training:
            K.bwd_apply_kernel[(n_c, S)](
                *ptrs, n_tb, T, tpp, M, mu, inv, _or(g, inv), dgamma, dbeta,
                HAS_GAMMA=g is not None, **tiles,
            )
    return res.finish(), (None if gamma is None else dgamma), dbeta


def _or(t, default):
    return default if t is None else t


def _running(t, device) -> torch.Tensor | None:
    """The running statistic as a flat contiguous tensor the kernels can update in place."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError("running statistics for the gpu backend must be torch tensors")
    if t.device != device:
        raise ValueError(f"running statistics are on {t.device}, the input on {device}")
    return t.view(-1) if t.is_contiguous() else t.reshape(-1).contiguous()


def _copy_running(orig, flat) -> None:
    """Write back a running statistic that had to be copied to be contiguous."""
    if orig is not None and not orig.is_contiguous():
        orig.copy_(flat.view(orig.shape))
