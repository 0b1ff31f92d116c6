"""GPU benchmark: the Triton backend vs PyTorch (cuDNN / native at defaults) vs torch.compile.

Shapes are the 53 BN layers of ResNet-50 (12 distinct shapes, weighted by count in the
network total) at batch 32 and 256, float16 / bfloat16 / float32, NCHW and NHWC (a
channels_last NCHW tensor, which is how PyTorch holds NHWC). Passes: forward training
(with the running-statistics update) and backward (training).

Before anything is timed, every provider's results are checked against the float64
reference on small shapes (both of our algorithms, every dtype and layout); a mismatch
stops the script with exit status 1.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repetition);
median and 10 / 90 % quantiles. PyTorch's backward is timed as ``torch.autograd.grad`` on
a prebuilt graph (the BN backward node alone, as autograd runs it). torch.compile compiles
the forward ``F.batch_norm`` call and the backward formula of contract §1.
Every provider allocates its outputs fresh on each call (the caching allocator makes that
cheap on both sides).

f: ``B_copy`` is the bandwidth of a device-to-device copy of a tensor of x's size, measured
in the same run; ``f_fwd = 2 bytes(x) / (t B_copy)``, ``f_bwd = 3 bytes(x) / (t B_copy)``;
``f_alg`` counts the traffic of the algorithm actually used (the split path reads x, and in
backward x and dy, twice).

Usage: ``python benchmarks/gpu.py [--quick] [--csv FILE]`` on a machine with a CUDA GPU.
``--quick`` runs batch 32 only. The script stops timing new shapes after ``--budget``
seconds (default 270) so the whole run stays under five minutes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchnorm import reference as ref  # noqa: E402
from batchnorm._shapes import resolve_layout  # noqa: E402
from batchnorm.backends import gpu  # noqa: E402

# (channels, height = width) -> number of such BN layers in ResNet-50 (53 in all)
RESNET50 = [(64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7), (512, 28, 5),
            (256, 28, 1), (256, 14, 11), (1024, 14, 7), (512, 14, 1), (512, 7, 5), (2048, 7, 4)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("NCHW", "NHWC")
EPS, MOMENTUM = 1e-5, 0.1
# TRITON_INTERPRET=1 runs only the correctness check, on CPU (a smoke test of this script)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def make_x(n, c, hw, dtype, layout, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn((n, c, hw, hw), device=DEVICE, generator=gen) * 2 + 0.5
    x = x.to(dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def params(c):
    g = torch.linspace(0.5, 1.5, c, device=DEVICE)
    b = torch.linspace(-0.2, 0.2, c, device=DEVICE)
    return g, b, torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)


# ----------------------------------------------------------------------------- providers


def ours_fwd(x, g, b, rm, rv, lay):
    return gpu.forward_training(x, g, b, lay, eps=EPS, momentum=MOMENTUM, running_mean=rm,
                                running_var=rv)


def ours_bwd(dy, x, g, mean, invstd, lay):
    return gpu.backward(dy, x, g, mean, invstd, lay, training=True)


def torch_fwd(x, g, b, rm, rv):
    return F.batch_norm(x, rm, rv, g, b, training=True, momentum=MOMENTUM, eps=EPS)


def _bwd_formula(dy, x, g, mean, invstd):
    # contract §1, written in torch ops for torch.compile to fuse
    dims = (0, 2, 3)
    m = x.numel() // x.shape[1]
    mean, invstd, g = (t.view(1, -1, 1, 1) for t in (mean, invstd, g))
    xf, dyf = x.float(), dy.float()
    xhat = (xf - mean) * invstd
    dbeta = dyf.sum(dims, keepdim=True)
    dgamma = (dyf * xhat).sum(dims, keepdim=True)
    dx = g * invstd * (dyf - (dbeta + xhat * dgamma) / m)
    return dx.to(x.dtype), dgamma.flatten(), dbeta.flatten()


compiled_fwd = torch.compile(torch_fwd, dynamic=True)
compiled_bwd = torch.compile(_bwd_formula, dynamic=True)


def torch_bwd_closure(x, g, b, rm, rv, dy):
    """A callable that runs PyTorch's own BN backward node on a graph built once."""
    xr, gr, br = x.detach().requires_grad_(), g.detach().requires_grad_(), \
        b.detach().requires_grad_()
    y = F.batch_norm(xr, rm.clone(), rv.clone(), gr, br, training=True, momentum=MOMENTUM,
                     eps=EPS)
    return lambda: torch.autograd.grad(y, (xr, gr, br), dy, retain_graph=True)


# ----------------------------------------------------------------------------- checks


