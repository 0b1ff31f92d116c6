"""``batchnorm bench --kernels``: the kernels through the NumPy API, against ATen's.

Providers x passes x shapes -> a table and CSV rows. Batch norm is memory-bound, so each time
is also given as a fraction of the machine's limit, measured in the same run: ``t_copy`` is the
best time of a threaded copy of an array of x's size (same thread count as the kernels), and

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

The copy and every (provider, alloc) are measured in interleaved rounds (see ``_measure``),
each measurement after a short pause: the process holds two OpenMP runtimes (PyTorch's and
Numba's), and threads of one still spinning after its last call would steal the cores from
the other's first calls. Calls shorter than a few milliseconds are timed in batches and
reported per call. Invalid figures (``_measure.judge``) are reported as such, not as results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

import numpy as np

from .._cache import cache_level
from . import _measure as M
from ._console import console, progress_bar, table
from .networks import EXTRA, RESNET50

PASSES = ("fwd", "inf", "bwd")
PAUSE_S = 0.01  # idle time before each measurement (the other runtime's spinning threads)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The options only this mode reads."""
    group.add_argument("--group", default="all",
                       choices=["all", "resnet50", "bn1d", "few-channel", "tiny"],
                       help="only this group of shapes")
    group.add_argument("--reference", action="store_true",
                       help="also time the float64 reference on every shape (slow)")
    group.add_argument("--no-cold-start", action="store_true",
                       help="skip the cold-start measurement (two subprocesses)")


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


def _copy_call(case: _Case):
    """A threaded copy of x into a buffer of its size (the bandwidth limit)."""
    try:
        import torch

        src, dst = torch.from_numpy(case.x), torch.from_numpy(case.out)
        return lambda: dst.copy_(src)
    except ImportError:
        import numba

        @numba.njit(parallel=True, cache=True)
        def parallel_copy(src, dst):
            for i in numba.prange(src.size):
                dst[i] = src[i]

        src, dst = case.x.reshape(-1), case.out.reshape(-1)
        return lambda: parallel_copy(src, dst)


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


def run(args) -> int:
    """Run the suite described by ``args``; 0 on success."""
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    threads = args.threads
    batch = args.batch or (8 if args.quick else 32)
    min_rounds = args.reps or (5 if args.quick else 10)
    budget = args.budget if args.budget is not None else (30.0 if args.quick else 120.0)
    if args.dtype == "bfloat16":
        console("--dtype bfloat16: NumPy has no bfloat16; the layers mode times it")
        return 2
    dtype = np.dtype(args.dtype).type
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    passes = list(PASSES) if args.passes == "all" else [args.passes]
    if not set(passes) <= set(PASSES):
        console(f"--pass {args.passes}: the kernels mode times {', '.join(PASSES)} or all")
        return 2
    providers = ["batchnorm-cpu"] + (["torch"] if have_torch else [])
    resolution = M.timer_resolution()

    rows = []
    cache = _cache_per_thread(threads)
    cases = [c for c in _shapes(batch, layouts) if args.group in ("all", c[0])
             and (args.only is None or args.only in "x".join(map(str, c[1])))]
    if not cases:
        console("no shape matches the filters")
        return 2
    shares = M.Budget(budget, len(cases) * len(passes))
    with progress_bar("kernels", total=len(cases) * len(passes)) as advance:
        for group, shape, lay, weight in cases:
            case = _Case(shape, lay, dtype)
            for pass_ in passes:
                advance(description=f"{group} {shape} {lay} {pass_}")
                rows += _measure_case(case, group, pass_, weight, providers, args, threads,
                                      cache, min_rounds, shares.share(), resolution)

    cold = None if args.no_cold_start else _cold_start(threads)
    _print(rows, cold, threads, batch, args, cache)
    if args.csv:
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def _measure_case(case, group, pass_, weight, providers, args, threads, cache, min_rounds,
                  budget, resolution) -> list[dict]:
    """Rows of every (provider, alloc) for one (shape, layout, pass), measured interleaved."""
    calls = {"copy": _copy_call(case)}
    for prov in providers:
        for alloc in ("prealloc", "fresh"):
            calls[prov, alloc] = (_bn_calls(case, pass_, alloc == "prealloc") if prov != "torch"
                                  else _torch_calls(case, pass_, alloc == "prealloc"))
    if args.reference or case.nbytes <= 1 << 20:
        calls["reference", "fresh"] = _ref_calls(case, pass_)
    steps, per_measure = {}, {}
    for key, fn in calls.items():
        steps[key], per_measure[key] = M.batched(M.timed(fn))
    pairs = [(("torch", a), ("batchnorm-cpu", a)) for a in ("prealloc", "fresh")
             if ("torch", a) in steps]
    times = M.interleave(steps, min_rounds=min_rounds, max_rounds=4 * min_rounds,
                         budget_s=budget, pairs=pairs, pause_s=PAUSE_S,
                         watch=[k for k in steps if k != "copy" and k[0] != "reference"])
    t_copy = min(times.pop("copy"))
    k = 1.5 if pass_ == "bwd" else 1.0
    alg = _alg_factor(case, pass_, threads, cache)
    own = {}  # each figure's own verdict: its times, and f for the fast providers
    for key, ts in times.items():
        s = M.summarize(ts)
        own[key] = M.judge(s, interval=s.min * per_measure[key], resolution=resolution,
                           f=k * t_copy / s.median if key[0] != "reference" else None)
    rows = []
    for (prov, alloc), ts in times.items():
        s = M.summarize(ts)
        f = k * t_copy / s.median
        theirs = times.get(("torch", alloc))
        rs = M.summarize(M.ratios(theirs, ts)) if theirs and prov != "torch" else None
        verdict = own[prov, alloc]
        if prov == "batchnorm-cpu" and rs:  # its speed-up needs both times and the ratios
            verdict = M.combine([verdict, own["torch", alloc], M.judge_ratios(rs)])
        rows.append(dict(
            group=group, provider=prov, pass_=pass_, shape="x".join(map(str, case.shape)),
            dtype=args.dtype, layout=case.layout, alloc=alloc, weight=weight, threads=threads,
            median_ms=s.median * 1e3, min_ms=s.min * 1e3, max_ms=s.max * 1e3,
            spread=s.spread, reps=s.n, copy_ms=t_copy * 1e3, f=f, f_alg=alg * f,
            speedup_vs_torch=rs.median if rs else float("nan"),
            **M.as_fields(verdict),
            device=M.device(), versions=M.versions()))
    return rows


