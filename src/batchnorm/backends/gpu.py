"""The gpu backend: Triton kernels on CUDA ``torch.Tensor`` s (float16, bfloat16, float32).

Launchers with the signatures of :mod:`batchnorm.reference`; they take and return torch
tensors on x's device. Statistics, saved mean / invstd are float32; outputs have x's dtype.

Every call first builds a :class:`LaunchPlan` (:func:`launch_plan` builds the same plan
without running it): the ``(A, C, B)`` geometry, the algorithm, tiles, grid, splits, the
indexing width, and the list of launches with the bytes each one moves.

Algorithms (kernels in :mod:`batchnorm.backends._triton_kernels`), chosen by fit, for every
mode (``"spatial_persistent"`` is ``"spatial"`` here too, contract §2):

* persistent, when a block of channels' whole slice fits in one program's registers: one
  read of x, statistics two-pass in registers, then y;
* otherwise split: many programs each reduce a run of tiles to (count, mean, M2) partials,
  a small kernel merges them per channel in a fixed order (Chan's formula) and fuses the
  running-statistics update, then an apply kernel writes y, reading x a second time. No
  program waits on another.

Backward is the same shape: fused partial sums of (dy, dy * (x - mean)), merge, apply.
Inference is the apply kernel alone.

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

import functools
import os
from dataclasses import dataclass

import torch
import triton

from . import _triton_kernels as K

NAME = "gpu"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A persistent program keeps at most this many elements of one tensor in registers, with
# one warp per 1024 held (32 warps: 32 fp32 values a thread); backward holds two tensors,
# so half as many each. Tiles that cannot use vector loads (strides not multiples of 16
# elements) need a register per element for its address: half as many again. These keep
# every variant spill-free on sm_80 and sm_90, as the compile test checks.
PERSISTENT_MAX_ELEMS = 32768
# The same for channels-last tiles (wide in C, reduced across rows), which spill sooner.
PERSISTENT_MAX_ELEMS_CL = 8192
# A layer larger than this takes the persistent path only with at least
# PERSISTENT_MIN_WAVES programs per SM (one program per channel block can leave SMs idle);
# a smaller one is latency-bound, and one read in one launch wins.
PERSISTENT_SMALL_BYTES = 1 << 20
PERSISTENT_MIN_WAVES = 2.0
# Elements of one tile in the split kernels.
TILE_ELEMS = 2048
# Channel-block width for channels-last tiles: wide enough for coalesced loads.
CL_BLOCK_C = 64
# Split kernels aim for about this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 4
# Partials merged per step of the finalize kernels.
FINALIZE_BLOCK_S = 64
# Channels per program of the finalize kernels.
FINALIZE_BLOCK_C = 128
# Channel indices are 32-bit in every kernel (a per-activation layer could pass it).
MAX_CHANNELS = 2**30
# Streaming multiprocessors assumed off the device (interpreter, meta tensors): a few, so
# the split path still has several splits.
HOST_SMS = 2

# What a call computes: forward training, forward inference, backward after a training
# forward, backward of an inference forward (statistics are constants there).
PASSES = ("forward", "inference", "backward", "backward_inference")


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
    return HOST_SMS


# ----------------------------------------------------------------------------- views


def _view3(t: torch.Tensor, layout) -> torch.Tensor | None:
    """The (A, C, B) view of t without copying, or None when none exists."""
    try:
        return t.permute(layout.perm).view(layout.dims3)
    except RuntimeError:
        return None


def _input3(t: torch.Tensor, layout) -> tuple[torch.Tensor, bool]:
    """The (A, C, B) view of an input and whether it had to be copied to get one."""
    v = _view3(t, layout)
    if v is None:
        return t.permute(layout.perm).reshape(layout.dims3), True
    return v, False


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


# ----------------------------------------------------------------------------- the plan


def _merge(dims3, strides) -> tuple[tuple[int, int, int], tuple[tuple[int, int, int], ...]]:
    """(A, C, B) and each tensor's strides, with A and B merged into A when all allow it.

    Merging turns channels-last views (N, C, HW) with strides (HW*C, 1, C) into (N*HW, C, 1),
    so the kernels see one long reduced axis and tiles wide in C. A B of 1 gets stride 0.
    """
    A, C, B = dims3
    # (a size-1 axis's stride is arbitrary: a batch of one merges whatever torch put there)
    if B > 1 and all(A == 1 or s[0] == B * s[2] for s in strides):
        return (A * B, C, 1), tuple((s[2], s[1], 0) for s in strides)
    if B == 1:
        return (A, C, B), tuple((s[0], s[1], 0) for s in strides)
    return (A, C, B), tuple(tuple(s) for s in strides)


def _split_blocks(dims) -> tuple[int, int, int]:
    """Tile (BLOCK_A, BLOCK_C, BLOCK_B) of about TILE_ELEMS elements for the split kernels."""
    A, C, B = dims
    np2 = triton.next_power_of_2
    if B == 1:  # channels-last: wide in C, which is the contiguous axis
        bc = min(np2(C), CL_BLOCK_C)
        return max(1, min(np2(A), TILE_ELEMS // bc)), bc, 1
    bb = min(np2(B), TILE_ELEMS)
    bc = min(np2(C), max(1, 32 // bb))  # short spatial runs: take a few channels at once
    return max(1, min(np2(A), TILE_ELEMS // (bb * bc))), bc, bb


def _aligned(dims, strides, misaligned) -> bool:
    """True when Triton can vectorize the tiles: every tensor is unit-stride along the tile's
    contiguous axis (B, or C when B == 1), its other strides and that axis's length are
    multiples of 16 elements, and its address of 16 bytes (``misaligned`` is each tensor's
    address modulo 16)."""
    A, C, B = dims
    for (sa, sc, sb), off in zip(strides, misaligned, strict=True):
        run, unit, other = (B, sb, sc) if B > 1 else (C, sc, 0)
        if unit != 1 or run % 16 or sa % 16 or other % 16 or off:
            return False
    return True


def _persistent_blocks(dims, tensors: int, aligned: bool) -> tuple[int, int, int] | None:
    """Tile covering all of A and B for a block of channels, or None when it does not fit
    (``tensors`` kept in registers: 1 forward, 2 backward)."""
    A, C, B = dims
    np2 = triton.next_power_of_2
    limit = (PERSISTENT_MAX_ELEMS_CL if B == 1 else PERSISTENT_MAX_ELEMS) // tensors
    if not aligned:
        limit //= 2
    ba, bb = np2(A), np2(B)
    bc = min(np2(C), CL_BLOCK_C) if B == 1 else 1
    while bc > 16 and ba * bb * bc > limit:
        bc //= 2
    if ba * bb * bc > limit:
        return None
    return ba, bc, bb


def _index_width(dims3, strides3, strides, blocks) -> int:
    """The kernels' I64 level: 0 when every element offset fits in 32 bits; 1 when some
    offset reaches 2**31 but a tile's span from its origin does not (the origin is 64-bit);
    2 when a span can reach it too (everything 64-bit). ``strides3`` are the tensors'
    (A, C, B) strides before merging, ``strides`` after."""
    limit = 2**31 - 1
    if all(sum((n - 1) * abs(s) for n, s in zip(dims3, st, strict=True)) < limit
           for st in strides3):
        return 0
    span = max(sum((k - 1) * abs(s) for k, s in zip(blocks, st, strict=True)) for st in strides)
    return 2 if span >= limit else 1


def _warps(blocks, tensors: int = 1) -> int:
    """Warps per program for a tile of ``blocks`` over ``tensors`` tensors held at once."""
    n = blocks[0] * blocks[1] * blocks[2] * tensors
    if n >= 8192:  # persistent tiles: 32 elements a thread
        return min(32, n // 1024)
    return 8 if n >= 4096 else 4 if n >= 1024 else 2


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan and the bytes it asks of global memory.

    Attributes:
        kernel: the kernel's name (``"copy"`` for a layout copy made by torch).
        phase: what the launch computes: ``"moments"`` (statistics partials), ``"merge"``
            (partials to per-channel values), ``"apply"`` (y or dx from per-channel values),
            ``"fused"`` (all of a pass in one read), ``"copy"``.
        grid: the launch grid, in programs.
        bytes_read, bytes_written: the model's count (see :class:`LaunchPlan`).
    """

    kernel: str
    phase: str
    grid: tuple[int, ...]
    bytes_read: int
    bytes_written: int

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@dataclass(frozen=True)
class LaunchPlan:
    """How one call runs: built once per call, read by the launchers and by the reports.

    The geometry, tiling and split are shared by every launch of the call, so a phase can
    reuse them alone (a statistics phase, an apply phase).

    Attributes:
        pass_: one of :data:`PASSES`.
        dims: ``(A, C, B)`` the kernels see (channels-last merged to ``(A*B, C, 1)``).
        strides: per streamed tensor, its ``(A, C, B)`` strides in elements, in the order
            ``(x, y)`` forward and inference, ``(x, dy, dx)`` backward.
        itemsize: bytes per element of x.
        algorithm: ``"persistent"`` (one read) or ``"split"``.
        blocks: ``(BLOCK_A, BLOCK_C, BLOCK_B)`` of the streaming kernels' tiles.
        num_warps: warps per program of the streaming kernels.
        n_c, n_tb, tiles, tiles_per_split, splits: channel blocks, tiles along B, tiles of the
            (A, B) plane, tiles per program, programs per channel block (1, 1, 1, 1, 1 when
            persistent).
        i64: the indexing width: 0, 32-bit offsets; 1, 64-bit tile origins; 2, all 64-bit.
        aligned: whether the tiles can use 128-bit loads and stores (see :func:`_aligned`).
        num_sms: streaming multiprocessors the split was sized for.
        launches: every launch of the call, in order, with its traffic.

    The traffic account is a model of the plan, not a measurement: each launch counts the
    bytes its programs request from global memory, ``A*C*B*itemsize`` for each streamed
    tensor read or written, 4 bytes per channel for each per-channel vector each program
    reads or writes (as if gamma, beta and both running statistics were given), 4 bytes per
    partial and 1 per check flag. It does not know what the caches serve.
    """

    pass_: str
    dims: tuple[int, int, int]
    strides: tuple[tuple[int, int, int], ...]
    itemsize: int
    algorithm: str
    blocks: tuple[int, int, int]
    num_warps: int
    n_c: int
    n_tb: int
    tiles: int
    tiles_per_split: int
    splits: int
    i64: int
    aligned: bool
    num_sms: int
    launches: tuple[Launch, ...]

    @property
    def grid(self) -> tuple[int, ...]:
        """The grid of the streaming kernels."""
        return (self.n_c,) if self.algorithm == "persistent" else (self.n_c, self.splits)

    @property
    def tile_meta(self) -> dict:
        """The streaming kernels' tile constexprs and launch options."""
        ba, bc, bb = self.blocks
        return dict(BLOCK_A=ba, BLOCK_C=bc, BLOCK_B=bb, I64=self.i64, num_warps=self.num_warps)

    @property
    def finalize_grid(self) -> tuple[int]:
        return (triton.cdiv(self.dims[1], self.finalize_block_c),)

    @property
    def finalize_block_c(self) -> int:
        return min(triton.next_power_of_2(self.dims[1]), FINALIZE_BLOCK_C)

    @property
    def finalize_block_s(self) -> int:
        return min(FINALIZE_BLOCK_S, triton.next_power_of_2(self.splits))

    @property
    def bytes_read(self) -> int:
        return sum(x.bytes_read for x in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(x.bytes_written for x in self.launches)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def min_bytes(self) -> int:
        """Read x once and write y once (forward, inference); read x and dy once and write
        dx once (backward)."""
        A, C, B = self.dims
        return (2 if self.pass_ in ("forward", "inference") else 3) * A * C * B * self.itemsize

    @property
    def traffic_ratio(self) -> float:
        """Bytes moved over the minimum (1.0 is the floor; per-channel vectors add a little)."""
        return self.bytes_moved / self.min_bytes if self.min_bytes else 1.0

    @property
    def programs_per_sm(self) -> float:
        """Programs of the streaming kernels per streaming multiprocessor (waves)."""
        n = 1
        for g in self.grid:
            n *= g
        return n / self.num_sms


def _tuning() -> tuple:
    """The module's tuning constants (part of the plan cache's key: tests change them)."""
    return (PERSISTENT_MAX_ELEMS, PERSISTENT_MAX_ELEMS_CL, PERSISTENT_SMALL_BYTES,
            PERSISTENT_MIN_WAVES, TILE_ELEMS, CL_BLOCK_C, PROGRAMS_PER_SM, FINALIZE_BLOCK_S,
            FINALIZE_BLOCK_C)


def _plan(pass_: str, dims3, tensors, itemsize: int, num_sms: int, *,
          check_finite: bool = False, copies: int = 0) -> LaunchPlan:
    """The plan of one call from its (A, C, B) tensors (real or meta).

    Args:
        pass_: one of :data:`PASSES`.
        dims3: the layout's ``(A, C, B)``.
        tensors: the (A, C, B) views the kernels stream, ``(x, y)`` or ``(x, dy, dx)``.
        copies: layout copies torch makes around the kernels (inputs without an (A, C, B)
            view, outputs written through a buffer); each reads and writes the tensor once.

    Plans depend on geometry alone and a training loop repeats a few, so they are cached.
    """
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; valid choices are {PASSES}")
    strides3 = tuple(t.stride() for t in tensors)
    misaligned = tuple(t.storage_offset() * t.element_size() % 16 for t in tensors)
    return _plan_geometry(pass_, tuple(dims3), strides3, misaligned, itemsize, num_sms,
                          bool(check_finite), copies, _tuning())


@functools.lru_cache(maxsize=4096)
def _plan_geometry(pass_, dims3, strides3, misaligned, itemsize, num_sms, check_finite,
                   copies, tuning) -> LaunchPlan:
    dims, strides = _merge(dims3, strides3)
    A, C, B = dims
    if C > MAX_CHANNELS:  # channel indices and per-channel offsets stay 32-bit
        raise ValueError(f"the gpu backend handles at most {MAX_CHANNELS} channels, got {C}")
    X = A * C * B * itemsize  # one streamed tensor
    vec = 4 * C  # one per-channel float32 vector
    backward = pass_.startswith("backward")
    aligned = _aligned(dims, strides, misaligned)
    launches = [Launch("copy", "copy", (), X, X)] * copies

    pblocks = None
    if pass_ != "inference":  # inference has no statistics: the apply kernel alone
        pblocks = _persistent_blocks(dims, 2 if backward else 1, aligned)
        if pblocks is not None and X > PERSISTENT_SMALL_BYTES and \
                triton.cdiv(C, pblocks[1]) < PERSISTENT_MIN_WAVES * num_sms:
            pblocks = None

    if pblocks is not None:
        blocks, n_c = pblocks, triton.cdiv(C, pblocks[1])
        n_tb = tiles = tpp = splits = 1
        flags = C if check_finite else 0
        if backward:
            # x, dy, mean, invstd, gamma -> dx, dgamma, dbeta
            launches.append(Launch("bwd_persistent_kernel", "fused", (n_c,),
                                   2 * X + 3 * vec, X + 2 * vec))
        else:
            # x, gamma, beta, running x2 -> y, mean, invstd, scale, running x2, flags
            launches.append(Launch("fwd_persistent_kernel", "fused", (n_c,),
                                   X + 4 * vec, X + 5 * vec + flags))
        algorithm = "persistent"
    else:
        blocks = _split_blocks(dims)
        ba, bc, bb = blocks
        n_c, n_tb = triton.cdiv(C, bc), triton.cdiv(B, bb)
        tiles = triton.cdiv(A, ba) * n_tb
        want = max(1, PROGRAMS_PER_SM * num_sms)
        splits = min(tiles, max(1, triton.cdiv(want, n_c)))
        tpp = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, tpp)
        grid, S = (n_c, splits), splits
        fgrid = (triton.cdiv(C, min(triton.next_power_of_2(C), FINALIZE_BLOCK_C)),)
        if pass_ == "inference":
            # x, mean, var, gamma, beta (every program) -> y
            launches.append(Launch("fwd_apply_kernel", "apply", grid, X + 4 * S * vec, X))
        elif pass_ == "forward":
            flags = C if check_finite else 0
            launches += [
                # x -> (count, mean, M2) partials
                Launch("fwd_partial_kernel", "moments", grid, X, 3 * S * vec),
                # partials, gamma, running x2 -> mean, invstd, scale, running x2, flags
                Launch("fwd_finalize_kernel", "merge", fgrid, 3 * S * vec + 3 * vec,
                       5 * vec + flags),
                # x, mean, scale, beta (every program) -> y, flags per program
                Launch("fwd_apply_kernel", "apply", grid, X + 3 * S * vec,
                       X + (S * C if check_finite else 0)),
            ]
        else:
            training = pass_ == "backward"
            launches += [
                # x, dy, mean, invstd, gamma (every program) -> sum partials (+ dx inference)
                Launch("bwd_partial_kernel", "moments", grid, 2 * X + 3 * S * vec,
                       2 * S * vec + (0 if training else X)),
                # partials, invstd -> dgamma, dbeta
                Launch("bwd_finalize_kernel", "merge", fgrid, 2 * S * vec + vec, 2 * vec),
            ]
            if training:
                # x, dy, mean, invstd, gamma, dgamma, dbeta (every program) -> dx
                launches.append(Launch("bwd_apply_kernel", "apply", grid,
                                       2 * X + 5 * S * vec, X))
        algorithm = "split"
    blocks = tuple(blocks)
    i64 = _index_width(dims3, strides3, strides, blocks)
    held = 2 if backward and algorithm == "persistent" else 1
    return LaunchPlan(pass_=pass_, dims=dims, strides=strides, itemsize=itemsize,
                      algorithm=algorithm, blocks=blocks, num_warps=_warps(blocks, held), n_c=n_c,
                      n_tb=n_tb, tiles=tiles, tiles_per_split=tpp, splits=splits, i64=i64,
                      aligned=aligned, num_sms=num_sms, launches=tuple(launches))


