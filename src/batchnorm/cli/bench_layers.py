"""``batchnorm bench --layers``: the users' path, one layer at a time.

For every BN shape of ResNet-50 (``networks.resnet50_shapes``) at each size (batch 8 at
128x128 and batch 32 at 224x224; ``--quick``: batch 8 only), in both layouts (NCHW and
channels-last), a pair of ``nn.Module`` providers, ours and the ``torch.nn`` code it replaces,
is timed in one process, interleaved round by round (see ``_measure.interleave``):

- ``train``: ``module(x)`` in training mode, then ``torch.autograd.grad`` of the output with
  respect to x and the parameters: forward + backward through autograd, every output fresh,
  the running statistics updated (what a training step does to each BN layer);
- ``fwd``: the training forward alone, its graph recorded;
- ``inf``: ``module(x)`` in eval mode under ``torch.no_grad()`` (inference).

Calls follow one another without pauses, as in a network (PyTorch's and Numba's thread pools
meet as they do there). ``--after-conv`` runs an untimed depthwise 3x3 convolution (PyTorch)
before each forward and before each backward; its outputs are the layer's x and its incoming
gradient, freshly written, as when a BN follows a convolution. Each time is also a fraction
``f`` of the copy limit: a threaded copy of x, measured in the same rounds (best time), and
``f = traffic / 2 * t_copy / t``, where ``traffic`` counts the bytes the pass must move in
units of bytes(x) (forward 2: read x, write y; backward 3: read x and dy, write dx).

The network total weights each shape by its number of layers (53 in all); its speed-up is
``sum(count * t_torch) / sum(count * t_ours)``. Each layer's speed-up is the median over
rounds of ``t_torch / t_ours``. Invalid and noisy figures are marked (``_measure.judge``); a
total with an invalid layer is not reported as a result.

Other pairs of providers (``--pair``): ``bn_relu``, the fused ``BatchNormAct2d`` against
torch.nn's BatchNorm2d then ReLU, and ``bn_add_relu``, the same with the residual add
(torchvision's block ending: ``out = bn(x); out += identity; relu(out)``). Each is one
:class:`Pair` in :data:`PAIRS`: two module builders, the number of activation inputs, and the
traffic of each pass.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import _measure as M
from ._console import console, progress_bar, table
from .networks import resnet50_shapes

PASSES = ("train", "fwd", "inf")
DEFAULT_PASSES = ("train", "inf")
SIZES = ((8, 128), (32, 224))  # (batch, image): the two operating points


@dataclass(frozen=True)
class Pair:
    """Ours and the code users would otherwise run: each builder takes the channel count and
    returns an ``nn.Module`` called as ``module(*xs)`` on ``inputs`` tensors of x's shape."""

    ours: str
    theirs: str
    build_ours: Callable[[int], object]
    build_theirs: Callable[[int], object]
    inputs: int = 1
    # bytes each pass must move (reads + writes), in units of bytes(x)
    traffic: Mapping[str, int] = field(
        default_factory=lambda: {"train": 5, "fwd": 2, "inf": 2})


def _ours_bn2d(c: int):
    from ..torch import BatchNorm2d

    return BatchNorm2d(c)


def _torch_bn2d(c: int):
    import torch

    return torch.nn.BatchNorm2d(c)


def _ours_bn_relu(c: int):
    from ..torch import BatchNormAct2d

    return BatchNormAct2d(c, activation="relu")


def _torch_bn_relu(c: int):
    """torch.nn's BatchNorm2d then ReLU(inplace=True), as torchvision's ResNet writes them."""
    import torch

    return torch.nn.Sequential(torch.nn.BatchNorm2d(c), torch.nn.ReLU(inplace=True))


def _torch_bn_add_relu(c: int):
    """The end of torchvision's residual block: ``out = bn(x); out += identity;
    relu(out)`` with ReLU(inplace=True)."""
    import torch

    class BatchNormAddReLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.relu = torch.nn.BatchNorm2d(c), torch.nn.ReLU(inplace=True)

        def forward(self, x, identity):
            out = self.bn(x)
            out += identity
            return self.relu(out)

    return BatchNormAddReLU()


