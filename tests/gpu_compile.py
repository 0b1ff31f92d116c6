"""Compile every kernel variant the gpu backend's launchers choose, for a real GPU target,
on a machine without a GPU.

A stand-in for Triton's active driver reports the target (``GPUTarget("cuda", arch, 32)``),
a device index and a stream; the launchers then run unchanged on ``device="meta"`` tensors
(shapes and strides, no memory), and every ``kernel[grid](...)`` they make is turned into
``JITFunction.run(..., warmup=True)``: specialised exactly as on the device (16-byte
aligned pointers, integers equal to 1 or divisible by 16) and compiled by Triton's own
compiler and the ``ptxas`` inside its wheel, not executed. Each distinct variant (kernel,
pointer dtypes, constexprs, launch options, and whether the launch plan calls the tiles
vector-aligned) is compiled once.

For each variant this reports what a device would refuse or pay for: compile errors,
registers, stack and local memory (spills) from ``cuobjdump -res-usage``, shared memory,
128-bit global loads and stores in the PTX, and, for 64-bit-indexed variants, any 32-bit
multiplication by a stride in the Triton IR.

Run as ``python tests/gpu_compile.py ARCH`` (80 or 90) without ``TRITON_INTERPRET``: one
JSON object per variant on standard output. ``tests/test_gpu_compile.py`` runs it in CI.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

# Streaming multiprocessors of the targets' reference parts (H100 / H200 SXM, A100), so the
# split launches are sized as on those devices.
SMS = {90: 132, 80: 108}
# Shared memory one program may use (opt-in maximum per block), bytes.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
REGISTERS_PER_SM = 65536
# Kernels that stream whole tensors (the others touch per-channel vectors only).
STREAMING = ("fwd_partial_kernel", "fwd_apply_kernel", "fwd_persistent_kernel",
             "bwd_partial_kernel", "bwd_apply_kernel", "bwd_persistent_kernel")
STRIDE_ARGS = {"sxa", "sxc", "sxb", "sya", "syc", "syb", "sda", "sdc", "sdb", "sga", "sgc",
               "sgb", "sza", "szc", "szb"}


def streamed(kernel: str, k: dict) -> tuple[int, int]:
    """(tensors read, tensors written) whole by a streaming kernel with constexprs ``k``."""
    if kernel == "fwd_partial_kernel":
        return 1, 0
    if kernel.startswith("fwd"):
        return 1 + k["HAS_RES"], 1                       # x (z) -> y
    xhat = kernel != "bwd_apply_kernel" or k["TRAINING"]  # inference dx needs no xhat
    reads = 1 + (xhat and not k["FROM_Y"]) + (k["HAS_ACT"] or (xhat and k["FROM_Y"]))
    if kernel == "bwd_partial_kernel":                    # dx (dz) only in inference
        return reads, k["WRITE_DX"] * (1 + k["WRITE_DZ"])
    return reads, 1 + k["WRITE_DZ"]                      # dy, x or y (y) -> dx (dz)


@dataclass(frozen=True)
class Case:
    """One call of a launcher: which pass, on which input."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    pass_: str
    memory_format: str = "contiguous"  # or channels_last / channels_last_3d / strided_i64
    mode: str = "spatial"
    channel_axis: int = 1
    affine: tuple[bool, bool] = (True, True)  # gamma, beta
    running: tuple[bool, bool] = (True, True)  # running_mean, running_var
    check_finite: bool = False
    form: str = "plain"  # a key of FORMS

    @property
    def label(self) -> str:
        flags = "".join(k for k, v in zip("gbmv", (*self.affine, *self.running),
                                          strict=True) if v)
        return (f"{self.name} {self.shape} {self.dtype} {self.memory_format} {self.pass_}"
                f" {self.form} [{flags}{' check' if self.check_finite else ''}]")