def _prepare(pass_, x, layout, dy, out, check_finite, num_sms):
    """Views, output and plan of one call: ``(plan, views, output)``."""
    x3, copied = _input3(x, layout)
    copies = int(copied)
    views = [x3]
    if pass_.startswith("backward"):
        dy3, copied = _input3(dy, layout)
        copies += int(copied)
        views.append(dy3)
    res = _Output(x, layout, out)
    copies += int(res.copy_back)
    views.append(res.v3)
    num_sms = _num_sms(x.device) if num_sms is None else num_sms
    plan = _plan(pass_, layout.dims3, views, x.element_size(), num_sms,
                 check_finite=check_finite, copies=copies)
    return plan, views, res


def launch_plan(pass_: str, x: torch.Tensor, layout, *, dy=None, out=None,
                check_finite: bool = False, num_sms: int | None = None) -> LaunchPlan:
    """The plan a call would run, without running it.

    Args:
        pass_: one of :data:`PASSES`.
        x: [layout.shape] tensor; a ``device="meta"`` tensor with the right strides (for
            example ``torch.empty(shape, device="meta", memory_format=torch.channels_last)``)
            plans a call without allocating anything.
        dy, out: as the launchers take them (dy defaults to a tensor like x in backward).
        num_sms: streaming multiprocessors to size the split for (default: x's device, or
            :data:`HOST_SMS` off a CUDA device).
    """
    if pass_.startswith("backward") and dy is None:
        dy = torch.empty_like(x)
    return _prepare(pass_, x, layout, dy, out, check_finite, num_sms)[0]