def check(verbose=True) -> bool:
    """Every provider against the float64 reference on small shapes; True when all agree."""
    ok = True
    # (2, 8, 6, 6): persistent path; (8, 4, 48, 48): split path (M = 18432)
    for n, c, hw in [(2, 8, 6), (8, 4, 48)]:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                x = make_x(n, c, hw, dtype, layout, seed=1)
                dy = make_x(n, c, hw, dtype, layout, seed=2) - 0.5
                g, b, rm, rv = params(c)
                lay = resolve_layout(tuple(x.shape))
                x64, dy64 = x.double().cpu().numpy(), dy.double().cpu().numpy()
                rm_r, rv_r = rm.cpu().numpy().astype(np.float64), rv.cpu().numpy().astype(
                    np.float64)
                y_r, mean_r, inv_r, _ = ref.forward_training(
                    x64, g.cpu().numpy(), b.cpu().numpy(), lay, eps=EPS, momentum=MOMENTUM,
                    running_mean=rm_r, running_var=rv_r)
                dx_r, dg_r, db_r = ref.backward(dy64, x64, g.cpu().numpy(), mean_r, inv_r, lay)
                tol = TOL[dtype]
                got = {}
                rm1, rv1 = rm.clone(), rv.clone()
                y, mean, inv, _ = ours_fwd(x, g, b, rm1, rv1, lay)
                got["ours"] = (y, mean, inv, rm1, rv1, *ours_bwd(dy, x, g, mean, inv, lay))
                rm2, rv2 = rm.clone(), rv.clone()
                y2 = torch_fwd(x, g, b, rm2, rv2)
                dx2, dg2, db2 = torch_bwd_closure(x, g, b, rm, rv, dy)()
                got["torch"] = (y2, None, None, rm2, rv2, dx2, dg2, db2)
                rm3, rv3 = rm.clone(), rv.clone()
                cf, cb = (torch_fwd, _bwd_formula) if INTERPRET else (compiled_fwd, compiled_bwd)
                y3 = cf(x, g, b, rm3, rv3)
                got["compile"] = (y3, None, None, rm3, rv3,
                                  *cb(dy, x, g, torch.from_numpy(mean_r).to(DEVICE).float(),
                                                torch.from_numpy(inv_r).to(DEVICE).float()))
                want = (y_r, mean_r, inv_r, rm_r, rv_r, dx_r, dg_r, db_r)
                names = ("y", "mean", "invstd", "running_mean", "running_var", "dx", "dgamma",
                         "dbeta")
                for prov, vals in got.items():
                    for name, v, w in zip(names, vals, want, strict=True):
                        if v is None:
                            continue
                        v = v.detach().double().cpu().numpy()
                        scale = max(1.0, float(np.abs(w).max()))
                        err = float(np.abs(v - w).max()) / scale
                        # statistics are float32 for every dtype; dgamma/dbeta are sums
                        t = 1e-4 if name in names[1:5] else tol
                        t = t * 10 if name in ("dgamma", "dbeta") else t
                        if not err <= t:
                            ok = False
                            print(f"MISMATCH {prov} {name} shape={tuple(x.shape)} {dname} "
                                  f"{layout}: max rel err {err:.3g} > {t:.1g}")
    if verbose:
        print("correctness check vs the float64 reference:", "passed" if ok else "FAILED")
    return ok


# ----------------------------------------------------------------------------- timing


def bench(fn, rep_ms):
    med, lo, hi = triton.testing.do_bench(fn, warmup=5, rep=rep_ms, quantiles=[0.5, 0.1, 0.9])
    return med * 1e-3, lo * 1e-3, hi * 1e-3


_copy_cache: dict[int, float] = {}


def copy_time(nbytes, rep_ms):
    """Median time of a device-to-device copy of nbytes (read nbytes, write nbytes)."""
    if nbytes not in _copy_cache:
        src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        _copy_cache[nbytes] = bench(lambda: dst.copy_(src), rep_ms)[0]
    return _copy_cache[nbytes]


def persistent(x, lay, limit=None):
    dims, _ = gpu._geometry([gpu._input3(x, lay)], lay.dims3)
    return gpu._persistent_blocks(dims, limit) is not None


