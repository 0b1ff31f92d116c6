"""One command on a GPU: check every gpu kernel against the reference, then time them.

1. Check. On small shapes chosen so that each kernel runs (the persistent and the split
   algorithm of every pass, check_finite on and off, a NaN channel that must be flagged, a
   channel whose spread of 1e20 overflows float32 squares and must not be), in float16,
   bfloat16 and float32, NCHW and channels-last, the gpu backend's results are compared
   with the float64 reference, the fused forms of contract §8 too (BN + add + ReLU forward
   and backward with dz; BN + LeakyReLU written over x, backward from y); a mismatch, or a
   kernel no case reached, stops the run with exit status 1 before anything is timed. The
   fused forms are checked, not timed: the timing budget goes to the plain passes.
2. Time. ResNet-50's 53 BN layers (12 distinct shapes, weighted by how often each occurs) at
   batch 32 and 256, float16 / float32 / bfloat16, NCHW and channels-last: forward training
   (with the running-statistics update), backward (training) and inference, the gpu backend
   against ``torch.nn.functional.batch_norm`` (cuDNN or PyTorch's native kernels, at their
   defaults) and a device-to-device copy of x's bytes (``B_copy = 2 bytes(x) / t_copy``).
   ``triton.testing.do_bench``: CUDA events, L2 flushed before every repetition; medians.
   PyTorch's backward is ``torch.autograd.grad`` through its BN node on a prebuilt graph.
3. Report. ``f = minimum bytes / (t * B_copy)``: the minimum reads x once and writes y once
   (forward, inference), reads x and dy once and writes dx once (backward). Per layer rows
   go to a CSV, network totals to a markdown table; both name the device and versions.

Everything, compilation included, fits in ``--budget`` seconds (default 210, under four
minutes with start-up): groups are timed in order of priority (float16 and float32 before
bfloat16), each group's shapes in one go, and no new shape starts once the budget is spent;
the report then says what was not timed. Progress is printed as it goes.

Usage (a CUDA GPU): ``python benchmarks/gpu.py [--quick] [--csv F] [--markdown F]``.
With ``TRITON_INTERPRET=1`` on a machine without one it runs the check alone, on CPU tensors
through Triton's interpreter (tiny shapes), which is how the test suite exercises it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # run from a checkout: the package next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchnorm.cli import _measure as M  # noqa: E402
from batchnorm.cli._console import console  # noqa: E402
from batchnorm.cli.networks import resnet50_shapes  # noqa: E402

START = time.monotonic()  # the budget counts from here, before torch is even imported
EPS, MOMENTUM = 1e-5, 0.1
DTYPES = ("float16", "float32", "bfloat16")  # priority order: the targets' dtypes first
LAYOUTS = ("nchw", "nhwc")
BATCHES = (32, 256)
# Largest relative error (to the reference's largest magnitude) the check accepts for y and
# dx, by input dtype: a few units in the last place of the output dtype. Statistics are
# float32 for every input dtype; dgamma / dbeta are sums over the channel.
CHECK_TOLERANCE = {"float32": 1e-4, "float16": 8e-3, "bfloat16": 6e-2}
STAT_TOLERANCE = 1e-4
SUM_TOLERANCE = 1e-3
# Check shapes: one small enough for the persistent kernels, one only the split kernels take.
CHECK_SHAPES = ((4, 16, 8, 8), (32, 8, 64, 64))
# The fused forms checked: name -> (activation, negative slope, residual, memory-saving)
FUSED_CHECKS = {"add_relu": ("relu", 0.0, True, False),
                "leaky_relu_in_place": ("leaky_relu", 0.1, False, True)}
GPU_TARGET_F, GPU_TARGET_SPEEDUP = 0.85, 1.2


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 32 only")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--budget", type=float, default=210.0,
                    help="seconds for the whole run, compilation included (default 210)")
    ap.add_argument("--rep-ms", type=int, default=20, help="do_bench time per measurement")
    ap.add_argument("--csv", type=Path, default=Path("gpu_bench.csv"))
    ap.add_argument("--markdown", type=Path, default=Path("gpu_bench.md"))
    args = ap.parse_args(argv)
    args.batches = [32] if args.quick else [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.layouts = args.layouts.split(",")
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; valid choices are {', '.join(DTYPES)}")
    for lay in args.layouts:
        if lay not in LAYOUTS:
            ap.error(f"unknown layout {lay!r}; valid choices are {', '.join(LAYOUTS)}")
    if args.budget <= 0 or args.rep_ms <= 0:
        ap.error("--budget and --rep-ms must be positive")
    return args


class Budget:
    """Seconds left of the run's budget, counted from ``start`` on ``clock``."""

    def __init__(self, seconds: float, start: float | None = None, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.start = clock() if start is None else start

    def elapsed(self) -> float:
        return self.clock() - self.start

    def spent(self) -> bool:
        return self.elapsed() >= self.seconds


# ----------------------------------------------------------------------------- inputs


def make_x(shape, dtype, layout: str, device, seed=0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def make_params(c, device):
    import torch

    return (torch.linspace(0.5, 1.5, c, device=device), torch.linspace(-0.2, 0.2, c,
                                                                        device=device),
            torch.zeros(c, device=device), torch.ones(c, device=device))


# ----------------------------------------------------------------------------- check


@dataclass
class CheckResult:
    mismatches: list[str] = field(default_factory=list)
    reached: set = field(default_factory=set)  # (pass, algorithm) the check cases ran

    @property
    def missed(self) -> set:
        """(pass, algorithm) pairs no case reached (inference has the apply kernel only),
        the fused forms' forward and backward among the passes."""
        fused = [f"{p} {form}" for form in FUSED_CHECKS for p in ("forward", "backward")]
        want = {(p, a) for p in ("forward", "backward", "backward_inference", *fused)
                for a in ("persistent", "split")} | {("inference", "split")}
        return want - self.reached

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.missed


def _err(got, want) -> float:
    import numpy as np

    got = got.detach().double().cpu().numpy()
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    return float(np.abs(got - want).max()) / scale if want.size else 0.0


def check(device, shapes=CHECK_SHAPES, dtypes=DTYPES, layouts=LAYOUTS) -> CheckResult:
    """Every pass of the gpu backend against the float64 reference (see the module notes)."""
    import torch

    from batchnorm import reference as ref
    from batchnorm._shapes import resolve_layout
    from batchnorm.backends import gpu

    res = CheckResult()
    for shape in shapes:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            for lay in layouts:
                x = make_x(shape, dtype, lay, device, seed=1)
                dy = make_x(shape, dtype, lay, device, seed=2) - 0.5
                g, b, rm, rv = make_params(shape[1], device)
                layout = resolve_layout(tuple(shape))
                where = f"{tuple(shape)} {dname} {lay}"
                for pass_ in gpu.PASSES:
                    res.reached.add((pass_, gpu.launch_plan(pass_, x, layout, dy=dy)
                                     .algorithm))
                x64, dy64 = x.double().cpu().numpy(), dy.double().cpu().numpy()
                g64, b64 = g.double().cpu().numpy(), b.double().cpu().numpy()
                rm64, rv64 = rm.double().cpu().numpy(), rv.double().cpu().numpy()
                y_r, mean_r, inv_r, _ = ref.forward_training(
                    x64, g64, b64, layout, eps=EPS, momentum=MOMENTUM, running_mean=rm64,
                    running_var=rv64)
                tol = CHECK_TOLERANCE[dname]
                for check_finite in (False, True):
                    rm1, rv1 = rm.clone(), rv.clone()
                    y, mean, inv, bad = gpu.forward_training(
                        x, g, b, layout, eps=EPS, momentum=MOMENTUM, running_mean=rm1,
                        running_var=rv1, check_finite=check_finite)
                    got = [("y", y, y_r, tol), ("mean", mean, mean_r, STAT_TOLERANCE),
                           ("invstd", inv, inv_r, STAT_TOLERANCE),
                           ("running_mean", rm1, rm64, STAT_TOLERANCE),
                           ("running_var", rv1, rv64, STAT_TOLERANCE)]
                    for name, v, w, t in got:
                        if not _err(v, w) <= t:
                            res.mismatches.append(f"forward {name} {where} check_finite="
                                                  f"{check_finite}: max rel err "
                                                  f"{_err(v, w):.3g} > {t:g}")
                    if check_finite and bool(bad.any()):
                        res.mismatches.append(f"forward {where}: finite input flagged")
                y_i = gpu.forward_inference(x, g, b, rm, rv, layout, eps=EPS)
                w = ref.forward_inference(x64, g64, b64, rm.double().cpu().numpy(),
                                          rv.double().cpu().numpy(), layout, eps=EPS)
                if not _err(y_i, w) <= tol:
                    res.mismatches.append(f"inference y {where}: max rel err "
                                          f"{_err(y_i, w):.3g} > {tol:g}")
                for training in (True, False):
                    dx, dg, db = gpu.backward(dy, x, g, mean, inv, layout, training=training)
                    dx_r, dg_r, db_r = ref.backward(dy64, x64, g64, mean.double().cpu().numpy(),
                                                    inv.double().cpu().numpy(), layout,
                                                    training=training)
                    for name, v, w, t in (("dx", dx, dx_r, tol), ("dgamma", dg, dg_r,
                                                                  SUM_TOLERANCE),
                                          ("dbeta", db, db_r, SUM_TOLERANCE)):
                        if not _err(v, w) <= t:
                            res.mismatches.append(f"backward {name} {where} training="
                                                  f"{training}: max rel err {_err(v, w):.3g} "
                                                  f"> {t:g}")
                # a NaN in channel 1 must be flagged, and only there
                xn = x.clone()
                xn[:, 1] = float("nan")
                _, _, _, bad = gpu.forward_training(xn, g, b, layout, eps=EPS,
                                                    check_finite=True)
                if bad.cpu().tolist() != [c == 1 for c in range(shape[1])]:
                    res.mismatches.append(f"check_finite {where}: flagged {bad.cpu().tolist()}")
                _check_spread(res, x.float(), g, b, layout, where)
                _check_fused(res, x, dy, g, b, layout, where, tol)
    return res


def _check_spread(res: CheckResult, x, g, b, layout, where: str) -> None:
    """A channel with standard deviation 1e20 (float32 squares overflow, invstd 1e-20 does
    not): its invstd must be right and the channel not flagged."""
    from batchnorm import reference as ref
    from batchnorm.backends import gpu

    x = x.clone()
    x[:, 1] = x[:, 1] * 1e20
    _, _, inv, bad = gpu.forward_training(x, g, b, layout, eps=EPS, check_finite=True)
    inv_r = ref.forward_training(x.double().cpu().numpy(), None, None, layout, eps=EPS)[2]
    err = float(abs(inv[1].item() / inv_r[1] - 1.0))
    if bool(bad.any()) or not err <= STAT_TOLERANCE:
        res.mismatches.append(f"spread 1e20 {where}: invstd rel err {err:.3g}, flagged "
                              f"{bad.cpu().tolist()}")


def _check_fused(res: CheckResult, x, dy, g, b, layout, where: str, tol: float) -> None:
    """The fused forms of :data:`FUSED_CHECKS`, forward and backward, against the reference."""
    from batchnorm import reference as ref
    from batchnorm._shapes import Epilogue
    from batchnorm.backends import gpu

    def host(t):
        return None if t is None else t.double().cpu().numpy()

    for form, (activation, slope, with_z, inplace) in FUSED_CHECKS.items():
        epi = Epilogue(activation, slope)
        z = dy * 2 if with_z else None  # dy's layout
        xin = x.clone() if inplace else x
        for pass_ in ("forward", "backward"):
            res.reached.add((f"{pass_} {form}", gpu.launch_plan(
                pass_, None if inplace and pass_ == "backward" else xin, layout, dy=dy,
                y=xin, residual=z if pass_ == "forward" else None, epilogue=epi,
                out=xin if inplace and pass_ == "forward" else None,
                want_dz=with_z).algorithm))
        y, mean, inv, _ = gpu.forward_training(xin, g, b, layout, eps=EPS, residual=z,
                                               epilogue=epi, out=xin if inplace else None)
        y_r, *_ = ref.forward_training(host(x), host(g), host(b), layout, eps=EPS,
                                       residual=host(z), epilogue=epi)
        got = [("y", y, y_r, tol)]
        grads = gpu.backward(dy, None if inplace else x, g, mean, inv, layout, y=y, beta=b,
                             epilogue=epi, residual=with_z)
        want = ref.backward(host(dy), None if inplace else host(x), host(g), host(mean),
                            host(inv), layout, y=host(y), beta=host(b), epilogue=epi,
                            residual=with_z)
        names = ("dx", "dgamma", "dbeta", "dz")
        tols = (tol, SUM_TOLERANCE, SUM_TOLERANCE, tol)
        got += [(n, v, w, t) for n, v, w, t in zip(names, grads, want, tols, strict=False)]
        for name, v, w, t in got:
            if not _err(v, w) <= t:
                res.mismatches.append(f"{form} {name} {where}: max rel err {_err(v, w):.3g} "
                                      f"> {t:g}")



# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Group:
    """The shapes timed together: one network at one batch, dtype and layout."""

    dtype: str
    batch: int
    layout: str


def groups(batches, dtypes, layouts) -> list[Group]:
    """In priority order: dtype first (the targets' float16 / float32 before bfloat16)."""
    return [Group(d, b, lay) for d in dtypes for b in batches for lay in layouts]


def run_groups(todo: list[Group], time_group, budget: Budget, progress=console):
    """Time each group in turn until the budget is spent; ``time_group(group, budget)``
    returns the group's rows, or None when it stopped part-way (budget spent). Returns
    (rows, groups not completed)."""
    rows, skipped = [], []
    for grp in todo:
        if budget.spent():
            skipped.append(grp)
            continue
        got = time_group(grp, budget)
        if got is None:
            skipped.append(grp)
            continue
        rows += got
        progress(f"[{budget.elapsed():5.0f} s] {grp.dtype} batch {grp.batch} {grp.layout}: "
                 + ", ".join(f"{p} {t:.2f}x torch" for p, t in
                             network_speedups(got).items()))
    return rows, skipped


def _calls(x, dy, layout):
    """pass -> (ours, torch's) zero-argument callables on one layer's tensors."""
    import torch
    import torch.nn.functional as F

    from batchnorm.backends import gpu

    g, b, rm, rv = make_params(x.shape[1], x.device)
    _, mean, inv, _ = gpu.forward_training(x, g, b, layout, eps=EPS)
    # PyTorch's backward: its BN node alone, on a graph built once
    xr, gr, br = (t.detach().requires_grad_() for t in (x, g, b))
    y_t = F.batch_norm(xr, rm.clone(), rv.clone(), gr, br, training=True, momentum=MOMENTUM,
                       eps=EPS)
    return {
        "forward": (lambda: gpu.forward_training(x, g, b, layout, eps=EPS, momentum=MOMENTUM,
                                                 running_mean=rm, running_var=rv),
                    lambda: F.batch_norm(x, rm, rv, g, b, training=True, momentum=MOMENTUM,
                                         eps=EPS)),
        "backward": (lambda: gpu.backward(dy, x, g, mean, inv, layout),
                     lambda: torch.autograd.grad(y_t, (xr, gr, br), dy, retain_graph=True)),
        "inference": (lambda: gpu.forward_inference(x, g, b, rm, rv, layout, eps=EPS),
                      lambda: F.batch_norm(x, rm, rv, g, b, training=False, eps=EPS)),
    }


def time_group(grp: Group, budget: Budget, rep_ms: int) -> list[dict] | None:
    """Rows for every layer and pass of one group; None if the budget ran out first."""
    import torch
    import triton.testing

    from batchnorm._shapes import resolve_layout
    from batchnorm.backends import gpu

    def bench(fn):
        med, lo, hi = triton.testing.do_bench(fn, warmup=5, rep=rep_ms,
                                              quantiles=[0.5, 0.1, 0.9])
        return med * 1e3, lo * 1e3, hi * 1e3  # microseconds

    dtype = getattr(torch, grp.dtype)
    rows = []
    for shape, count in resnet50_shapes(grp.batch):
        if budget.spent():
            return None
        x = make_x(shape, dtype, grp.layout, "cuda")
        dy = make_x(shape, dtype, grp.layout, "cuda", seed=3)
        layout = resolve_layout(shape)
        dst = torch.empty_like(x)
        t_copy = bench(lambda: dst.copy_(x))  # noqa: B023 (called before the next iteration)
        for pass_, (ours, theirs) in _calls(x, dy, layout).items():
            plan = gpu.launch_plan(pass_, x, layout, dy=dy)
            k = 1.5 if pass_ == "backward" else 1.0  # minimum bytes in copies of x
            for provider, t in (("ours", bench(ours)), ("torch", bench(theirs)),
                                ("copy", t_copy)):
                rows.append(dict(
                    dtype=grp.dtype, batch=grp.batch, layout=grp.layout, channels=shape[1],
                    hw=shape[2], count=count, pass_=pass_, provider=provider,
                    median_us=t[0], p10_us=t[1], p90_us=t[2], copy_us=t_copy[0],
                    f=k * t_copy[0] / t[0], bytes=x.numel() * x.element_size(),
                    algorithm=plan.algorithm if provider == "ours" else "",
                    plan_traffic=round(plan.traffic_ratio, 4) if provider == "ours" else ""))
    return rows


# ----------------------------------------------------------------------------- report


def network_totals(rows) -> dict[tuple, dict]:
    """(dtype, batch, layout, pass) -> {provider: weighted microseconds}, plus the copy
    time scaled to the pass's minimum bytes under "copy_min"."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["dtype"], r["batch"], r["layout"], r["pass_"])
        t = out.setdefault(key, {})
        t[r["provider"]] = t.get(r["provider"], 0.0) + r["count"] * r["median_us"]
        if r["provider"] == "copy":
            k = 1.5 if r["pass_"] == "backward" else 1.0
            t["copy_min"] = t.get("copy_min", 0.0) + r["count"] * k * r["median_us"]
    return out


def network_speedups(rows) -> dict[str, float]:
    """pass -> torch's network time over ours, for the rows of one group."""
    return {key[3]: t["torch"] / t["ours"] for key, t in network_totals(rows).items()
            if t.get("ours") and t.get("torch")}


def markdown_table(rows, header: str) -> str:
    """Network totals as a markdown table, with the targets' verdict per row."""
    lines = [header, "",
             "| dtype | batch | layout | pass | ours ms | torch ms | copy-equivalent ms | "
             "f ours | f torch | speed-up |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for (dname, batch, lay, pass_), t in network_totals(rows).items():
        if not (t.get("ours") and t.get("torch") and t.get("copy_min")):
            continue
        lines.append(
            f"| {dname} | {batch} | {lay} | {pass_} | {t['ours'] / 1e3:.3f} | "
            f"{t['torch'] / 1e3:.3f} | {t['copy_min'] / 1e3:.3f} | "
            f"{t['copy_min'] / t['ours']:.2f} | {t['copy_min'] / t['torch']:.2f} | "
            f"{t['torch'] / t['ours']:.2f}x |")
    return "\n".join(lines) + "\n"


def target_misses(rows) -> list[str]:
    """GPU targets: f >= 0.85 and >= 1.2x torch's network total, float16 and float32."""
    misses = []
    for (dname, batch, lay, pass_), t in network_totals(rows).items():
        if dname not in ("float16", "float32") or not (t.get("ours") and t.get("torch")):
            continue
        f, speedup = t["copy_min"] / t["ours"], t["torch"] / t["ours"]
        if f < GPU_TARGET_F or speedup < GPU_TARGET_SPEEDUP:
            misses.append(f"{dname} batch {batch} {lay} {pass_}: f {f:.2f} (target >= "
                          f"{GPU_TARGET_F}), {speedup:.2f}x torch (target >= "
                          f"{GPU_TARGET_SPEEDUP}x)")
    return misses


def write_csv(rows, path: Path, extra: dict) -> None:
    """``rows``, each with the columns of ``extra`` added, as CSV."""
    M.write_csv(str(path), [{**r, **extra} for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget, start=START)
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        console("TRITON_INTERPRET=1: the check alone, on CPU tensors through the interpreter")
        res = check("cpu", shapes=((2, 4, 3, 3),), dtypes=("float32",))
        for m in res.mismatches:
            console("MISMATCH " + m)
        return 0 if not res.mismatches else 1
    if not torch.cuda.is_available():
        console("benchmarks/gpu.py needs a CUDA GPU; none is available here")
        return 2
    import triton

    device = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = (f"torch {torch.__version__}, triton {triton.__version__}, cuDNN "
                f"{torch.backends.cudnn.version()}")
    console(f"batchnorm gpu benchmark on {device} ({stamp}; {versions}); budget "
            f"{args.budget:.0f} s")
    res = check("cuda", dtypes=args.dtypes, layouts=args.layouts)
    for m in res.mismatches:
        console("MISMATCH " + m)
    for p, a in sorted(res.missed):
        console(f"NOT REACHED: no check case ran the {a} kernels of {p}")
    if not res.ok:
        return 1
    console(f"[{budget.elapsed():5.0f} s] check passed: every kernel agrees with the float64 "
            "reference")
    todo = groups(args.batches, args.dtypes, args.layouts)
    rows, skipped = run_groups(todo, lambda g, b: time_group(g, b, args.rep_ms), budget)
    header = (f"ResNet-50 BN layers (53, network totals), {device}, {stamp}; {versions}. "
              "do_bench medians, L2 flushed before each repetition; f = minimum bytes / "
              "(time x device-to-device copy bandwidth measured in the same run).")
    if rows:
        write_csv(rows, args.csv, {"device": device, "date": stamp, "versions": versions})
        table_md = markdown_table(rows, header)
        args.markdown.write_text(table_md)
        console(table_md)
        console(f"wrote {len(rows)} rows to {args.csv} and the table to {args.markdown}")
        misses = target_misses(rows)
        console("GPU targets (f >= 0.85 of the copy, >= 1.2x torch, network totals): " +
                ("all met" if not misses else f"{len(misses)} not met"))
        for m in misses:
            console("  " + m)
    if skipped:
        console(f"budget of {args.budget:.0f} s spent: not timed: " +
                "; ".join(f"{g.dtype} batch {g.batch} {g.layout}" for g in skipped))
    console(f"[{budget.elapsed():5.0f} s] done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