# ----------------------------------------------------------------------------- forward


def _param(p, device) -> torch.Tensor | None:
    """A per-channel parameter as a flat contiguous tensor on the device (dtype kept)."""
    if p is None:
        return None
    return torch.as_tensor(p, device=device).reshape(-1).contiguous()


def _or(t, default):
    return default if t is None else t


class _Running:
    """A running statistic as the flat contiguous tensor the kernels update in place.

    With ``staged`` (check_finite) the kernels update a copy, and :meth:`commit` writes it
    back only when no channel was flagged: a call that will be refused leaves the caller's
    statistics as they were (contract §3). Without it, a statistic that is not contiguous is
    updated through a copy that :meth:`commit` writes back.
    """

    def __init__(self, t, device, staged: bool):
        self.orig = t
        self.work = None
        if t is None:
            return
        if not isinstance(t, torch.Tensor):
            raise TypeError("running statistics for the gpu backend must be torch tensors")
        if t.device != device:
            raise ValueError(f"running statistics are on {t.device}, the input on {device}")
        if staged:
            self.work = t.reshape(-1).clone()
        else:
            self.work = t.view(-1) if t.is_contiguous() else t.reshape(-1).contiguous()

    def commit(self, bad: torch.Tensor | None) -> None:
        t, w = self.orig, self.work
        if t is None:
            return
        if bad is not None:  # keep the old values if any channel is flagged (no host sync)
            t.copy_(torch.where(bad.any(), t, w.view(t.shape)))
        elif not t.is_contiguous():
            t.copy_(w.view(t.shape))