def time_shape(batch, c, hw, count, dname, layout, rep_ms):
    """CSV rows for one shape: each provider, forward training and backward."""
    dtype = DTYPES[dname]
    x = make_x(batch, c, hw, dtype, layout)
    dy = make_x(batch, c, hw, dtype, layout, seed=3)
    g, b, rm, rv = params(c)
    lay = resolve_layout(tuple(x.shape))
    nbytes = x.numel() * x.element_size()
    b_copy = 2 * nbytes / copy_time(nbytes, rep_ms)
    _, mean, inv, _ = ours_fwd(x, g, b, rm.clone(), rv.clone(), lay)
    fwd_p = persistent(x, lay)
    bwd_p = persistent(x, lay, gpu.PERSISTENT_MAX_ELEMS // 2)
    # pass -> (providers, bytes moved in units of bytes(x): minimum, our algorithm's)
    cases = {
        "fwd": ({"ours": lambda: ours_fwd(x, g, b, rm, rv, lay),
                 "torch": lambda: torch_fwd(x, g, b, rm, rv),
                 "compile": lambda: compiled_fwd(x, g, b, rm, rv)},
                2, 2 if fwd_p else 3, fwd_p),
        "bwd": ({"ours": lambda: ours_bwd(dy, x, g, mean, inv, lay),
                 "torch": torch_bwd_closure(x, g, b, rm, rv, dy),
                 "compile": lambda: compiled_bwd(dy, x, g, mean, inv)},
                3, 3 if bwd_p else 5, bwd_p),
    }
    rows = []
    for pas, (provs, traffic, traffic_alg, is_persistent) in cases.items():
        times = {p: bench(fn, rep_ms) for p, fn in provs.items()}
        for p, (med, lo, hi) in times.items():
            ours = p == "ours"
            rows.append(dict(
                provider=p, pass_=pas, batch=batch, channels=c, hw=hw, count=count,
                dtype=dname, layout=layout, median_us=med * 1e6, p10_us=lo * 1e6,
                p90_us=hi * 1e6, f=traffic * nbytes / (med * b_copy),
                f_alg=(traffic_alg if ours else traffic) * nbytes / (med * b_copy),
                ratio_vs_torch=times["torch"][0] / med, copy_gbps=b_copy / 1e9,
                algorithm=("persistent" if is_persistent else "split") if ours else "",
            ))
    return rows


def run(batches, dtypes, layouts, budget_s, rep_ms):
    """All shapes, stopping (and counting what was skipped) once budget_s has passed."""
    rows, skipped = [], 0
    t_start = time.time()
    for batch in batches:
        for dname in dtypes:
            for layout in layouts:
                for c, hw, count in RESNET50:
                    if time.time() - t_start > budget_s:
                        skipped += 1
                        continue
                    rows += time_shape(batch, c, hw, count, dname, layout, rep_ms)
    return rows, skipped


def report(rows, skipped, header):
    print(header)
    key = lambda r: (r["pass_"], r["batch"], r["dtype"], r["layout"])  # noqa: E731
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for (pas, batch, dname, layout), rs in groups.items():
        print(f"\n== {pas}  batch {batch}  {dname}  {layout} ==")
        print(f"{'C':>5} {'HxW':>7} {'n':>3} {'ours us':>9} {'torch us':>9} {'compile us':>10} "
              f"{'torch/ours':>10} {'f':>5} {'f_alg':>5} {'algorithm':>10} {'copy GB/s':>9}")
        by_shape = {}
        for r in rs:
            by_shape.setdefault((r["channels"], r["hw"], r["count"]), {})[r["provider"]] = r
        totals = {"ours": 0.0, "torch": 0.0, "compile": 0.0}
        fs = []
        for (c, hw, count), p in by_shape.items():
            o = p["ours"]
            print(f"{c:>5} {hw:>3}x{hw:<3} {count:>3} {o['median_us']:>9.1f} "
                  f"{p['torch']['median_us']:>9.1f} {p['compile']['median_us']:>10.1f} "
                  f"{o['ratio_vs_torch']:>10.2f} {o['f']:>5.2f} {o['f_alg']:>5.2f} "
                  f"{o['algorithm']:>10} {o['copy_gbps']:>9.0f}")
            for name in totals:
                totals[name] += count * p[name]["median_us"]
            fs.append(o["f"])
        print(f"network total (53 layers, us): ours {totals['ours']:.0f}  torch "
              f"{totals['torch']:.0f}  compile {totals['compile']:.0f}  "
              f"torch/ours {totals['torch'] / totals['ours']:.2f}  median f "
              f"{statistics.median(fs):.2f}")
    if skipped:
        print(f"\n{skipped} shape configurations were not timed (time budget reached)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 32 only")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--layouts", default="NCHW,NHWC")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds of timing at most")
    ap.add_argument("--rep-ms", type=int, default=25, help="do_bench repetition time per case")
    ap.add_argument("--csv", type=Path, help="also write the CSV rows to this file")
    args = ap.parse_args(argv)
    if INTERPRET:
        print("TRITON_INTERPRET=1: correctness check only, on CPU (eager torch for 'compile')")
        return 0 if check() else 1
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"batchnorm gpu benchmark: numbers from {dev}, measured {stamp}; torch "
              f"{torch.__version__}, triton {triton.__version__}, cuDNN "
              f"{torch.backends.cudnn.version()}; do_bench median, L2 flushed per repetition")
    print(header)
    if not check():
        return 1
    batches = [32] if args.quick else [32, 256]
    rows, skipped = run(batches, args.dtypes.split(","), args.layouts.split(","), args.budget,
                        args.rep_ms)
    report(rows, skipped, header)
    buf = io.StringIO()
    fields = ["provider", "pass_", "batch", "channels", "hw", "count", "dtype", "layout",
              "median_us", "p10_us", "p90_us", "f", "f_alg", "ratio_vs_torch", "copy_gbps",
              "algorithm", "device", "date", "torch", "triton"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({**r, "device": dev, "date": stamp, "torch": torch.__version__,
                    "triton": triton.__version__})
    print("\nCSV\n" + buf.getvalue())
    if args.csv:
        args.csv.write_text(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