PAIRS = {
    "bn": Pair("batchnorm.torch.BatchNorm2d", "torch.nn.BatchNorm2d", _ours_bn2d, _torch_bn2d),
    # fused: backward reads dy, x and y (act' off y's sign) and writes dx (and dz)
    "bn_relu": Pair("batchnorm.torch.BatchNormAct2d(relu)", "torch.nn.BatchNorm2d+ReLU",
                    _ours_bn_relu, _torch_bn_relu,
                    traffic={"train": 6, "fwd": 2, "inf": 2}),
    "bn_add_relu": Pair("batchnorm.torch.BatchNormAct2d(relu, residual)",
                        "torch.nn.BatchNorm2d+add+ReLU", _ours_bn_relu, _torch_bn_add_relu,
                        inputs=2, traffic={"train": 8, "fwd": 3, "inf": 3}),
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The options only this mode reads."""
    group.add_argument("--pair", default="bn", choices=list(PAIRS),
                       help="which providers to compare (default bn: " +
                            "; ".join(f"{k}: {p.ours} vs {p.theirs}" for k, p in PAIRS.items())
                            + ")")
    group.add_argument("--after-conv", action="store_true",
                       help="run a PyTorch depthwise convolution (untimed) before each timed "
                            "forward and backward; its outputs feed the layer")


@dataclass
class _Result:
    """One (size, layout, pass, shape): both providers' per-round times and the copy."""

    batch: int
    image: int
    layout: str
    pass_: str
    shape: tuple[int, ...]
    count: int
    times: dict[str, list[float]]  # provider name -> per-call seconds by round
    t_copy: float
    nbytes: int                    # bytes of x
    errors: dict[str, str]         # provider name -> why it could not be timed


def run(args) -> int:
    """Time the pair on every case; print per-layer tables and the totals; 0 on success."""
    import torch

    pair = PAIRS[args.pair]
    passes = list(DEFAULT_PASSES) if args.passes == "all" else [args.passes]
    if not set(passes) <= set(PASSES):
        console(f"--pass {args.passes}: the layers mode times {', '.join(PASSES)} or all")
        return 2
    if args.batch or args.image:
        sizes = [(args.batch or 8, args.image or 128)]
    else:
        sizes = list(SIZES[:1] if args.quick else SIZES)
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    dtype = getattr(torch, args.dtype)
    min_rounds = args.reps or (5 if args.quick else 10)
    budget = args.budget if args.budget is not None else (45.0 if args.quick else 240.0)
    cases = [(b, s, shape, n, lay, p) for b, s in sizes for lay in layouts for p in passes
             for shape, n in resnet50_shapes(b, s)
             if args.only is None or args.only in "x".join(map(str, shape))]
    if not cases:
        console("no shape matches --only")
        return 2
    resolution = M.timer_resolution()
    shares = M.Budget(budget, len(cases))
    results = []
    with progress_bar("layers", total=len(cases)) as advance:
        for b, s, shape, n, lay, p in cases:
            advance(description=f"{b}x{s} {lay} {p} {shape}")
            results.append(_measure_case(pair, b, s, shape, n, lay, p, dtype, min_rounds,
                                         shares.share(), args.after_conv))
    rows = _rows(results, pair, args, resolution)
    _print(rows, pair, args)
    if args.csv:
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def _measure_case(pair, batch, image, shape, count, layout, pass_, dtype, min_rounds,
                  budget, after_conv) -> _Result:
    import torch

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)

    def tensor():
        return torch.randn(shape, generator=g).to(dtype=dtype, memory_format=fmt)

    x = tensor()
    copy_dst = torch.empty_like(x)  # x's strides: a straight copy of its bytes
    steps = {"copy": M.timed(lambda: copy_dst.copy_(x))}
    errors = {}
    conv = None
    if after_conv:
        c = shape[1]
        conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).to(dtype=dtype,
                                                                             memory_format=fmt)
    xs, dy = [x, *(tensor() for _ in range(pair.inputs - 1))], tensor()  # both read these
    for name, build in ((pair.ours, pair.build_ours), (pair.theirs, pair.build_theirs)):
        try:
            module = build(shape[1]).to(dtype=dtype, memory_format=fmt)
            step = _provider_step(module, pass_, xs, dy, conv)
            steps[name], _ = M.batched(step)
        except Exception as exc:  # a provider that cannot run this case is reported, not fatal
            errors[name] = f"raised {type(exc).__name__}: {exc}".splitlines()[0][:200]
    steps["copy"], _ = M.batched(steps["copy"])
    both = [k for k in (pair.theirs, pair.ours) if k in steps]
    times = M.interleave(steps, min_rounds=min_rounds, max_rounds=5 * min_rounds,
                         budget_s=budget, watch=both,
                         pairs=[tuple(both)] if len(both) == 2 else ())
    return _Result(batch, image, layout, pass_, shape, count, times, min(times.pop("copy")),
                   x.numel() * x.element_size(), errors)