def forward_training(x, gamma, beta, layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False):
    """y = gamma * (x - mu) / sqrt(var + eps) + beta with the batch's mu and biased var.

    Args:
        x: [layout.shape] CUDA tensor (float16 / bfloat16 / float32).
        gamma, beta: [layout.param_shape] or None.
        running_mean, running_var: [layout.param_shape] tensors on x's device, updated in
            place, each when given. With ``check_finite``, left as they were when a channel
            is flagged.
        out: optional tensor of x's shape and dtype that receives y.

    Returns:
        (y, mean, invstd, bad): mean / invstd float32 [param_shape]; bad a bool
        [param_shape] tensor of non-finite channels when check_finite, else None.
    """
    _check_device(x)
    dev = x.device
    C, M = layout.channels, layout.count
    check = bool(check_finite)
    if x.numel() == 0:
        zeros = torch.zeros(layout.param_shape, dtype=torch.float32, device=dev)
        bad = torch.zeros(layout.param_shape, dtype=torch.bool, device=dev) if check else None
        return _Output(x, layout, out).finish(), zeros, zeros.clone(), bad

    p, (x3, y3), res = _prepare("forward", x, layout, None, out, check, None)
    (sxa, sxc, sxb), (sya, syc, syb) = p.strides
    A3, C3, B3 = p.dims
    # every channel of these is written by the kernels: no memset launches
    mean = torch.empty(C, dtype=torch.float32, device=dev)
    invstd = torch.empty_like(mean)
    scale = torch.empty_like(mean)
    stat_flags = torch.empty(C, dtype=torch.int8, device=dev)
    g, b = _param(gamma, dev), _param(beta, dev)
    rm, rv = _Running(running_mean, dev, check), _Running(running_var, dev, check)
    dummy = scale
    unbias = M / max(M - 1, 1)
    stats = dict(HAS_GAMMA=g is not None, HAS_RMEAN=rm.work is not None,
                 HAS_RVAR=rv.work is not None, CHECK=check)

    if p.algorithm == "persistent":
        K.fwd_persistent_kernel[p.grid](
            x3, sxa, sxc, sxb, y3, sya, syc, syb, A3, C3, B3, M, unbias, eps, momentum,
            _or(g, dummy), _or(b, dummy), _or(rm.work, dummy), _or(rv.work, dummy), mean,
            invstd, scale, stat_flags, HAS_BETA=b is not None, **stats, **p.tile_meta,
        )
        bad = stat_flags.bool() if check else None
    else:
        S = p.splits
        pn = torch.empty((S, C), dtype=torch.float32, device=dev)
        pmean, pm2 = torch.empty_like(pn), torch.empty_like(pn)
        K.fwd_partial_kernel[p.grid](x3, sxa, sxc, sxb, A3, C3, B3, p.n_tb, p.tiles,
                                     p.tiles_per_split, pn, pmean, pm2, **p.tile_meta)
        K.fwd_finalize_kernel[p.finalize_grid](
            pn, pmean, pm2, S, C, M, unbias, eps, momentum, _or(g, dummy), _or(rm.work, dummy),
            _or(rv.work, dummy), mean, invstd, scale, stat_flags, **stats,
            BLOCK_S=p.finalize_block_s, BLOCK_C=p.finalize_block_c,
        )
        flags = torch.empty((S, C), dtype=torch.int8, device=dev) if check else stat_flags
        K.fwd_apply_kernel[p.grid](
            x3, sxa, sxc, sxb, y3, sya, syc, syb, A3, C3, B3, p.n_tb, p.tiles,
            p.tiles_per_split, mean, scale, dummy, dummy, _or(b, dummy), eps, flags,
            FROM_VAR=False, HAS_GAMMA=False, HAS_BETA=b is not None, CHECK=check,
            **p.tile_meta,
        )
        bad = (stat_flags.bool() | flags.bool().any(dim=0)) if check else None
    rm.commit(bad)
    rv.commit(bad)
    shape = layout.param_shape
    return (res.finish(), mean.view(shape), invstd.view(shape),
            None if bad is None else bad.view(shape))


