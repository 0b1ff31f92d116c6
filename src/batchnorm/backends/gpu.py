"""The gpu backend: Triton kernels on CUDA ``torch.Tensor`` s (float16, bfloat16, float32).

It implements :class:`batchnorm.backends.protocol.Backend`: the phases :func:`moments`,
:func:`apply`, :func:`grad_sums` and :func:`grad_apply`, and the whole calls
:func:`forward_training`, :func:`forward_inference` and :func:`backward`, each with the
epilogue of contract §8 (residual add, relu / leaky_relu, the memory-saving mode). They take
and return torch tensors on x's device. Statistics, saved mean / invstd and the gradient sums
are float32 (``moments`` returns float64: M2 may pass float32's range); outputs have x's
dtype.

Every call first builds a :class:`LaunchPlan` (:func:`launch_plan` builds the same plan
without running it): the ``(A, C, B)`` geometry, the tensors it streams, the algorithm,
tiles, grid, splits, the indexing width, and the list of launches with the bytes each one
moves.

Algorithms (kernels in :mod:`batchnorm.backends._triton_kernels`), chosen by fit, for every
mode (``"spatial_persistent"`` is ``"spatial"`` here too, contract §2):

* persistent, when a block of channels' whole slice fits in one program's registers: one
  read of x, statistics two-pass in registers, then y;
* otherwise split: many programs each reduce a run of tiles to (count, mean, M2) partials,
  a small kernel merges them per channel in a fixed order (Chan's formula) and fuses the
  running-statistics update, then an apply kernel writes y, reading x a second time. No
  program waits on another.

Backward is the same shape: fused partial sums of (g, g * xhat), merge, apply. Inference is
the apply kernel alone. The phases are the split kernels one by one (a distributed layer
puts a collective between them); the whole calls are their single-read composites where
the persistent kernels fit.

The epilogue is a pair of constexpr flags of the same kernels (HAS_RES, HAS_ACT; relu is
leaky_relu with slope 0), so one kernel serves every activation. Backward reads y for the
activation's derivative, and with ``x=None`` (the memory-saving mode: forward wrote y over x
with ``out=x``) recovers xhat from y. Writing y over x is safe on every path: each program
reads its elements before it writes them, and no later program reads x again.

Layouts: the kernels read strides, so NCHW, channels_last NCHW and NHWC tensors are used in
place. An input is copied only when it cannot be viewed as ``(A, C, B)``: when the kept
axes are not adjacent (an ``axis`` tuple such as ``(0, 2)`` on a rank-4 input) or when
reshaping a non-dense tensor needs it; outputs are then written to a buffer and copied back.

Interpreter: with ``TRITON_INTERPRET=1`` in the environment the launchers also accept CPU
tensors (the kernels then run in Triton's interpreter; used by the test suite). Even then
:func:`unavailable_reason` refuses CPU tensors, so ``backend="auto"`` never picks this
backend for CPU data.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from . import _triton_kernels as K

NAME = "gpu"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A persistent program keeps at most this many elements of the tensors it reads in
# registers, with one warp per 1024 held (32 warps: 32 fp32 values a thread); a kernel that
# reads two tensors (backward; forward with a residual) holds half as many of each, three
# (backward with an activation) a third. Tiles that cannot use vector loads (strides not
# multiples of 16 elements) need a register per element for its address: half as many
# again. These keep every variant spill-free on sm_80 and sm_90, as the compile test checks.
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

# What a whole call computes: forward training, forward inference, backward after a
# training forward, backward of an inference forward (statistics are constants there).
PASSES = ("forward", "inference", "backward", "backward_inference")
# What a phase computes: moments, apply, the gradient sums, dx (and dz) from them after a
# training forward, dx (and dz) after an inference forward (no sums needed).
PHASES = ("moments", "apply", "grad_sums", "grad_apply", "grad_apply_inference")
# The tensors a call may stream, in the plan's order: the input x, the residual z, the
# upstream gradient dy, the output y (written forward; read backward, with an activation or
# instead of x), and the gradients dx and dz.
STREAMS = ("x", "z", "dy", "y", "dx", "dz")
_FORWARD = ("forward", "inference", "moments", "apply")
_READS = {True: ("x", "z"), False: ("x", "dy", "y")}  # by "is a forward pass"
_NO_OUTPUT = ("moments", "grad_sums")


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
    (``tensors``: the streamed tensors the kernel reads, all held in registers at once)."""
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
    """Warps per program for a tile of ``blocks`` over ``tensors`` tensors held at once (a
    power of two)."""
    n = blocks[0] * blocks[1] * blocks[2] * tensors
    if n >= 8192:  # persistent tiles: about 32 elements a thread
        return min(32, triton.next_power_of_2(n // 1024))
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


@dataclass(frozen=True)
class LaunchPlan:
    """How one call runs: built once per call, read by the launchers and by the reports.

    The geometry, tiling and split are shared by every launch of the call, so a phase can
    reuse them alone (a statistics phase, an apply phase).

    Attributes:
        pass_: one of :data:`PASSES` or :data:`PHASES`.
        streams: the names (:data:`STREAMS`) of the tensors the call reads or writes whole,
            e.g. ``("x", "z", "y")`` for a forward with a residual, ``("dy", "y", "dx")``
            for a backward that recovers xhat from y.
        dims: ``(A, C, B)`` the kernels see (channels-last merged to ``(A*B, C, 1)``).
        strides: per streamed tensor, its ``(A, C, B)`` strides in elements, in the order of
            ``streams``.
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
    tensor read or written, 4 bytes per channel for each per-channel float32 vector each
    program reads or writes (as if gamma, beta and both running statistics were given; 8 for
    a float64 one), 4 bytes per partial and 1 per check flag. It does not know what the
    caches serve.
    """

    pass_: str
    streams: tuple[str, ...]
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
        return _finalize_grid(self.dims[1])

    @property
    def finalize_block_c(self) -> int:
        return _finalize_block_c(self.dims[1])

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
        """Each streamed tensor read or written once: 2 tensors for plain forward and
        inference (x, y), 3 with a residual (x, z, y); 3 for plain backward (x, dy, dx), 4
        with an activation (x, y, dy, dx), 5 with a residual too (dz), 3 again in the
        memory-saving mode (y, dy, dx); 1 for ``moments``."""
        A, C, B = self.dims
        return len(self.streams) * A * C * B * self.itemsize

    @property
    def traffic_ratio(self) -> float:
        """Bytes moved over the minimum (1.0 is the floor; per-channel vectors add a little)."""
        return self.bytes_moved / self.min_bytes if self.min_bytes else 1.0

    @property
    def programs_per_sm(self) -> float:
        """Programs of the streaming kernels per streaming multiprocessor (waves)."""
        return math.prod(self.grid) / self.num_sms


def _tuning() -> tuple:
    """The module's tuning constants (part of the plan cache's key: tests change them)."""
    return (PERSISTENT_MAX_ELEMS, PERSISTENT_MAX_ELEMS_CL, PERSISTENT_SMALL_BYTES,
            PERSISTENT_MIN_WAVES, TILE_ELEMS, CL_BLOCK_C, PROGRAMS_PER_SM, FINALIZE_BLOCK_S,
            FINALIZE_BLOCK_C)


def _plan(pass_: str, streams: tuple[str, ...], dims3, tensors, itemsize: int, num_sms: int,
          *, check_finite: bool = False, copies: int = 0) -> LaunchPlan:
    """The plan of one call from its (A, C, B) tensors (real or meta).

    Args:
        pass_: one of :data:`PASSES` or :data:`PHASES`.
        streams: the names of ``tensors``, in :data:`STREAMS` order.
        dims3: the layout's ``(A, C, B)``.
        tensors: the (A, C, B) views the kernels stream.
        copies: layout copies torch makes around the kernels (inputs without an (A, C, B)
            view, outputs written through a buffer); each reads and writes the tensor once.

    Plans depend on geometry alone and a training loop repeats a few, so they are cached.
    """
    if pass_ not in PASSES + PHASES:
        raise ValueError(f"unknown pass {pass_!r}; valid choices are {PASSES + PHASES}")
    strides3 = tuple(t.stride() for t in tensors)
    misaligned = tuple(t.storage_offset() * t.element_size() % 16 for t in tensors)
    return _plan_geometry(pass_, tuple(streams), tuple(dims3), strides3, misaligned, itemsize,
                          num_sms, bool(check_finite), copies, _tuning())


@functools.lru_cache(maxsize=4096)
def _plan_geometry(pass_, streams, dims3, strides3, misaligned, itemsize, num_sms,
                   check_finite, copies, tuning) -> LaunchPlan:
    dims, strides = _merge(dims3, strides3)
    A, C, B = dims
    if C > MAX_CHANNELS:  # channel indices and per-channel offsets stay 32-bit
        raise ValueError(f"the gpu backend handles at most {MAX_CHANNELS} channels, got {C}")
    X = A * C * B * itemsize  # one streamed tensor
    vec = 4 * C  # one per-channel float32 vector
    forward = pass_ in _FORWARD
    nr = sum(s in _READS[forward] for s in streams)  # streamed tensors read
    nw = len(streams) - nr                            # and written
    aligned = _aligned(dims, strides, misaligned)
    flags = C if check_finite and pass_ == "forward" else 0
    launches = [Launch("copy", "copy", (), X, X)] * copies

    pblocks = None
    if pass_ in ("forward", "backward", "backward_inference"):  # the single-read composites
        pblocks = _persistent_blocks(dims, nr, aligned)
        if pblocks is not None and X > PERSISTENT_SMALL_BYTES and \
                triton.cdiv(C, pblocks[1]) < PERSISTENT_MIN_WAVES * num_sms:
            pblocks = None

    if pblocks is not None:
        blocks, n_c = pblocks, triton.cdiv(C, pblocks[1])
        n_tb = tiles = tpp = splits = 1
        if forward:
            # x (z), gamma, beta, running x2 -> y, mean, invstd, running x2, flags
            launches.append(Launch("fwd_persistent_kernel", "fused", (n_c,),
                                   nr * X + 4 * vec, X + 4 * vec + flags))
        else:
            # x or y (y), dy, mean or beta, invstd, gamma -> dx (dz), dgamma, dbeta
            launches.append(Launch("bwd_persistent_kernel", "fused", (n_c,),
                                   nr * X + 3 * vec, nw * X + 2 * vec))
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
        fgrid = _finalize_grid(C)
        if pass_ in ("forward", "moments"):
            # x -> (count, mean, sqrt(M2)) partials
            launches.append(Launch("fwd_partial_kernel", "moments", grid, X, 3 * S * vec))
        if pass_ == "moments":
            # partials -> mean, M2 (float64)
            launches.append(Launch("fwd_finalize_kernel", "merge", fgrid, 3 * S * vec,
                                   4 * vec))
        elif pass_ == "forward":
            # partials, running x2 -> mean, invstd, running x2, flags
            launches.append(Launch("fwd_finalize_kernel", "merge", fgrid,
                                   3 * S * vec + 2 * vec, 4 * vec + flags))
        if forward and pass_ != "moments":
            # x (z), mean, invstd or var, gamma, beta (every program) -> y, flags per program
            launches.append(Launch("fwd_apply_kernel", "apply", grid, nr * X + 4 * S * vec,
                                   X + (S * C if flags else 0)))
        if pass_ in ("backward", "backward_inference", "grad_sums"):
            # x or y (y), dy, mean or beta, invstd, gamma (every program) -> sum partials
            # (and dx, dz in inference, which needs no sums)
            launches += [
                Launch("bwd_partial_kernel", "moments", grid, nr * X + 3 * S * vec,
                       2 * S * vec + (nw * X if pass_ == "backward_inference" else 0)),
                # partials -> dgamma, dbeta
                Launch("bwd_finalize_kernel", "merge", fgrid, 2 * S * vec, 2 * vec),
            ]
        if pass_ in ("backward", "grad_apply"):
            # x or y (y), dy, mean or beta, invstd, gamma, both sums (every program) -> dx (dz)
            launches.append(Launch("bwd_apply_kernel", "apply", grid, nr * X + 5 * S * vec,
                                   nw * X))
        elif pass_ == "grad_apply_inference":
            # dy (y), mean or beta, invstd, gamma (every program) -> dx (dz)
            launches.append(Launch("bwd_apply_kernel", "apply", grid, nr * X + 3 * S * vec,
                                   nw * X))
        algorithm = "split"
    blocks = tuple(blocks)
    i64 = _index_width(dims3, strides3, strides, blocks)
    held = nr if algorithm == "persistent" else 1
    return LaunchPlan(pass_=pass_, streams=streams, dims=dims, strides=strides,
                      itemsize=itemsize, algorithm=algorithm, blocks=blocks,
                      num_warps=_warps(blocks, held), n_c=n_c, n_tb=n_tb, tiles=tiles,
                      tiles_per_split=tpp, splits=splits, i64=i64, aligned=aligned,
                      num_sms=num_sms, launches=tuple(launches))


def _finalize_block_c(C: int) -> int:
    """Channels per program of the finalize kernels."""
    return min(triton.next_power_of_2(C), FINALIZE_BLOCK_C)


def _finalize_grid(C: int) -> tuple[int]:
    """The finalize kernels' grid: one program per block of channels."""
    return (triton.cdiv(C, _finalize_block_c(C)),)


def _activation(epilogue) -> tuple[bool, float]:
    """``(HAS_ACT, slope)`` of an epilogue (contract §8): relu is leaky_relu with slope 0."""
    if epilogue is None:
        return False, 0.0
    return True, float(epilogue.slope)


def _prepare(pass_, layout, *, x=None, z=None, dy=None, y=None, act=False, out=None,
             out_dz=None, want_dz=False, check_finite=False, num_sms=None):
    """Views, outputs and plan of one call: ``(plan, views, outputs)``.

    Decides which tensors the call streams: forward x (and the residual z) in, y out
    (``moments``: x alone); backward dy in, x when xhat is needed and x was kept, y with an
    activation or in place of x, dx out (not ``grad_sums``) and dz when asked for.
    ``views`` maps each streamed tensor's name to its (A, C, B) view, ``outputs`` each
    written one's to its :class:`_Output`.
    """
    if pass_ in _FORWARD:
        like = x
        inputs = {"x": x, "z": z}
        wanted = {} if pass_ in _NO_OUTPUT else {"y": out}
    else:
        like = dy
        xhat = pass_ != "grad_apply_inference"  # dx = gamma * invstd * g needs no xhat
        if xhat and x is None and y is None:
            raise ValueError("backward without x needs the forward's output y to recover "
                             "xhat from")
        if act and y is None:
            raise ValueError("backward through an activation needs the forward's output y")
        inputs = {"x": x if xhat else None, "dy": dy,
                  "y": y if act or (xhat and x is None) else None}
        wanted = {} if pass_ in _NO_OUTPUT else {"dx": out}
        if want_dz and pass_ not in _NO_OUTPUT:
            wanted["dz"] = out_dz
    views, outputs, copies = {}, {}, 0
    for name, t in inputs.items():
        if t is not None:
            views[name], copied = _input3(t, layout)
            copies += int(copied)
    for name, o in wanted.items():
        outputs[name] = _Output(like, layout, o)
        views[name] = outputs[name].v3
        copies += int(outputs[name].copy_back)
    streams = tuple(s for s in STREAMS if s in views)
    num_sms = _num_sms(like.device) if num_sms is None else num_sms
    plan = _plan(pass_, streams, layout.dims3, [views[s] for s in streams],
                 like.element_size(), num_sms, check_finite=check_finite, copies=copies)
    return plan, views, outputs


def _streamed(plan: LaunchPlan, views: dict, *names: str) -> list:
    """Each named stream's kernel arguments ``(tensor, sa, sc, sb)`` in the plan's merged
    strides; a stream the call does not have gets a stand-in pointer and zero strides
    (its kernel code is compiled out by the constexprs)."""
    stride = dict(zip(plan.streams, plan.strides, strict=True))
    stand_in = views[plan.streams[0]]
    args = []
    for name in names:
        args += [views.get(name, stand_in), *stride.get(name, (0, 0, 0))]
    return args


def launch_plan(pass_: str, x: torch.Tensor | None, layout, *, dy=None, y=None,
                residual=None, epilogue=None, out=None, out_dz=None, want_dz: bool = False,
                check_finite: bool = False, num_sms: int | None = None) -> LaunchPlan:
    """The plan a call would run, without running it.

    Args:
        pass_: one of :data:`PASSES` or :data:`PHASES`.
        x: [layout.shape] tensor; a ``device="meta"`` tensor with the right strides (for
            example ``torch.empty(shape, device="meta", memory_format=torch.channels_last)``)
            plans a call without allocating anything. None in a backward pass or phase for
            the memory-saving mode (xhat recovered from y).
        dy: backward: as the launchers take it (default: a tensor like x, or like y).
        y: backward: the forward's output, read with an activation and when x is None
            (default: a tensor like dy, when it is read).
        residual: forward, inference and ``apply``: the residual z, or None.
        epilogue: the activation (:class:`batchnorm._shapes.Epilogue`) or None.
        out, out_dz, want_dz: as the launchers take them (``out=x`` plans the forward of the
            memory-saving mode).
        num_sms: streaming multiprocessors to size the split for (default: x's device, or
            :data:`HOST_SMS` off a CUDA device).
    """
    if pass_ not in PASSES + PHASES:
        raise ValueError(f"unknown pass {pass_!r}; valid choices are {PASSES + PHASES}")
    act = _activation(epilogue)[0]
    if pass_ not in _FORWARD:
        if dy is None:
            dy = torch.empty_like(x if x is not None else y)
        if y is None and (act or x is None):
            y = torch.empty_like(dy)
    return _prepare(pass_, layout, x=x, z=residual, dy=dy, y=y, act=act, out=out,
                    out_dz=out_dz, want_dz=want_dz, check_finite=check_finite,
                    num_sms=num_sms)[0]


# ----------------------------------------------------------------------------- arguments


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


# ----------------------------------------------------------------------------- forward


def _stats(C: int, device, dtype=torch.float32) -> torch.Tensor:
    """Per-channel results, [C] each; every channel of them is written by the kernels, so no
    memset launch."""
    return torch.empty(C, dtype=dtype, device=device)


def _partials(p: LaunchPlan, views: dict, C: int, device):
    """Run the split statistics kernel: the (count, mean, sqrt(M2)) partials, [S, C] each."""
    part = torch.empty((3, p.splits, C), dtype=torch.float32, device=device)
    K.fwd_partial_kernel[p.grid](*_streamed(p, views, "x"), *p.dims, p.n_tb, p.tiles,
                                 p.tiles_per_split, part[0], part[1], part[2], **p.tile_meta)
    return part


def moments(x, layout):
    """Per-channel ``(count, mean, m2)`` of x, m2 = sum((x - mean)^2), for merging by Chan's
    formula (:func:`batchnorm.backends.protocol.merge_moments`).

    Args:
        x: [layout.shape] CUDA tensor (float16 / bfloat16 / float32).

    Returns:
        ``(count, mean, m2)``: count the int M; mean and m2 float64 [param_shape] tensors
        (computed in float32, m2 from its float32 square root, which cannot overflow where
        m2 itself would); ``(0, 0, 0)`` for zero-size x.
    """
    _check_device(x)
    dev, C, shape = x.device, layout.channels, layout.param_shape
    if x.numel() == 0:
        zeros = torch.zeros(shape, dtype=torch.float64, device=dev)
        return 0, zeros, zeros.clone()
    p, v, _ = _prepare("moments", layout, x=x)
    part = _partials(p, v, C, dev)
    mean, m2 = _stats(C, dev, torch.float64), _stats(C, dev, torch.float64)
    dummy = part[0]
    K.fwd_finalize_kernel[p.finalize_grid](
        part[0], part[1], part[2], p.splits, C, layout.count, 1.0, 0.0, 0.0, dummy, dummy,
        mean, m2, dummy, HAS_RMEAN=False, HAS_RVAR=False, CHECK=False, MOMENTS=True,
        BLOCK_S=p.finalize_block_s, BLOCK_C=p.finalize_block_c,
    )
    return layout.count, mean.view(shape), m2.view(shape)


def forward_training(x, gamma, beta, layout, *, eps, momentum=0.1, running_mean=None,
                     running_var=None, out=None, check_finite=False, residual=None,
                     epilogue=None):
    """y = act(gamma * (x - mu) / sqrt(var + eps) + beta + residual) with the batch's mu and
    biased var (contract §1, §8).

    Args:
        x: [layout.shape] CUDA tensor (float16 / bfloat16 / float32).
        gamma, beta: [layout.param_shape] or None.
        running_mean, running_var: [layout.param_shape] tensors on x's device, updated in
            place, each when given. With ``check_finite``, left as they were when a channel
            is flagged.
        out: optional tensor of x's shape and dtype that receives y; ``out=x`` writes y over
            x (the memory-saving mode).
        residual: optional tensor of x's shape and dtype added before the activation.
        epilogue: the activation (:class:`batchnorm._shapes.Epilogue`) or None.

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

    act, slope = _activation(epilogue)
    p, v, outs = _prepare("forward", layout, x=x, z=residual, out=out, check_finite=check)
    streams = _streamed(p, v, "x", "z", "y")
    mean, invstd = _stats(C, dev), _stats(C, dev)
    stat_flags = _stats(C, dev, torch.int8)
    g, b = _param(gamma, dev), _param(beta, dev)
    rm, rv = _Running(running_mean, dev, check), _Running(running_var, dev, check)
    dummy = invstd
    unbias = M / max(M - 1, 1)
    stats = dict(HAS_RMEAN=rm.work is not None, HAS_RVAR=rv.work is not None, CHECK=check)
    affine = dict(HAS_GAMMA=g is not None, HAS_BETA=b is not None,
                  HAS_RES=residual is not None, HAS_ACT=act)

    if p.algorithm == "persistent":
        K.fwd_persistent_kernel[p.grid](
            *streams, *p.dims, M, unbias, eps, momentum, slope, _or(g, dummy), _or(b, dummy),
            _or(rm.work, dummy), _or(rv.work, dummy), mean, invstd, stat_flags, **affine,
            **stats, **p.tile_meta,
        )
        bad = stat_flags.bool() if check else None
    else:
        S = p.splits
        part = _partials(p, v, C, dev)
        K.fwd_finalize_kernel[p.finalize_grid](
            part[0], part[1], part[2], S, C, M, unbias, eps, momentum, _or(rm.work, dummy),
            _or(rv.work, dummy), mean, invstd, stat_flags, **stats, MOMENTS=False,
            BLOCK_S=p.finalize_block_s, BLOCK_C=p.finalize_block_c,
        )
        flags = torch.empty((S, C), dtype=torch.int8, device=dev) if check else stat_flags
        K.fwd_apply_kernel[p.grid](
            *streams, *p.dims, p.n_tb, p.tiles, p.tiles_per_split, mean, invstd,
            _or(g, dummy), _or(b, dummy), eps, slope, flags, FROM_VAR=False, CHECK=check,
            **affine, **p.tile_meta,
        )
        bad = (stat_flags.bool() | flags.bool().any(dim=0)) if check else None
    rm.commit(bad)
    rv.commit(bad)
    shape = layout.param_shape
    return (outs["y"].finish(), mean.view(shape), invstd.view(shape),
            None if bad is None else bad.view(shape))


def _apply(pass_, x, mean, stat, gamma, beta, layout, eps, residual, epilogue, out):
    """The apply kernel alone: ``stat`` is the variance (inference, with eps) or invstd."""
    _check_device(x)
    dev = x.device
    if x.numel() == 0:
        return _Output(x, layout, out).finish()
    act, slope = _activation(epilogue)
    p, v, outs = _prepare(pass_, layout, x=x, z=residual, out=out)
    g, b = _param(gamma, dev), _param(beta, dev)
    mu, st = _param(mean, dev), _param(stat, dev)
    K.fwd_apply_kernel[p.grid](
        *_streamed(p, v, "x", "z", "y"), *p.dims, p.n_tb, p.tiles, p.tiles_per_split, mu, st,
        _or(g, mu), _or(b, mu), eps, slope, mu, FROM_VAR=pass_ == "inference",
        HAS_GAMMA=g is not None, HAS_BETA=b is not None, HAS_RES=residual is not None,
        HAS_ACT=act, CHECK=False, **p.tile_meta,
    )
    return outs["y"].finish()


def forward_inference(x, gamma, beta, mean, var, layout, *, eps, out=None, residual=None,
                      epilogue=None):
    """y = act(gamma * (x - mean) / sqrt(var + eps) + beta + residual) with the given
    statistics.

    Args:
        x: [layout.shape] CUDA tensor; gamma, beta: [param_shape] or None;
        mean, var: [param_shape]; out: optional tensor of x's shape and dtype (``out=x``
        writes y over x); residual, epilogue: as in :func:`forward_training`.
    """
    return _apply("inference", x, mean, var, gamma, beta, layout, eps, residual, epilogue, out)


def apply(x, mean, invstd, gamma, beta, layout, *, residual=None, epilogue=None, out=None):
    """The apply phase: y = act(gamma * (x - mean) * invstd + beta + residual), in x's dtype.

    Args:
        x: [layout.shape] CUDA tensor; mean, invstd: [param_shape] (any float dtype, e.g.
            the float64 statistics of merged :func:`moments`); gamma, beta: [param_shape]
            or None; residual, epilogue, out: as in :func:`forward_training`.
    """
    return _apply("apply", x, mean, invstd, gamma, beta, layout, 0.0, residual, epilogue, out)


# ----------------------------------------------------------------------------- backward


class _Grad:
    """What the three backward kernels share: the streams and per-channel arguments of one
    call, and the epilogue's constexprs."""

    def __init__(self, pass_, dy, x, mean, invstd, gamma, beta, layout, *, y, epilogue,
                 out=None, out_dz=None, want_dz=False):
        _check_device(dy)
        dev = dy.device
        act, slope = _activation(epilogue)
        self.plan, views, self.outputs = _prepare(pass_, layout, x=x, dy=dy, y=y, act=act,
                                                  out=out, out_dz=out_dz, want_dz=want_dz)
        self.streams = _streamed(self.plan, views, "x", "dy", "y", "dx", "dz")
        g, b = _param(gamma, dev), _param(beta, dev)
        mu, inv = _param(mean, dev), _param(invstd, dev)
        self.channel = (mu, inv, _or(g, inv), _or(b, inv), slope)
        # beta and the recovery from y matter only where xhat is recovered: fixed elsewhere,
        # so that calls computing the same thing share one compiled variant
        from_y = x is None and pass_ != "grad_apply_inference"
        self.flags = dict(HAS_GAMMA=g is not None, HAS_BETA=from_y and b is not None,
                          HAS_ACT=act, FROM_Y=from_y)

    @property
    def split(self) -> tuple:
        p = self.plan
        return (p.n_tb, p.tiles, p.tiles_per_split)

    def sums(self, C: int, device, *, write_dx=False, write_dz=False):
        """bwd_partial + bwd_finalize: ``(sum(g), sum(g * xhat))``, float32 [C] each."""
        p = self.plan
        part = torch.empty((2, p.splits, C), dtype=torch.float32, device=device)
        K.bwd_partial_kernel[p.grid](
            *self.streams, *p.dims, *self.split, *self.channel, part[0], part[1],
            WRITE_DX=write_dx, WRITE_DZ=write_dz, **self.flags, **p.tile_meta,
        )
        sum_g, sum_gx = _stats(C, device), _stats(C, device)
        K.bwd_finalize_kernel[p.finalize_grid](
            part[0], part[1], p.splits, C, sum_gx, sum_g, BLOCK_S=p.finalize_block_s,
            BLOCK_C=p.finalize_block_c,
        )
        return sum_g, sum_gx

    def apply(self, count: int, sum_g, sum_gx, *, training: bool, write_dz: bool):
        """bwd_apply: dx (and dz) from the sums over ``count`` values per channel."""
        p = self.plan
        K.bwd_apply_kernel[p.grid](
            *self.streams, *p.dims, *self.split, count, *self.channel, sum_gx, sum_g,
            WRITE_DZ=write_dz, TRAINING=training, **self.flags, **p.tile_meta,
        )

    def persistent(self, count: int, sum_g, sum_gx, *, training: bool, write_dz: bool):
        """bwd_persistent: sums, dx (and dz) in one read."""
        p = self.plan
        K.bwd_persistent_kernel[p.grid](
            *self.streams, *p.dims, count, *self.channel, sum_gx, sum_g, WRITE_DZ=write_dz,
            TRAINING=training, **self.flags, **p.tile_meta,
        )


def _empty_like_out(dy, layout, out):
    return _Output(dy, layout, out).finish()


def grad_sums(dy, x, mean, invstd, layout, *, y=None, gamma=None, beta=None, epilogue=None):
    """The gradient sums ``(sum(g), sum(g * xhat))`` per channel, g = dy * act'(pre).

    Args:
        dy: [layout.shape] CUDA tensor; x: the forward's input of dy's shape, or None when
            xhat is recovered from y (then y, gamma and beta are the forward's).
        mean, invstd: [param_shape] the statistics the forward normalized with.
        y: the forward's output, needed with an activation (its sign gives act') and
            without x; epilogue: the forward's activation or None.

    Returns:
        ``(sum_g, sum_g_xhat)``: float32 [param_shape] tensors (dbeta and dgamma when the
        sums are over the whole batch).
    """
    _check_device(dy)
    dev, C, shape = dy.device, layout.channels, layout.param_shape
    if dy.numel() == 0:
        zeros = torch.zeros(shape, dtype=torch.float32, device=dev)
        return zeros, zeros.clone()
    grad = _Grad("grad_sums", dy, x, mean, invstd, gamma, beta, layout, y=y,
                 epilogue=epilogue)
    sum_g, sum_gx = grad.sums(C, dev)
    return sum_g.view(shape), sum_gx.view(shape)


def grad_apply(dy, x, mean, invstd, gamma, sums, layout, *, count, training=True, y=None,
               beta=None, epilogue=None, out=None, out_dz=None, want_dz=False):
    """The gradient apply phase: ``(dx, dz)`` from dy and the channel sums.

    Training:  dx = gamma * invstd * (g - (sum(g) + xhat * sum(g xhat)) / count)
    Inference: dx = gamma * invstd * g
    with g = dy * act'(pre) = dz.

    Args:
        dy, x, mean, invstd, gamma, y, beta, epilogue: as in :func:`grad_sums`.
        sums: ``(sum_g, sum_g_xhat)`` [param_shape] over all ``count`` values of each
            channel (under SyncBatchNorm: summed over every process); unused in inference.
        count: M, the values per channel the statistics and sums were taken over.
        out, out_dz: optional tensors of dy's shape and dtype for dx and dz.
        want_dz: whether to compute dz (the residual's gradient).

    Returns:
        ``(dx, dz)``, dz None unless ``want_dz``.
    """
    _check_device(dy)
    if dy.numel() == 0:
        return (_empty_like_out(dy, layout, out),
                _empty_like_out(dy, layout, out_dz) if want_dz else None)
    pass_ = "grad_apply" if training else "grad_apply_inference"
    grad = _Grad(pass_, dy, x, mean, invstd, gamma, beta, layout, y=y, epilogue=epilogue,
                 out=out, out_dz=out_dz, want_dz=want_dz)
    inv = grad.channel[1]
    sum_g, sum_gx = (_param(s, dy.device) for s in sums) if training else (inv, inv)
    grad.apply(count, sum_g, sum_gx, training=bool(training), write_dz=bool(want_dz))
    outs = grad.outputs
    return outs["dx"].finish(), outs["dz"].finish() if want_dz else None


def backward(dy, x, gamma, mean, invstd, layout, *, training=True, out=None, y=None,
             beta=None, epilogue=None, residual=False, out_dz=None):
    """dx, dgamma, dbeta (and dz) from dy and the saved mean / invstd (contract §1, §8).

    Training:  dx = gamma * invstd * (g - (dbeta + xhat * dgamma) / M)
    Inference: dx = gamma * invstd * g
    with g = dy * act'(pre), dbeta = sum(g), dgamma = sum(g * xhat), dz = g.

    What it needs saved from the forward (contract §8): x, ``itemsize`` bytes per element;
    x and y with an activation (y's sign gives act'), ``2 * itemsize``; y alone in the
    memory-saving mode (``x=None``: xhat = (act^-1(y) - beta) / gamma), ``itemsize``; plus
    the per-channel mean, invstd, gamma and beta.

    Args:
        dy: [layout.shape] CUDA tensor; x: the forward's input, or None in the memory-saving
            mode (the forward wrote y over x).
        gamma: [param_shape] or None; mean, invstd: [param_shape] saved statistics.
        out: optional tensor of dy's shape and dtype that receives dx.
        y: the forward's output, needed with an activation and when x is None.
        beta: the forward's shift, used when x is None.
        epilogue: the forward's activation or None.
        residual: whether the forward added a residual: dz = g is returned last.
        out_dz: optional tensor of dy's shape and dtype that receives dz.

    Returns:
        (dx, dgamma, dbeta), and dz last when ``residual``: dgamma / dbeta float32
        [param_shape]; dgamma None without gamma.
    """
    _check_device(dy)
    dev = dy.device
    C, M = layout.channels, layout.count
    shape = layout.param_shape
    if dy.numel() == 0:
        zeros = torch.zeros(shape, dtype=torch.float32, device=dev)
        grads = (_empty_like_out(dy, layout, out), None if gamma is None else zeros,
                 zeros.clone())
        return grads + (_empty_like_out(dy, layout, out_dz),) if residual else grads

    training, residual = bool(training), bool(residual)
    pass_ = "backward" if training else "backward_inference"
    grad = _Grad(pass_, dy, x, mean, invstd, gamma, beta, layout, y=y, epilogue=epilogue,
                 out=out, out_dz=out_dz, want_dz=residual)
    if grad.plan.algorithm == "persistent":
        sum_g, sum_gx = _stats(C, dev), _stats(C, dev)
        grad.persistent(M, sum_g, sum_gx, training=training, write_dz=residual)
    elif training:
        sum_g, sum_gx = grad.sums(C, dev)
        grad.apply(M, sum_g, sum_gx, training=True, write_dz=residual)
    else:  # dx and dz need no sums: written by the pass that takes them
        sum_g, sum_gx = grad.sums(C, dev, write_dx=True, write_dz=residual)
    outs = grad.outputs
    grads = (outs["dx"].finish(), None if gamma is None else sum_gx.view(shape),
             sum_g.view(shape))
    return grads + (outs["dz"].finish(),) if residual else grads