def _provider_step(module, pass_: str, xs: list, dy, conv) -> M.Step:
    """The step timing one call of ``module`` in ``pass_`` (see the module docstring)."""
    import time

    import torch

    module.train(pass_ != "inf")
    params = [p for p in module.parameters() if p.requires_grad]
    clock = time.perf_counter

    if pass_ == "inf":
        def step() -> float:
            with torch.no_grad():
                x = conv(xs[0]) if conv is not None else xs[0]
                t0 = clock()
                module(x, *xs[1:])
                return clock() - t0
        return step

    rest = [r.requires_grad_() for r in xs[1:]]

    def step() -> float:
        if conv is not None:
            with torch.no_grad():
                x = conv(xs[0])
        else:
            x = xs[0].detach()
        x.requires_grad_()
        t0 = clock()
        y = module(x, *rest)
        t1 = clock()
        if pass_ == "fwd":
            return t1 - t0
        if conv is not None:
            with torch.no_grad():
                g = conv(dy)
        else:
            g = dy
        t2 = clock()
        torch.autograd.grad(y, [x, *rest, *params], g)
        return (t1 - t0) + clock() - t2
    return step


def _rows(results: list[_Result], pair: Pair, args, resolution: float) -> list[dict]:
    """CSV rows: one per (provider, pass, shape, layout, size), then the network totals."""
    rows = []
    for r in results:
        theirs, ours = r.times.get(pair.theirs), r.times.get(pair.ours)
        rs = M.summarize(M.ratios(theirs, ours)) if theirs and ours else None
        k = pair.traffic[r.pass_] / 2
        measured, verdicts = {}, {}
        for name in (pair.ours, pair.theirs):
            if name in r.errors:
                verdicts[name] = M.Verdict("invalid", (f"{name} {r.errors[name]}",))
                continue
            s = M.summarize(r.times[name])
            measured[name] = s, k * r.t_copy / s.median
            verdicts[name] = M.judge(s, interval=s.min / (2 if r.pass_ == "train" else 1),
                                     resolution=resolution, f=measured[name][1], ratios=rs)
        # a speed-up is only as good as both of its times: both rows carry the pair's verdict
        verdict = M.combine(verdicts.values())
        for name in (pair.ours, pair.theirs):
            base = dict(mode="layers", provider=name, pass_=r.pass_, batch=r.batch,
                        image=r.image, shape="x".join(map(str, r.shape)), count=r.count,
                        dtype=args.dtype, layout=r.layout, threads=args.threads,
                        after_conv=args.after_conv, copy_gbs=2 * r.nbytes / r.t_copy / 1e9,
                        device=M.device(), versions=M.versions())
            if name not in measured:
                rows.append(base | _empty() | M.as_fields(verdict))
                continue
            s, f = measured[name]
            rows.append(base | dict(
                reps=s.n, min_ms=s.min * 1e3, median_ms=s.median * 1e3, max_ms=s.max * 1e3,
                spread=s.spread, copy_ms=r.t_copy * 1e3, f=f,
                speedup=rs.median if rs else float("nan"),
                ratio_spread=rs.spread if rs else float("nan"), worst_shape="")
                | M.as_fields(verdict))
    return rows + _totals(rows, pair)


def _empty() -> dict:
    nan = float("nan")
    return dict(reps=0, min_ms=nan, median_ms=nan, max_ms=nan, spread=nan, copy_ms=nan, f=nan,
                speedup=nan, ratio_spread=nan, worst_shape="")