# name -> (shape, memory format, mode, channel_axis). The launch plan picks the algorithm;
# the names say what each shape is there for.
SHAPES = {
    "nchw small": ((4, 32, 16, 16), "contiguous", "spatial", 1),
    "nchw large": ((16, 16, 64, 64), "contiguous", "spatial", 1),
    "nchw 7x7 small": ((4, 24, 7, 7), "contiguous", "spatial", 1),
    "nchw 7x7 large": ((1024, 24, 7, 7), "contiguous", "spatial", 1),
    "channels_last small": ((2, 64, 4, 4), "channels_last", "spatial", 1),
    "channels_last large": ((8, 64, 32, 32), "channels_last", "spatial", 1),
    "channels_last 24 channels": ((2, 24, 8, 8), "channels_last", "spatial", 1),
    "nc small": ((64, 256), "contiguous", "spatial", 1),
    "nc large": ((4096, 96), "contiguous", "spatial", 1),
    "ncdhw large": ((4, 16, 8, 32, 32), "contiguous", "spatial", 1),
    "ndhwc large": ((4, 32, 8, 16, 16), "channels_last_3d", "spatial", 1),
    "per_activation small": ((32, 16, 8, 8), "contiguous", "per_activation", 1),
    "per_activation large": ((4096, 8, 4, 4), "contiguous", "per_activation", 1),
    "nhwc (channel_axis=-1) large": ((8, 32, 32, 48), "contiguous", "spatial", -1),
    # 64-bit indexing: a sample of 2**31 elements (NCHW), a large channels-last batch, a
    # small view whose strides alone pass 2**31, and a persistent tile whose span from its
    # origin passes 2**31 (I64 == 2)
    "nchw int64": ((2, 128, 4096, 4096), "contiguous", "spatial", 1),
    "channels_last int64": ((40, 64, 1024, 1024), "channels_last", "spatial", 1),
    "nchw int64 strided view": ((4, 8, 16, 16), "strided_i64", "spatial", 1),
    "nchw int64 wide tile": ((16, 2**20, 16, 16), "contiguous", "spatial", 1),
    # the largest persistent tiles (the register budgets), forward then backward, vector
    # aligned and not
    "nchw persistent largest": ((32, 512, 32, 32), "contiguous", "spatial", 1),
    "nchw backward persistent largest": ((16, 512, 32, 32), "contiguous", "spatial", 1),
    "nchw 7x7 persistent largest": ((256, 512, 7, 7), "contiguous", "spatial", 1),
    "nchw 7x7 backward persistent largest": ((128, 512, 7, 7), "contiguous", "spatial", 1),
    "channels_last persistent largest": ((2, 64, 16, 16), "channels_last", "spatial", 1),
    "channels_last backward persistent largest": ((1, 64, 16, 16), "channels_last",
                                                  "spatial", 1),
}
PASSES = ("forward", "inference", "backward", "backward_inference")
PHASES = ("moments", "apply", "grad_sums", "grad_apply", "grad_apply_inference")
ALL_DTYPES = ("float32", "float16", "bfloat16")
# The fused forms of contract §8: name -> (residual, activation, memory-saving). Forward a
# residual is read (HAS_RES), backward dz written (WRITE_DZ); the activation is leaky_relu
# (relu is the same variant, slope 0); memory-saving forward writes y over x (out=x: the
# same variants, other pointers), backward reads y instead of x (FROM_Y).
FORMS = {
    "plain": (False, False, False),
    "act": (False, True, False),
    "add": (True, False, False),
    "add_act": (True, True, False),
    "inplace": (False, False, True),
    "inplace_act": (False, True, True),
}
# Each fused form on a persistent and a split shape of both layouts, float32 on two of the
# four and float16 on the other two, swapped from one form to the next: each form meets
# both dtypes on both algorithms. Then the persistent tiles at their register budgets with
# two tensors held (forward with a residual, backward from y) and three (backward with an
# activation and x), 64-bit indexing with the residual's and dz's strides, and the phases.
FUSED_SHAPES = ("nchw small", "nchw large", "channels_last small", "channels_last large")
FUSED_LARGEST = {
    # name -> (shape, memory format, forms, passes)
    "nchw persistent largest, 2 held": ((16, 512, 32, 32), "contiguous", ("add_act",),
                                        ("forward",)),
    "nchw 7x7 persistent largest, 2 held": ((128, 512, 7, 7), "contiguous", ("add_act",),
                                            ("forward",)),
    "channels_last persistent largest, 2 held": ((1, 64, 16, 16), "channels_last",
                                                 ("add_act", "inplace_act"),
                                                 ("forward", "backward")),
    "nchw persistent largest, 3 held": ((8, 512, 32, 32), "contiguous", ("act",),
                                        ("backward",)),
    "nchw backward persistent largest, from y": ((16, 512, 32, 32), "contiguous",
                                                 ("inplace_act",), ("backward",)),
    "nchw 7x7 persistent largest, 3 held": ((128, 512, 7, 7), "contiguous",
                                            ("act", "inplace_act"), ("backward",)),
    "channels_last persistent largest, 3 held": ((2, 64, 8, 8), "channels_last", ("act",),
                                                 ("backward",)),
}
PHASE_FORMS = {"moments": ("plain",), "apply": ("plain", "add_act"),
               "grad_sums": ("plain", "act", "inplace_act"),
               "grad_apply": ("plain", "add_act", "inplace_act"),
               "grad_apply_inference": ("plain", "add_act", "inplace")}