def forward_inference(x, gamma, beta, mean, var, layout, *, eps, out=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the given statistics.

    Args:
        x: [layout.shape] CUDA tensor; gamma, beta: [param_shape] or None;
        mean, var: [param_shape]; out: optional tensor of x's shape and dtype.
    """
    _check_device(x)
    dev = x.device
    if x.numel() == 0:
        return _Output(x, layout, out).finish()
    p, (x3, y3), res = _prepare("inference", x, layout, None, out, False, None)
    (sxa, sxc, sxb), (sya, syc, syb) = p.strides
    A3, C3, B3 = p.dims
    g, b = _param(gamma, dev), _param(beta, dev)
    mu, var = _param(mean, dev), _param(var, dev)
    K.fwd_apply_kernel[p.grid](
        x3, sxa, sxc, sxb, y3, sya, syc, syb, A3, C3, B3, p.n_tb, p.tiles, p.tiles_per_split,
        mu, mu, var, _or(g, mu), _or(b, mu), eps, mu, FROM_VAR=True, HAS_GAMMA=g is not None,
        HAS_BETA=b is not None, CHECK=False, **p.tile_meta,
    )
    return res.finish()


# ----------------------------------------------------------------------------- backward


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
    shape = layout.param_shape
    if x.numel() == 0:
        zeros = torch.zeros(shape, dtype=torch.float32, device=dev)
        return (_Output(x, layout, out).finish(), None if gamma is None else zeros,
                zeros.clone())

    pass_ = "backward" if training else "backward_inference"
    p, (x3, dy3, dx3), res = _prepare(pass_, x, layout, dy, out, False, None)
    (sxa, sxc, sxb), (sda, sdc, sdb), (sga, sgc, sgb) = p.strides
    A3, C3, B3 = p.dims
    dgamma = torch.empty(C, dtype=torch.float32, device=dev)  # written for every channel
    dbeta = torch.empty_like(dgamma)
    g = _param(gamma, dev)
    mu, inv = _param(mean, dev), _param(invstd, dev)
    ptrs = (x3, sxa, sxc, sxb, dy3, sda, sdc, sdb, dx3, sga, sgc, sgb, A3, C3, B3)

    if p.algorithm == "persistent":
        K.bwd_persistent_kernel[p.grid](
            *ptrs, M, mu, inv, _or(g, inv), dgamma, dbeta, HAS_GAMMA=g is not None,
            TRAINING=bool(training), **p.tile_meta,
        )
    else:
        S = p.splits
        psum = torch.empty((S, C), dtype=torch.float32, device=dev)
        pdot = torch.empty_like(psum)
        split = (p.n_tb, p.tiles, p.tiles_per_split)
        K.bwd_partial_kernel[p.grid](
            *ptrs, *split, mu, inv, _or(g, inv), psum, pdot, HAS_GAMMA=g is not None,
            WRITE_DX=not training, **p.tile_meta,
        )
        K.bwd_finalize_kernel[p.finalize_grid](
            psum, pdot, S, C, inv, dgamma, dbeta, BLOCK_S=p.finalize_block_s,
            BLOCK_C=p.finalize_block_c,
        )
        if training:
            K.bwd_apply_kernel[p.grid](
                *ptrs, *split, M, mu, inv, _or(g, inv), dgamma, dbeta,
                HAS_GAMMA=g is not None, **p.tile_meta,
            )
    return res.finish(), (None if gamma is None else dgamma.view(shape)), dbeta.view(shape)