def _print(rows, cold, threads, batch, args, cache) -> None:
    console(f"batchnorm bench --kernels: {M.device()}; {M.versions()}; threads={threads}; "
            f"batch={batch}; dtype={args.dtype}")
    console(f"copy and providers measured in interleaved rounds, each after a "
            f"{PAUSE_S * 1e3:.0f} ms pause; calls under {M.MIN_MEASURE_S * 1e3:.0f} ms timed in "
            "batches; alloc=prealloc: both write into the same preallocated output, "
            "alloc=fresh: both allocate per call; speed-up = median over rounds of t_torch / t; "
            f"f_alg assumes {cache >> 10} KiB of cache per thread")
    # network total: the 53 ResNet-50 layers, weighted by their counts
    net = defaultdict(list)
    for r in rows:
        if r["group"] == "resnet50":
            net[r["provider"], r["pass_"], r["layout"], r["alloc"]].append(r)
    total_rows = []
    for (prov, pass_, lay, alloc), mine in sorted(net.items()):
        if prov != "batchnorm-cpu":
            continue
        ms = sum(r["weight"] * r["median_ms"] for r in mine)
        copy = sum(r["weight"] * r["copy_ms"] for r in mine)
        # the copy time scaled by each layer's algorithmic traffic factor
        copy_alg = sum(r["weight"] * r["copy_ms"] * r["f_alg"] / r["f"] for r in mine)
        k = 1.5 if pass_ == "bwd" else 1.0
        theirs = net.get(("torch", pass_, lay, alloc), [])
        tms = sum(r["weight"] * r["median_ms"] for r in theirs)
        status = M.total_verdict([M.from_fields(r) for r in mine])  # each with torch's time
        if not status.valid:  # a sum with an invalid part is no result
            total_rows.append([pass_, lay, alloc, *["-"] * 7, f"{copy:.1f}", str(status)])
            continue
        total_rows.append([pass_, lay, alloc, f"{ms:.1f}", f"{k * copy / ms:.2f}",
                           f"{k * copy_alg / ms:.2f}",
                           f"{tms:.1f}" if tms else "-", f"{k * copy / tms:.2f}" if tms else "-",
                           f"{k * copy_alg / tms:.2f}" if tms else "-",
                           f"{tms / ms:.2f}x" if tms else "-", f"{copy:.1f}", str(status)])
    if total_rows:
        table(f"ResNet-50 network total (BN layers weighted by count, batch {batch})",
              ["pass", "layout", "alloc", "batchnorm-cpu ms", "f", "f_alg", "torch ms",
               "torch f", "torch f_alg", "speed-up", "copy ms", "status"], total_rows)

    detail = []
    for r in rows:
        if r["group"] == "resnet50" and r["provider"] == "reference":
            continue
        bad = r["status"] == "invalid"
        detail.append([r["group"], r["shape"], r["layout"], r["pass_"], r["alloc"],
                       r["provider"], "-" if bad else f"{r['median_ms']:.3f}",
                       f"{r['min_ms']:.3f}-{r['max_ms']:.3f}", f"{r['spread']:.0%}",
                       "-" if bad else f"{r['f']:.2f}", "-" if bad else f"{r['f_alg']:.2f}",
                       "-" if bad or r["provider"] != "batchnorm-cpu" else
                       f"{r['speedup_vs_torch']:.2f}x", M.from_fields(r).brief()])
    table("per shape (median ms; f = fraction of the copy limit)",
          ["group", "shape", "layout", "pass", "alloc", "provider", "ms", "range", "spread",
           "f", "f_alg", "vs torch", "status"], detail)
    tiny = [r for r in rows if r["group"] == "tiny" and r["provider"] == "batchnorm-cpu"
            and r["pass_"] == "fwd" and r["alloc"] == "prealloc" and r["status"] != "invalid"]
    for r in tiny:
        console(f"tiny (8, 64, 8, 8) {r['layout']} forward per call: "
                f"{r['median_ms'] * 1e3:.1f} us (target <= 15 us)")
    if cold:
        console("cold start (import / first call, s): "
                f"compile cache empty {cold['cold_import_s']:.2f} / "
                f"{cold['cold_first_call_s']:.2f}; warm {cold['warm_import_s']:.2f} / "
                f"{cold['warm_first_call_s']:.2f}")

