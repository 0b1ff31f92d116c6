"""Every kernel variant the gpu backend's launchers choose compiles for sm_90 and sm_80.

No GPU is needed: ``tests/gpu_compile.py`` (run here in one subprocess per target, without
the interpreter) drives the launchers on meta tensors under a stand-in Triton driver and
compiles each distinct variant with Triton's compiler and the ``ptxas`` in its wheel. These
tests then hold every variant to what a device needs: it compiles; it spills nothing and
uses no stack; its registers and shared memory fit one program on an SM; on contiguous,
aligned float32 / float16 inputs the streaming kernels load and store every tensor they
stream 128 bits at a time; a 64-bit-indexed variant multiplies strides in 64 bits. The grid
holds every fused form (residual, activation, the memory-saving mode) and every phase. A
failure names the target, the kernel, its constexprs and pointer dtypes, the call that
chose it, and the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("torch")

from triton.backends import backends  # noqa: E402

if "nvidia" not in backends:
    pytest.skip("the installed Triton has no NVIDIA backend to compile with",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_compile as G  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (90, 80)


@pytest.fixture(scope="module")
def variants() -> dict[int, list[dict]]:
    """arch -> every compiled variant's report (both targets compiled concurrently)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    procs = {arch: subprocess.Popen([sys.executable, str(ROOT / "tests" / "gpu_compile.py"),
                                     str(arch)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for arch in TARGETS}
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"sm_{arch} compile run failed:\n{stderr[-4000:]}"
        out[arch] = [json.loads(line) for line in stdout.splitlines()]
    return out


def where(v: dict) -> str:
    return (f"sm_{v['arch']} {v['kernel']} constexprs={v['constexprs']} dtypes={v['dtypes']} "
            f"(first chosen by: {v['case']})")


def fail_on(problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} variant(s):\n" + "\n".join(problems[:40]))


@pytest.mark.parametrize("arch", TARGETS)
def test_every_variant_compiles(variants, arch):
    fail_on([f"{where(v)}: {v['error']}" for v in variants[arch] if v["error"]])


@pytest.mark.parametrize("arch", TARGETS)
def test_no_spills_and_no_stack(variants, arch):
    fail_on([f"{where(v)}: local memory {v['usage']['LOCAL']} B, stack {v['usage']['STACK']} B"
             for v in variants[arch] if not v["error"]
             and (v["usage"]["LOCAL"] or v["usage"]["STACK"])])


@pytest.mark.parametrize("arch", TARGETS)
def test_one_program_fits_an_sm(variants, arch):
    problems = []
    for v in variants[arch]:
        if v["error"]:
            continue
        warps = v["constexprs"].get("num_warps", 4)
        # registers are allocated per warp in units of 256
        per_warp = -(-v["usage"]["REG"] * 32 // 256) * 256
        if per_warp * warps > G.REGISTERS_PER_SM:
            problems.append(f"{where(v)}: {v['usage']['REG']} registers x {warps} warps")
        shared = v["usage"]["SHARED"] + v["shared_dynamic"]
        if shared > G.SHARED_LIMIT[arch]:
            problems.append(f"{where(v)}: {shared} B of shared memory > "
                            f"{G.SHARED_LIMIT[arch]}")
    fail_on(problems)


@pytest.mark.parametrize("arch", TARGETS)
def test_streaming_kernels_move_128_bits_at_a_time(variants, arch):
    """Contiguous float32 / float16 inputs whose strides are multiples of 16 elements: every
    tensor a variant streams (x, the residual, dy, y; y, dx, dz written) moves 128 bits at a
    time."""
    problems, checked = [], 0
    for v in variants[arch]:
        dtype = v["dtypes"].get("x_ptr")
        if v["error"] or v["kernel"] not in G.STREAMING or not v["aligned"] or \
                dtype not in ("float32", "float16"):
            continue
        checked += 1
        reads, writes = G.streamed(v["kernel"], v["constexprs"])
        if v["vector_loads"] < reads:
            problems.append(f"{where(v)}: {v['vector_loads']} 128-bit loads for {reads} "
                            "streamed input(s)")
        if v["vector_stores"] < writes:
            problems.append(f"{where(v)}: {v['vector_stores']} 128-bit stores for {writes} "
                            "streamed output(s)")
        if dtype == "float16" and v["scalar_16bit"]:
            problems.append(f"{where(v)}: {v['scalar_16bit']} scalar 16-bit global accesses")
    fail_on(problems)
    assert checked >= 100, f"only {checked} aligned streaming variants were checked"


@pytest.mark.parametrize("arch", TARGETS)
def test_int64_indexing_multiplies_strides_in_64_bits(variants, arch):
    """The channel offset ``c * sxc`` (and every origin product) of an I64 variant is 64-bit."""
    wide = [v for v in variants[arch] if v["constexprs"].get("I64")]
    assert {v["constexprs"]["I64"] for v in wide} == {1, 2}
    fail_on([f"{where(v)}: {line}" for v in wide for line in v["narrow_stride_mults"]])


def test_the_grid_reaches_every_choice(variants):
    """Every kernel, dtype, indexing width and flag value the launchers can choose appears."""
    vs = variants[TARGETS[0]]
    from batchnorm.backends import _triton_kernels as K

    kernels = {name for name in dir(K) if name.endswith("_kernel")}
    assert {v["kernel"] for v in vs} == kernels
    assert {v["dtypes"].get("x_ptr") for v in vs} >= {"float32", "float16", "bfloat16"}

    def values(flag):
        return {v["constexprs"][flag] for v in vs if flag in v["constexprs"]}

    for flag in ("HAS_GAMMA", "HAS_BETA", "HAS_RMEAN", "HAS_RVAR", "CHECK", "FROM_VAR",
                 "TRAINING", "WRITE_DX", "HAS_RES", "HAS_ACT", "FROM_Y", "WRITE_DZ", "MOMENTS"):
        assert values(flag) == {False, True}, flag

    def combos(kernel, *flags):
        return {tuple(v["constexprs"][f] for f in flags) for v in vs if v["kernel"] == kernel}

    # every epilogue of every streaming kernel (the forward's in place are the same variants)
    every = {(a, b) for a in (False, True) for b in (False, True)}
    for kernel in ("fwd_apply_kernel", "fwd_persistent_kernel"):
        assert combos(kernel, "HAS_RES", "HAS_ACT") == every, kernel
    backward_forms = {(False, False, False), (True, False, False), (False, False, True),
                      (True, False, True), (False, True, False), (True, True, False)}
    for kernel in ("bwd_partial_kernel", "bwd_apply_kernel", "bwd_persistent_kernel"):
        assert combos(kernel, "HAS_ACT", "FROM_Y", "WRITE_DZ") >= backward_forms, kernel
    assert combos("bwd_apply_kernel", "TRAINING", "WRITE_DZ") == every
    assert values("I64") == {0, 1, 2}
    algorithms = {(v["kernel"].split("_")[0], "persistent" in v["kernel"]) for v in vs}
    assert algorithms == {("fwd", True), ("fwd", False), ("bwd", True), ("bwd", False)}
