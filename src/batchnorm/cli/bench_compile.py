"""``batchnorm bench --compile``: a small training step under ``torch.compile``, ours vs torch.nn.

The small ResNet-style network of ``networks.build_net`` (batch 32 at 32x32 by default) with
``torch.nn``'s batch norms and through ``convert_model`` (same initial weights), each compiled
with ``torch.compile`` (Inductor unless ``--compile-backend``) and, for reference, in eager
mode: forward, cross-entropy, backward (the compiled backward) and an SGD update. The four
models step in interleaved rounds after compiling; the headline is the compiled step time,
ours against torch.nn's (median over rounds of the per-round ratio). Compiling takes a minute
or more on a small CPU.
"""

from __future__ import annotations

import argparse

from . import _measure as M
from ._console import console, progress_bar, table


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The options only this mode reads."""
    group.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend (default inductor; aot_eager is fast to "
                            "compile and checks the path, not the speed)")
    group.add_argument("--width", type=int, default=32, help="channels of the network")
    group.add_argument("--blocks", type=int, default=2, help="residual blocks")


def run(args) -> int:
    """Compile both models, step all four interleaved, print the step times and ratios."""
    import torch

    from .bench_train import _models, _stepper
    from .networks import build_net

    batch, image = args.batch or 32, args.image or 32
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    min_rounds = args.reps or (5 if args.quick else 15)
    budget = args.budget if args.budget is not None else (15.0 if args.quick else 60.0)
    torch.manual_seed(0)
    base = build_net(args.width, args.blocks).train()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 3, image, image, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    torch._dynamo.reset()

    steps, pairs = {}, []
    for lay in layouts:
        fmt = torch.channels_last if lay == "nhwc" else torch.contiguous_format
        x = x0.to(memory_format=fmt)
        for kind in ("compiled", "eager"):
            for name, model in _models(base, fused=False).items():
                model = model.to(memory_format=fmt)
                if kind == "compiled":
                    model = torch.compile(model, backend=args.compile_backend)
                steps[name, kind, lay] = M.timed(_stepper(model, x, target))
            pairs.append((("torch.nn", kind, lay), ("batchnorm.torch", kind, lay)))
    with progress_bar("compiling and warming up", total=len(steps)) as advance:
        for key, step in steps.items():
            advance(description=f"warm-up {' '.join(key)}")
            step()  # compiles forward and backward
            step()
    console(f"timing {len(steps)} models in interleaved rounds ({min_rounds} or more, "
            f"{budget:.0f} s budget)...")
    times = M.interleave(steps, min_rounds=min_rounds, max_rounds=5 * min_rounds,
                         budget_s=budget, pairs=pairs)
    resolution = M.timer_resolution()
    rows = []
    for theirs, ours in pairs:
        rs = M.summarize(M.ratios(times[ours], times[theirs]))  # time ours / torch
        # the ratio is only as good as both times: both rows carry the pair's verdict
        verdict = M.combine([
            *(M.judge(M.summarize(times[k]), interval=min(times[k]), resolution=resolution)
              for k in (ours, theirs)), M.judge_ratios(rs)])
        for key in (ours, theirs):
            s = M.summarize(times[key])
            rows.append(dict(
                mode="compile", provider=key[0], pass_=f"train_step_{key[1]}",
                network=f"build_net(width={args.width}, blocks={args.blocks})",
                shape=f"{batch}x3x{image}x{image}", dtype="float32", layout=key[2],
                threads=args.threads, backend=args.compile_backend if key[1] == "compiled"
                else "eager", reps=s.n, min_ms=s.min * 1e3, median_ms=s.median * 1e3,
                max_ms=s.max * 1e3, spread=s.spread, time_ratio=rs.median,
                ratio_spread=rs.spread) | M.as_fields(verdict)
                | dict(device=M.device(), versions=M.versions()))
    console(f"batchnorm bench --compile: {rows[0]['network']}, batch {batch}, {image}x{image}, "
            f"float32, SGD with momentum; {M.device()}; {M.versions()}; "
            f"threads={args.threads} (Numba and PyTorch)")
    console("ratio = median over rounds of t_ours / t_torch (< 1: ours faster)")
    table("training step", ["provider", "mode", "layout", "step ms", "spread",
                            "ours/torch", "rounds", "status"],
          [[r["provider"], r["backend"], r["layout"], f"{r['median_ms']:.2f}",
            f"{r['spread']:.0%}", f"{r['time_ratio']:.2f}"
            if r["provider"] == "batchnorm.torch" and r["status"] != "invalid" else "-",
            str(r["reps"]), M.from_fields(r).brief()] for r in rows])
    if args.csv:
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0