def _totals(rows: list[dict], pair: Pair) -> list[dict]:
    """The network total of each (size, layout, pass), per provider, weighted by count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["image"], r["layout"], r["pass_"]), []).append(r)
    out = []
    for _, mine in groups.items():
        ours = [r for r in mine if r["provider"] == pair.ours]
        theirs = [r for r in mine if r["provider"] == pair.theirs]
        verdict = M.total_verdict([M.from_fields(r) for r in ours])  # each the pair's
        t_ours = sum(r["count"] * r["median_ms"] for r in ours)
        t_theirs = sum(r["count"] * r["median_ms"] for r in theirs)
        speedup = t_theirs / t_ours if verdict.valid else float("nan")
        worst = min(ours, key=lambda r: r["speedup"]) if verdict.valid else None
        k = pair.traffic[mine[0]["pass_"]] / 2
        copy = sum(r["count"] * r["copy_ms"] for r in ours)
        for name, t, part in ((pair.ours, t_ours, ours), (pair.theirs, t_theirs, theirs)):
            out.append(dict(part[0]) | dict(
                provider=name, shape="total", count=sum(r["count"] for r in part),
                reps=min(r["reps"] for r in part), min_ms=float("nan"), median_ms=t,
                max_ms=float("nan"), spread=float("nan"), copy_ms=copy, f=k * copy / t,
                copy_gbs=float("nan"),
                speedup=speedup, ratio_spread=float("nan"),
                worst_shape=f"{worst['shape']} ({worst['speedup']:.2f}x)" if worst else "")
                | M.as_fields(verdict))
    return out


def _fmt(v: float, spec: str, valid: bool = True) -> str:
    return f"{v:{spec}}" if valid and v == v else "-"


def _print(rows: list[dict], pair: Pair, args) -> None:
    console(f"batchnorm bench --layers: {pair.ours} vs {pair.theirs}; {M.device()}; "
            f"{M.versions()}; threads={args.threads} (Numba and PyTorch); dtype={args.dtype}"
            + ("; after a depthwise convolution" if args.after_conv else ""))
    console("interleaved rounds, fresh outputs, no pauses; ms = median per call over rounds; "
            "speed-up = median over rounds of t_torch / t_ours (> 1: ours faster); "
            "spread = interquartile range / median; f = fraction of a threaded copy's speed")
    layers = [r for r in rows if r["shape"] != "total"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in layers:
        groups.setdefault((r["batch"], r["image"], r["layout"], r["pass_"], r["shape"]),
                          {})[r["provider"]] = r
    by_table: dict[tuple, list[list[str]]] = {}
    for (b, s, lay, p, shape), pr in groups.items():
        o, t = pr[pair.ours], pr[pair.theirs]
        verdict = M.from_fields(o)  # the pair's
        ok = verdict.valid
        by_table.setdefault((b, s, lay, p), []).append([
            shape, str(o["count"]), _fmt(o["median_ms"], ".3f", ok),
            _fmt(t["median_ms"], ".3f", ok), _fmt(o["spread"], ".0%"), _fmt(t["spread"], ".0%"),
            _fmt(o["speedup"], ".2f", ok) + ("x" if ok else ""), _fmt(o["ratio_spread"], ".0%"),
            _fmt(o["f"], ".2f", ok), _fmt(t["f"], ".2f", ok), str(o["reps"]), verdict.brief()])
    for (b, s, lay, p), body in by_table.items():
        table(f"batch {b}, {s}x{s}, {lay}, {p}",
              ["shape", "layers", "ours ms", "torch ms", "ours spread", "torch spread",
               "speed-up", "ratio spread", "ours f", "torch f", "rounds", "status"], body)
    totals = [r for r in rows if r["shape"] == "total" and r["provider"] == pair.ours]
    theirs = {(r["batch"], r["image"], r["layout"], r["pass_"]): r for r in rows
              if r["shape"] == "total" and r["provider"] == pair.theirs}
    body = []
    for o in totals:
        t = theirs[o["batch"], o["image"], o["layout"], o["pass_"]]
        verdict = M.from_fields(o)
        ok = verdict.valid
        body.append([f"batch {o['batch']}, {o['image']}x{o['image']}", o["layout"], o["pass_"],
                     _fmt(o["median_ms"], ".2f", ok), _fmt(t["median_ms"], ".2f", ok),
                     _fmt(o["speedup"], ".2f", ok) + ("x" if ok else ""), o["worst_shape"],
                     _fmt(o["f"], ".2f", ok), _fmt(t["f"], ".2f", ok), str(verdict)])
    bandwidth = M.summarize([r["copy_gbs"] for r in layers])
    console(f"threaded copy of x (bytes read + written / time), over the cases: "
            f"{bandwidth.min:.1f} to {bandwidth.max:.1f} GB/s, median {bandwidth.median:.1f} "
            "(f is relative to it; a busy machine slows the copy and the layers alike)")
    table(f"network total ({totals[0]['count']} BN layers of ResNet-50, weighted by count)"
          if totals else "network total", ["size", "layout", "pass", "ours ms", "torch ms",
                                           "speed-up", "worst layer", "ours f", "torch f",
                                           "status"], body)
