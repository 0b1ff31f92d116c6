"""``batchnorm bench --train``: the time spent in BN modules inside a ResNet-50 training step.

A training step of ResNet-50 (``networks.resnet50``; batch 8 at 128x128 by default) with
``torch.nn``'s batch norms, and the same network through ``convert_model`` (the same initial
weights), in each layout: forward, cross-entropy, backward and an SGD update with momentum,
every output fresh. The models step in interleaved rounds (``_measure.interleave``).

``--fused`` compares ``fuse(convert_model(model))`` with torch.nn's, and times what the fused
layers replace: batch norm, the residual add and the ReLU. torch.nn's network goes through
the same graph rewrite with torch.nn's own modules and operations in each chain's place
(:class:`Unfused`: its batch norm, ``+``, ``relu``; the same operations as before, grouped in
one module), so that both models' hooks bracket the same stretch of the graph.

A whole step's time cannot resolve batch norm's share: BN is about a tenth of a CPU ResNet-50
step, and a shared machine moves a whole step by more than that from run to run. So
``_measure.ModuleTimer`` sums, from hooks that run on both models alike, the time each step
spends inside the BN modules' forward and backward; that sum, ours against torch.nn's in the
same rounds, is the headline (median over rounds of the per-round ratio).
"""

from __future__ import annotations

import argparse
import copy
import functools
import time

from . import _measure as M
from ._console import console, progress_bar, table


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The options only this mode reads."""
    group.add_argument("--warmup", type=int, default=None,
                       help="untimed steps per model first (default 2, --quick 1)")
    group.add_argument("--fused", action="store_true",
                       help="time BN + add + ReLU in fuse(convert_model(model)) against the "
                            "same operations in torch.nn's model")


@functools.cache  # one class: timed_modules recognizes its instances
def _unfused_class():
    import torch.nn.functional as F
    from torch import nn

    class Unfused(nn.Module):
        """A chain of the original graph as one module: ``act(bn(input) + residual)`` with
        torch.nn's batch norm and torch's add and activation, as the model computed them."""

        def __init__(self, bn, epilogue, inplace: bool):
            super().__init__()
            self.bn = bn
            self.activation, self.negative_slope = epilogue.activation, epilogue.negative_slope

        def forward(self, input, residual=None):
            y = self.bn(input)
            if residual is not None:
                y = y + residual
            if self.activation == "relu":
                return F.relu(y)
            return F.leaky_relu(y, self.negative_slope)

    return Unfused


def timed_modules(model) -> list:
    """What the hooks bracket: each chain's module (fused or :class:`Unfused`) and each batch
    norm outside a chain."""
    chains = [m for m in model.modules() if isinstance(m, _unfused_class())]
    inside = {id(m.bn) for m in chains}
    return chains + [m for m in M.bn_modules(model) if id(m) not in inside]


def _models(base, fused: bool):
    """{provider name: a copy of ``base``}, torch.nn's first, as this mode compares them."""
    from ..torch import convert_model
    from ..torch.fuse import fuse, rewrite

    if not fused:
        return {"torch.nn": copy.deepcopy(base),
                "batchnorm.torch": convert_model(copy.deepcopy(base))}
    unfused = _unfused_class()
    theirs = rewrite(copy.deepcopy(base), inplace=False, report=False, build=unfused)
    return {"torch.nn": theirs, "batchnorm.torch fused": fuse(convert_model(
        copy.deepcopy(base)))}


