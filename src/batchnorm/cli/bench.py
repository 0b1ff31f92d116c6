"""The benchmark suite: providers x passes x shapes -> a table and CSV rows.

Batch norm is memory-bound, so each time is also given as a fraction of the machine's limit,
measured in the same run: ``t_copy`` is the best time of a threaded copy of an array of x's
size (same thread count as the kernels), and

    f_fwd = 2 * bytes(x) / (t * B_copy) = t_copy / t          (forward training, inference)
    f_bwd = 3 * bytes(x) / (t * B_copy) = 1.5 * t_copy / t    (backward)

``f_alg`` counts the traffic the algorithm needs instead: when the slice one thread reduces
and then revisits (a channel for NCHW, a block of rows per thread for channels-last) is
larger than that thread's share of the cache (L2 + L3 / threads), it has to read x (and dy)
a second time, so f_alg = f * 3/2 forward and f * 5/3 backward; otherwise f_alg = f.

Providers: ``batchnorm-cpu`` (the public API with ``backend="cpu"``), ``torch``
(``torch.nn.functional.batch_norm`` and its ATen ``.out`` kernels, same thread count, never
upcast) and ``reference`` (slow; small shapes or ``--reference``). Each is timed writing into
preallocated outputs (``alloc=prealloc``: both into the same, already touched buffer) and with
fresh outputs (``alloc=fresh``: both allocate their own on every call).

Each provider is timed in its own block after a short pause: the process holds two OpenMP
runtimes (PyTorch's and Numba's), and threads of one still spinning after its last call
would steal the cores from the other's first calls. Calls shorter than a millisecond are
timed in batches and reported per call.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

from .._cache import cache_level
from . import gpu_plan
from ._console import console, progress_bar, table
from .networks import EXTRA, RESNET50

PASSES = ("fwd", "inf", "bwd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``batchnorm bench``."""
    parser.add_argument("--quick", action="store_true", help="batch 8 and fewer repetitions")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    parser.add_argument("--layout", default="both", choices=["nchw", "nhwc", "both"])
    parser.add_argument("--pass", dest="passes", default="all",
                        choices=["fwd", "inf", "bwd", "all"])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both Numba and PyTorch (default: all cores)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    parser.add_argument("--group", default="all",
                        choices=["all", "resnet50", "bn1d", "few-channel", "tiny"],
                        help="only this group of shapes")
    parser.add_argument("--csv", default=None, help="write CSV rows to this path")
    parser.add_argument("--reference", action="store_true",
                        help="also time the float64 reference on every shape (slow)")
    parser.add_argument("--train", action="store_true",
                        help="time a training step (forward, backward, SGD) of a small "
                             "ResNet-style network with our layers against torch.nn's instead; "
                             "see batchnorm.cli.bench_train for its own knobs")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the cold-start measurement (two subprocesses)")
    gpu_plan.add_arguments(parser)


PAUSE_S = 0.05  # idle time before each provider's block (other runtime's spinning threads)
BATCH_S = 2e-3  # calls shorter than this are timed in batches this long