# (gamma, beta, running_mean, running_var, check_finite): every pair of these flags takes all
# four value pairs in some row (an orthogonal array), plus all on; 9 compiles, not 32.
PAIRWISE_FLAGS = [tuple(bool(int(c)) for c in row) for row in (
    "00000", "00011", "01100", "01111", "10101", "10110", "11001", "11010", "11111")]


def cases() -> list[Case]:
    """The grid: every shape in every pass and dtype (bfloat16 on four of them), then
    the optional inputs and check_finite, pairwise, on a small (persistent) and a large
    (split) shape."""
    out = []
    for name, (shape, fmt, mode, axis) in SHAPES.items():
        # bfloat16 is loaded and stored like float16 (same registers, same tiles): the
        # persistent and split shapes of both layouts show it compiles
        for dtype in ALL_DTYPES if name in FUSED_SHAPES else ALL_DTYPES[:2]:
            for pass_ in PASSES:
                out.append(Case(name, shape, dtype, pass_, fmt, mode, axis))
    for name in ("nchw small", "nchw large"):
        shape, fmt, mode, axis = SHAPES[name]
        for g, b, m, v, chk in PAIRWISE_FLAGS:
            out.append(Case(name, shape, "float32", "forward", fmt, mode, axis, (g, b), (m, v),
                            chk))
        for g in (False, True):
            for pass_ in PASSES:
                out.append(Case(name, shape, "float32", pass_, fmt, mode, axis, (g, not g)))
    dtypes = ("float32", "float16", "float16", "float32")
    for i, form in enumerate(f for f in FORMS if f != "plain"):
        for j, name in enumerate(FUSED_SHAPES):
            shape, fmt, mode, axis = SHAPES[name]
            dtype = dtypes[(i + j) % 4]
            # training on all four; inference (the apply kernel with the variance, the
            # partial-sums kernel writing dx) on one layout per algorithm, alternating
            passes = PASSES if (j in (0, 3)) == (i % 2 == 0) else ("forward", "backward")
            for pass_ in passes:
                out.append(Case(name, shape, dtype, pass_, fmt, mode, axis, form=form))
        # beta given and not (it shifts the recovery from y)
        if FORMS[form][2]:
            shape, fmt, mode, axis = SHAPES["nchw large"]
            out.append(Case("nchw large", shape, "float32", "backward", fmt, mode, axis,
                            (True, False), form=form))
    for name, (shape, fmt, forms, passes) in FUSED_LARGEST.items():
        for dtype in ALL_DTYPES[:2]:
            for form in forms:
                for pass_ in passes:
                    out.append(Case(name, shape, dtype, pass_, fmt, form=form))
    shape, fmt, mode, axis = SHAPES["nchw int64"]
    for pass_ in ("forward", "backward"):
        out.append(Case("nchw int64", shape, "float16", pass_, fmt, mode, axis,
                        form="add_act"))
    for pass_, forms in PHASE_FORMS.items():
        for name, dtype in (("nchw large", "float16"), ("channels_last large", "float32")):
            shape, fmt, mode, axis = SHAPES[name]
            for form in forms:
                out.append(Case(name, shape, dtype, pass_, fmt, mode, axis, form=form))
    return out


# ----------------------------------------------------------------------------- stand-ins


def _stand_in_driver(arch: int):
    """An active-driver stand-in that answers what compilation asks: target, device, stream."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False  # never chosen by Triton on its own

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_current_device(self):
            return arch  # one binder cache per target

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs under the stand-in driver")

        def get_device_interface(self):
            raise NotImplementedError("nothing runs under the stand-in driver")

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError("nothing runs under the stand-in driver")

        def clear_cache(self, cache):
            pass

    return StandInDriver()


class _Pointer:
    """What Triton's binder reads of a tensor argument: its dtype and address. Addresses are
    256-byte aligned plus the view's offset, as the CUDA caching allocator hands them out."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


@dataclass
class Variant:
    kernel: str
    arch: int
    constexprs: dict
    dtypes: dict
    case: str
    aligned: bool
    error: str | None = None
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)
    shared_dynamic: int = 0
    vector_loads: int = 0
    vector_stores: int = 0
    scalar_16bit: int = 0
    narrow_stride_mults: list = field(default_factory=list)