def _stepper(model, x, target):
    """A training step of ``model`` on (x, target): SGD with momentum, fresh gradients."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()
    return step


def run(args) -> int:
    """Step ResNet-50 with both batch norms in each layout; print the BN time and the step."""
    import torch

    from .networks import resnet50

    batch, image = args.batch or 8, args.image or 128
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    min_rounds = args.reps or (5 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    budget = args.budget if args.budget is not None else (30.0 if args.quick else 180.0)
    torch.manual_seed(0)
    base = resnet50(classes=10).train()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 3, image, image, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)

    timers, records, steps, pairs = {}, {}, {}, []
    for lay in layouts:
        fmt = torch.channels_last if lay == "nhwc" else torch.contiguous_format
        x = x0.to(memory_format=fmt)
        models = _models(copy.deepcopy(base).to(memory_format=fmt), args.fused)
        for name, model in models.items():
            key = (name, lay)
            timers[key] = M.ModuleTimer(timed_modules(model))
            records[key] = {"step": [], "fwd": [], "bwd": []}
            steps[key] = _recorded(_stepper(model, x, target), timers[key], records[key])
        theirs, ours = models
        pairs.append(((theirs, lay), (ours, lay)))

    with progress_bar("warm-up steps", total=warmup * len(steps)) as advance:
        for _ in range(warmup):
            for step in steps.values():
                step()
                advance()
    for rec in records.values():
        for series in rec.values():
            series.clear()
    console(f"timing {len(steps)} models in interleaved rounds ({min_rounds} or more, "
            f"{budget:.0f} s budget)...")
    bn = M.interleave(steps, min_rounds=min_rounds, max_rounds=5 * min_rounds,
                      budget_s=budget, pairs=pairs)
    rows = _rows(bn, records, timers, pairs, batch, image, args)
    _print(rows, batch, image, args)
    if args.csv:
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def _recorded(step, timer: M.ModuleTimer, rec: dict) -> M.Step:
    """The step returning its BN-module seconds; the whole step and the parts go to ``rec``."""
    def timed_step() -> float:
        timer.reset()
        t0 = time.perf_counter()
        step()
        rec["step"].append(time.perf_counter() - t0)
        rec["fwd"].append(timer.forward)
        rec["bwd"].append(timer.backward)
        return timer.forward + timer.backward
    return timed_step


def _rows(bn, records, timers, pairs, batch, image, args) -> list[dict]:
    resolution = M.timer_resolution()
    rows = []
    for theirs_key, ours_key in pairs:
        bn_ratio = M.summarize(M.ratios(bn[ours_key], bn[theirs_key]))  # time ours / torch
        step_ratio = M.summarize(M.ratios(records[ours_key]["step"],
                                          records[theirs_key]["step"]))
        times = {key: M.summarize(bn[key]) for key in (ours_key, theirs_key)}
        # the ratios are only as good as both BN times: both rows carry the pair's verdict
        verdict = M.combine([
            *(M.judge(s, interval=s.min / (2 * timers[key].modules), resolution=resolution)
              for key, s in times.items()),  # shortest interval: one module's pass, on average
            M.judge_ratios(bn_ratio, what="BN ratio"),
            M.judge_ratios(step_ratio, what="step ratio")])
        for key, s_bn in times.items():
            name, lay = key
            rec = records[key]
            s_step = M.summarize(rec["step"])
            rows.append(dict(
                mode="train", provider=name, pass_="train_step", network="resnet50",
                timed=_region(args),
                shape=f"{batch}x3x{image}x{image}", dtype="float32", layout=lay,
                threads=args.threads, bn_modules=timers[key].modules, reps=s_bn.n,
                step_ms=s_step.median * 1e3, step_spread=s_step.spread,
                bn_fwd_ms=M.summarize(rec["fwd"]).median * 1e3,
                bn_bwd_ms=M.summarize(rec["bwd"]).median * 1e3,
                bn_ms=s_bn.median * 1e3, bn_min_ms=s_bn.min * 1e3, bn_max_ms=s_bn.max * 1e3,
                bn_spread=s_bn.spread, bn_share=s_bn.median / s_step.median,
                bn_time_ratio=bn_ratio.median, bn_ratio_spread=bn_ratio.spread,
                step_time_ratio=step_ratio.median, step_ratio_spread=step_ratio.spread)
                | M.as_fields(verdict) | dict(device=M.device(), versions=M.versions()))
    return rows


def _region(args) -> str:
    return "bn+add+relu" if getattr(args, "fused", False) else "bn"


def _print(rows, batch, image, args) -> None:
    console(f"batchnorm bench --train: ResNet-50, batch {batch}, {image}x{image}, float32, SGD "
            f"with momentum; {M.device()}; {M.versions()}; threads={args.threads} "
            "(Numba and PyTorch)")
    modules = rows[0]["bn_modules"] if rows else 0
    if _region(args) == "bn":
        console(f"BN ms = time inside the {modules} BN modules' forward + backward per step "
                "(hooks); ratio = median over rounds of t_ours / t_torch (< 1: ours faster); "
                "spread = interquartile range / median")
    else:
        console(f"BN ms = time inside BN, the residual add and ReLU per step: {modules} "
                "modules' forward + backward (hooks), each a fused layer or torch.nn's BN + "
                "add + ReLU in one module, or a BN outside any chain; ratio = median over "
                "rounds of t_ours / t_torch (< 1: ours faster); spread = interquartile range "
                "/ median")
    body = []
    for r in rows:
        ok = M.from_fields(r).valid
        ours = r["provider"] != "torch.nn"
        body.append([r["provider"], r["layout"], f"{r['step_ms']:.1f}",
                     f"{r['step_spread']:.0%}", f"{r['bn_fwd_ms']:.2f}", f"{r['bn_bwd_ms']:.2f}",
                     f"{r['bn_ms']:.2f}", f"{r['bn_spread']:.0%}", f"{r['bn_share']:.0%}",
                     f"{r['bn_time_ratio']:.2f}" if ours and ok else "-",
                     f"{r['step_time_ratio']:.2f}" if ours and ok else "-",
                     str(r["reps"]), M.from_fields(r).brief()])
    table("training step", ["provider", "layout", "step ms", "step spread", "BN fwd ms",
                            "BN bwd ms", "BN ms", "BN spread", "BN share", "BN ours/torch",
                            "step ours/torch", "rounds", "status"], body)