def _time(fn, reps: int, pause: float = 0.0) -> list[float]:
    """Per-call seconds of ``reps`` timed repetitions (each a batch of calls when short)."""
    if pause:
        time.sleep(pause)
    t0 = time.perf_counter()
    fn()  # warm-up: compile, first-touch pages of preallocated outputs
    fn()
    inner = max(1, int(BATCH_S / max(time.perf_counter() - t0, 1e-7)))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def _cache_per_thread(threads: int) -> int:
    """Bytes of cache one thread may count on: its L2 plus its share of the L3."""
    l2, l3 = cache_level(2), cache_level(3)
    total = (l2[0] if l2 else 0) + (l3[0] // threads if l3 else 0)
    return total or 1 << 20


def _alg_factor(case: _Case, pass_: str, threads: int, cache: int) -> float:
    """Traffic the algorithm needs over the floor (1 when a thread's slice stays in cache)."""
    if pass_ == "inf":
        return 1.0
    c = case.shape[1]
    streams = 2 if pass_ == "bwd" else 1  # arrays the reduction reads and the apply re-reads
    if case.layout == "nchw" and len(case.shape) > 2:  # a channel's slice, x (and dy)
        slice_bytes = streams * case.nbytes // c
    else:  # a thread's block of rows
        slice_bytes = streams * case.nbytes // threads
    if slice_bytes <= cache:
        return 1.0
    return 5 / 3 if pass_ == "bwd" else 1.5


def _device() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def _versions() -> str:
    import numba

    import batchnorm

    parts = [f"batchnorm {batchnorm.__version__}", f"numpy {np.__version__}",
             f"numba {numba.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


class _Case:
    """One (shape, layout): arrays for every provider, allocated once."""

    def __init__(self, shape, layout, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.layout = shape, layout
        base = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        self.channel_axis = -1 if layout == "nhwc" else 1
        # NHWC arrays are the same logical tensor stored channels-last
        self.x = np.ascontiguousarray(np.moveaxis(base, 1, -1)) if layout == "nhwc" else base
        self.dy = rng.standard_normal(self.x.shape, dtype=np.float32).astype(dtype)
        c = shape[1]
        self.gamma = np.ones(c, dtype)
        self.beta = np.zeros(c, dtype)
        self.rm = np.zeros(c, np.float32 if dtype != np.float64 else np.float64)
        self.rv = np.ones_like(self.rm)
        self.out = np.empty_like(self.x)
        self.out[...] = 0  # touch the pages once
        self.nbytes = self.x.nbytes


def _bn_calls(case: _Case, pass_: str, prealloc: bool):
    import batchnorm as bn

    kw = dict(channel_axis=case.channel_axis, backend="cpu")
    out = case.out if prealloc else None
    if pass_ == "fwd":
        return lambda: bn.forward_training(case.x, case.gamma, case.beta, running_mean=case.rm,
                                           running_var=case.rv, out=out, **kw)
    if pass_ == "inf":
        return lambda: bn.forward_inference(case.x, case.gamma, case.beta, case.rm, case.rv,
                                            out=out, **kw)
    _, saved = bn.forward_training(case.x, case.gamma, case.beta, **kw)
    return lambda: bn.backward(case.dy, case.x, case.gamma, saved, out=out, **kw)


def _ref_calls(case: _Case, pass_: str):
    import batchnorm as bn

    kw = dict(channel_axis=case.channel_axis, backend="reference")
    if pass_ == "fwd":
        return lambda: bn.forward_training(case.x, case.gamma, case.beta, **kw)
    if pass_ == "inf":
        return lambda: bn.forward_inference(case.x, case.gamma, case.beta, case.rm, case.rv,
                                            **kw)
    _, saved = bn.forward_training(case.x, case.gamma, case.beta, **kw)
    return lambda: bn.backward(case.dy, case.x, case.gamma, saved, **kw)


def _torch_calls(case: _Case, pass_: str, prealloc: bool):
    import torch

    def t(a):
        a = torch.from_numpy(a)
        if case.layout == "nhwc":  # the same logical NCHW tensor, channels-last strides
            a = a.movedim(-1, 1)
        return a

    x, dy, out = t(case.x), t(case.dy), t(case.out)
    g, b = torch.from_numpy(case.gamma), torch.from_numpy(case.beta)
    rm, rv = torch.from_numpy(case.rm), torch.from_numpy(case.rv)
    c = x.shape[1]
    sm, si = torch.empty(c, dtype=rm.dtype), torch.empty(c, dtype=rm.dtype)
    aten = torch.ops.aten
    if pass_ == "fwd":
        if prealloc:
            return lambda: aten.native_batch_norm.out(x, g, b, rm, rv, True, 0.1, 1e-5, out=out,
                                                      save_mean=sm, save_invstd=si)
        return lambda: torch.nn.functional.batch_norm(x, rm, rv, g, b, training=True)
    if pass_ == "inf":
        if prealloc:
            e0, e1 = torch.empty(0, dtype=rm.dtype), torch.empty(0, dtype=rm.dtype)
            return lambda: aten._native_batch_norm_legit_no_training.out(
                x, g, b, rm, rv, 0.1, 1e-5, out0=out, out1=e0, out2=e1)
        return lambda: torch.nn.functional.batch_norm(x, rm, rv, g, b, training=False)
    _, sm, si = aten.native_batch_norm(x, g, b, None, None, True, 0.1, 1e-5)
    mask = [True, True, True]
    if prealloc:
        g1, g2 = torch.empty(c, dtype=g.dtype), torch.empty(c, dtype=g.dtype)
        return lambda: aten.native_batch_norm_backward.out(
            dy, x, g, rm, rv, sm, si, True, 1e-5, mask, out0=out, out1=g1, out2=g2)
    return lambda: aten.native_batch_norm_backward(dy, x, g, rm, rv, sm, si, True, 1e-5, mask)


def _copy_time(case: _Case, reps: int) -> float:
    """Best time of a threaded copy of x (the bandwidth limit, measured now)."""
    try:
        import torch

        src, dst = torch.from_numpy(case.x), torch.from_numpy(case.out)
        return min(_time(lambda: dst.copy_(src), max(reps, 5), PAUSE_S))
    except ImportError:
        import numba

        @numba.njit(parallel=True, cache=True)
        def parallel_copy(src, dst):
            for i in numba.prange(src.size):
                dst[i] = src[i]

        src, dst = case.x.reshape(-1), case.out.reshape(-1)
        return min(_time(lambda: parallel_copy(src, dst), max(reps, 5), PAUSE_S))


def _cold_start(threads: int) -> dict[str, float]:
    """Import + first forward call in a fresh interpreter, compile cache empty then warm."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import numpy as np, numba, batchnorm as bn\n"
        f"numba.set_num_threads({threads})\n"
        "t1 = time.perf_counter()\n"
        "x = np.ones((8, 64, 8, 8), np.float32); x[0] = 2\n"
        "bn.forward_training(x, None, None, backend='cpu')\n"
        "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)\n"
    )
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            res[f"{label}_import_s"], res[f"{label}_first_call_s"] = map(float, out[-2:])
    return res


def _shapes(batch: int, layouts: list[str]):
    """(group, shape, layout, weight) rows: ResNet-50 layers, then the extra shapes."""
    for lay in layouts:
        for (c, hw), n in RESNET50:
            yield "resnet50", (batch, c, hw, hw), lay, n
    for group, shape in EXTRA:
        for lay in layouts if len(shape) == 4 else ["nchw"]:
            yield group, shape, lay, 1


def _train_step(args, batch: int, reps: int, threads: int) -> int:
    """Delegate to :mod:`batchnorm.cli.bench_train` with this command's shared options."""
    import argparse

    from . import bench_train

    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    train_args = parser.parse_args([])
    train_args.batch, train_args.steps, train_args.threads = batch, max(reps, 5), threads
    train_args.csv = args.csv
    status = 0
    for layout in ["nchw", "nhwc"] if args.layout == "both" else [args.layout]:
        train_args.channels_last = layout == "nhwc"
        status |= bench_train.run(train_args)
    return status


def run(args) -> int:
    """Run the suite described by ``args`` (see :func:`add_arguments`); 0 on success."""
    if args.gpu_plan:
        return gpu_plan.run(args)
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
        have_torch = True
    except ImportError:
        have_torch = False
    batch = args.batch or (8 if args.quick else 32)
    reps = args.reps or (5 if args.quick else 10)
    if args.train:
        return _train_step(args, batch, reps, threads)
    dtype = np.dtype(args.dtype).type
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    passes = list(PASSES) if args.passes == "all" else [args.passes]
    device, versions = _device(), _versions()
    providers = ["batchnorm-cpu"] + (["torch"] if have_torch else [])

    rows = []
    cache = _cache_per_thread(threads)
    cases = [c for c in _shapes(batch, layouts) if args.group in ("all", c[0])]
    with progress_bar("benchmarking", total=len(cases)) as advance:
        for group, shape, lay, weight in cases:
            case = _Case(shape, lay, dtype)
            t_copy = _copy_time(case, reps)
            for pass_ in passes:
                timed = {}
                for prov in providers:
                    for alloc in ("prealloc", "fresh"):
                        fn = (_bn_calls(case, pass_, alloc == "prealloc") if prov != "torch"
                              else _torch_calls(case, pass_, alloc == "prealloc"))
                        timed[prov, alloc] = _time(fn, reps, PAUSE_S)
                if args.reference or case.nbytes <= 1 << 20:
                    timed["reference", "fresh"] = _time(_ref_calls(case, pass_), min(reps, 5),
                                                        PAUSE_S)
                alg = _alg_factor(case, pass_, threads, cache)
                for (prov, alloc), ts in timed.items():
                    med = statistics.median(ts)
                    tt = timed.get(("torch", alloc))
                    rows.append(dict(
                        group=group, provider=prov, pass_=pass_, shape="x".join(map(str, shape)),
                        dtype=args.dtype, layout=lay, alloc=alloc, weight=weight,
                        threads=threads, median_ms=med * 1e3, min_ms=min(ts) * 1e3,
                        max_ms=max(ts) * 1e3, reps=len(ts), copy_ms=t_copy * 1e3,
                        f=(1.5 if pass_ == "bwd" else 1.0) * t_copy / med,
                        f_alg=alg * (1.5 if pass_ == "bwd" else 1.0) * t_copy / med,
                        speedup_vs_torch=statistics.median(tt) / med if tt else float("nan"),
                        device=device, versions=versions))
            advance(description=f"{group} {shape} {lay}")

    cold = None if args.no_cold_start else _cold_start(threads)
    _print(rows, cold, threads, batch, args, device, versions, cache)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def _print(rows, cold, threads, batch, args, device, versions, cache) -> None:
    console(f"batchnorm bench: {device}; {versions}; threads={threads}; "
                  f"batch={batch}; dtype={args.dtype}")
    console(f"each provider timed in its own block after a {PAUSE_S * 1e3:.0f} ms pause; "
                  f"calls under {BATCH_S * 1e3:.0f} ms timed in batches; alloc=prealloc: both "
                  "write into the same preallocated output, alloc=fresh: both allocate per call; "
                  f"f_alg assumes {cache >> 10} KiB of cache per thread")
    # network total: the 53 ResNet-50 layers, weighted by their counts
    tot = defaultdict(float)
    for r in rows:
        if r["group"] == "resnet50":
            key = (r["provider"], r["pass_"], r["layout"], r["alloc"])
            tot[key] += r["weight"] * r["median_ms"]
    total_rows = []
    for (prov, pass_, lay, alloc), ms in sorted(tot.items()):
        if prov != "batchnorm-cpu":
            continue
        mine = [r for r in rows if r["group"] == "resnet50" and r["provider"] == prov
                and r["pass_"] == pass_ and r["layout"] == lay and r["alloc"] == alloc]
        copy = sum(r["weight"] * r["copy_ms"] for r in mine)
        # the copy time scaled by each layer's algorithmic traffic factor
        copy_alg = sum(r["weight"] * r["copy_ms"] * r["f_alg"] / r["f"] for r in mine)
        k = 1.5 if pass_ == "bwd" else 1.0
        tms = tot.get(("torch", pass_, lay, alloc))
        total_rows.append([pass_, lay, alloc, f"{ms:.1f}", f"{k * copy / ms:.2f}",
                      f"{k * copy_alg / ms:.2f}",
                      f"{tms:.1f}" if tms else "-", f"{k * copy / tms:.2f}" if tms else "-",
                      f"{k * copy_alg / tms:.2f}" if tms else "-",
                      f"{tms / ms:.2f}x" if tms else "-", f"{copy:.1f}"])
    table(f"ResNet-50 network total (53 BN layers, batch {batch})",
          ["pass", "layout", "alloc", "batchnorm-cpu ms", "f", "f_alg", "torch ms", "torch f",
           "torch f_alg", "speedup", "copy ms"], total_rows)

    detail = []
    for r in rows:
        if r["group"] == "resnet50" and r["provider"] == "reference":
            continue
        detail.append([r["group"], r["shape"], r["layout"], r["pass_"], r["alloc"],
                       r["provider"], f"{r['median_ms']:.3f}",
                       f"{r['min_ms']:.3f}-{r['max_ms']:.3f}", f"{r['f']:.2f}",
                       f"{r['f_alg']:.2f}",
                       f"{r['speedup_vs_torch']:.2f}x"])
    table("per shape (median ms; f = fraction of the copy limit)",
          ["group", "shape", "layout", "pass", "alloc", "provider", "ms", "spread", "f",
           "f_alg", "vs torch"], detail)
    tiny = [r for r in rows if r["group"] == "tiny" and r["provider"] == "batchnorm-cpu"
            and r["pass_"] == "fwd" and r["alloc"] == "prealloc"]
    for r in tiny:
        console(f"tiny (8, 64, 8, 8) {r['layout']} forward per call: "
                f"{r['median_ms'] * 1e3:.1f} us (target <= 15 us)")
    if cold:
        console("cold start (import / first call, s): "
                f"compile cache empty {cold['cold_import_s']:.2f} / "
                f"{cold['cold_first_call_s']:.2f}; warm {cold['warm_import_s']:.2f} / "
                f"{cold['warm_first_call_s']:.2f}")