@contextmanager
def compiling_for(arch: int, record):
    """Inside: the gpu backend's launchers compile each new launch for ``arch`` instead of
    running it; ``record(kernel, grid, args, kwargs)`` decides and compiles."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from batchnorm.backends import gpu

    own = JITFunction.__dict__.get("__getitem__")
    saved = gpu._interpreting, gpu._num_sms
    driver.set_active(_stand_in_driver(arch))
    JITFunction.__getitem__ = lambda kernel, grid: (
        lambda *args, **kwargs: record(kernel, grid, args, kwargs))
    gpu._interpreting = lambda: True  # meta tensors pass the device check
    gpu._num_sms = lambda device: SMS[arch]
    try:
        yield
    finally:
        if own is None:
            del JITFunction.__getitem__
        else:
            JITFunction.__getitem__ = own
        gpu._interpreting, gpu._num_sms = saved
        driver.set_active(None)  # back to "not chosen yet": Triton picks again on next use


# ----------------------------------------------------------------------------- inspection

_VEC128 = re.compile(r"\b(ld|st)\.global[\w:.]*\.(v4\.[bfus]32|v2\.[bfus]64)\b")
_SCALAR16 = re.compile(r"\b(ld|st)\.global[\w:.]*\.[bfus]16\b")


def _cuobjdump() -> str:
    """The cuobjdump shipped in Triton's wheel (``TRITON_CUOBJDUMP_PATH`` overrides it)."""
    import triton

    try:
        return triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # releases before the knobs module
        return os.environ.get("TRITON_CUOBJDUMP_PATH") or os.path.join(
            os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _res_usage(cubin: bytes, kernel: str) -> dict:
    """REG, STACK, SHARED, LOCAL of the kernel, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", fh.name],
                              capture_output=True, text=True, check=True).stdout
    m = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage did not list {kernel}:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", m.group(1))}


def narrow_stride_mults(ttir: str, level: int) -> list[str]:
    """Lines of the Triton IR that multiply by a stride argument (or a value made from one by
    extension, splat or broadcast) in 32 bits where the indexing level forbids it: scalar
    products (a tile's origin) at level 1, every product at level 2."""
    derived = set(STRIDE_ARGS)
    bad = []
    for line in ttir.splitlines():
        m = re.match(r"\s*%([\w.]+) = (\S+) (.*?) : (.*?)(?: loc\(|$)", line)
        if m is None:
            continue
        name, op, operands, result_type = m.groups()
        used = {o.lstrip("%").split("#")[0] for o in re.findall(r"%[\w.#]+", operands)}
        if not used & derived:
            continue
        if op in ("arith.extsi", "tt.splat", "tt.broadcast", "tt.expand_dims"):
            derived.add(name)
        elif op == "arith.muli":
            scalar = result_type.strip() == "i32"
            vector32 = result_type.strip().endswith("xi32>")
            if scalar or (level == 2 and vector32):
                bad.append(line.strip())
    return bad


def inspect_kernel(compiled, variant: Variant) -> None:
    """Fill in the variant's resource usage and code facts from the compiled kernel."""
    variant.usage = _res_usage(compiled.asm["cubin"], variant.kernel)
    variant.shared_dynamic = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    for m in _VEC128.finditer(ptx):
        if m.group(1) == "ld":
            variant.vector_loads += 1
        else:
            variant.vector_stores += 1
    variant.scalar_16bit = len(_SCALAR16.findall(ptx))
    if variant.constexprs.get("I64"):
        variant.narrow_stride_mults = narrow_stride_mults(compiled.asm["ttir"],
                                                          variant.constexprs["I64"])


# ----------------------------------------------------------------------------- the run


def _make_inputs(case: Case):
    import torch

    from batchnorm._shapes import resolve_layout

    dtype = getattr(torch, case.dtype)
    meta = dict(device="meta", dtype=dtype)
    if case.memory_format == "strided_i64":
        n, c, h, w = case.shape
        big = 2**31 // (c * h * w) + 1  # the sample stride alone passes 2**31 elements
        x = torch.empty((n * big, c, h, w), **meta)[::big]
    elif case.memory_format == "contiguous":
        x = torch.empty(case.shape, **meta)
    else:
        x = torch.empty(case.shape, **meta, memory_format=getattr(torch, case.memory_format))
    kwargs = {"mode": case.mode, "channel_axis": case.channel_axis}
    layout = resolve_layout(tuple(x.shape), **kwargs)
    p = layout.param_shape
    vec = dict(device="meta", dtype=torch.float32)
    gamma = torch.empty(p, **vec) if case.affine[0] else None
    beta = torch.empty(p, **vec) if case.affine[1] else None
    rm = torch.empty(p, **vec) if case.running[0] else None
    rv = torch.empty(p, **vec) if case.running[1] else None
    return x, layout, gamma, beta, rm, rv


def run_case(case: Case, plans: list) -> None:
    """Call the launcher of the case's pass or phase (under :func:`compiling_for`), first
    appending the plan it will follow to ``plans``."""
    import torch

    from batchnorm._shapes import Epilogue
    from batchnorm.backends import gpu

    x, layout, gamma, beta, rm, rv = _make_inputs(case)
    residual, act, memsave = FORMS[case.form]
    forward = case.pass_ in ("forward", "inference", "moments", "apply")
    epilogue = Epilogue("leaky_relu", 0.1) if act else None
    dy = torch.empty_like(x)
    z = torch.empty_like(x) if residual and forward else None
    y = torch.empty_like(x) if not forward and (act or memsave) else None
    xin = None if memsave and not forward else x
    out = x if memsave and forward else None
    fused = dict(epilogue=epilogue)
    plans.append(gpu.launch_plan(case.pass_, xin, layout, dy=dy, y=y, residual=z, out=out,
                                 want_dz=residual, check_finite=case.check_finite, **fused))
    stat = torch.empty(layout.param_shape, device="meta", dtype=torch.float32)
    # the phases get the float64 statistics of merged moments, as SyncBatchNorm has them
    merged = torch.empty(layout.param_shape, device="meta", dtype=torch.float64)
    if case.pass_ == "forward":
        gpu.forward_training(x, gamma, beta, layout, eps=1e-5, momentum=0.1, running_mean=rm,
                             running_var=rv, check_finite=case.check_finite, out=out,
                             residual=z, **fused)
    elif case.pass_ == "inference":
        gpu.forward_inference(x, gamma, beta, stat, stat, layout, eps=1e-5, out=out,
                              residual=z, **fused)
    elif case.pass_ == "moments":
        gpu.moments(x, layout)
    elif case.pass_ == "apply":
        gpu.apply(x, merged, merged, gamma, beta, layout, out=out, residual=z, **fused)
    elif case.pass_ == "grad_sums":
        gpu.grad_sums(dy, xin, merged, merged, layout, y=y, gamma=gamma, beta=beta, **fused)
    elif case.pass_.startswith("grad_apply"):
        gpu.grad_apply(dy, xin, merged, merged, gamma, (stat, stat), layout,
                       count=layout.count,
                       training=case.pass_ == "grad_apply", y=y, beta=beta,
                       want_dz=residual, **fused)
    else:
        gpu.backward(dy, xin, gamma, stat, stat, layout, training=case.pass_ == "backward",
                     y=y, beta=beta, residual=residual, **fused)


def compile_all(arch: int, grid: list[Case] | None = None) -> list[Variant]:
    """Compile every distinct variant the grid's launches choose, for sm_<arch>."""
    import torch

    variants: dict[tuple, Variant] = {}
    current: list[Case] = []
    plans: list = []

    def record(kernel, grid_, args, kwargs):
        fn = kernel.fn
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        params = {k: v for k, v in kwargs.items() if k not in options}
        bound = inspect.signature(fn).bind(*args, **params)
        constexprs = {p.name: bound.arguments[p.name] for p in kernel.params
                      if p.is_constexpr and p.name in bound.arguments}
        constexprs.update(options)
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in bound.arguments.items()
                  if isinstance(v, torch.Tensor)}
        case, aligned = current[0], plans[-1].aligned
        key = (fn.__name__, tuple(sorted(dtypes.items())), tuple(sorted(constexprs.items())),
               aligned)
        if key in variants:
            return None
        v = Variant(fn.__name__, arch, constexprs, dtypes, case.label, aligned)
        variants[key] = v
        wrapped = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        wrapped_kw = {k: _Pointer(a) if isinstance(a, torch.Tensor) else a
                      for k, a in kwargs.items()}
        t0 = time.perf_counter()
        try:
            compiled = kernel.run(*wrapped, grid=grid_, warmup=True, **wrapped_kw)
            inspect_kernel(compiled, v)
        except Exception as exc:  # reported per variant, with the kernel and constexprs
            v.error = f"{type(exc).__name__}: {exc}"[:2000]
            if os.environ.get("BATCHNORM_COMPILE_TRACE"):
                traceback.print_exc()
        v.seconds = time.perf_counter() - t0
        return None

    with compiling_for(arch, record):
        for case in cases() if grid is None else grid:
            current[:] = [case]
            run_case(case, plans)
    return list(variants.values())


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit() or int(args[0]) not in SMS:
        print(f"usage: python tests/gpu_compile.py {{{'|'.join(map(str, SMS))}}}",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    for v in compile_all(int(args[0])):
        print(json.dumps(v.__dict__, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
