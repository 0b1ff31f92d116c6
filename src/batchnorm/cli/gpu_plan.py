"""``batchnorm bench --gpu-plan``: the gpu backend's launch plans for ResNet-50's BN layers.

For each layer, pass, batch, dtype, layout and fused form this prints what the plan of
:func:`batchnorm.backends.gpu.launch_plan` says a call does: its algorithm, the bytes its
launches ask of global memory against the minimum (each tensor the form streams read or
written once: forward x and y, plus the residual; backward x, dy and dx, plus y with an
activation and dz with a residual; the in-place form reads y instead of x), its launches,
and its streaming programs per SM. It is a model of the plan, not a timing: it needs no GPU
(the plans are built on ``device="meta"`` tensors) and it does not know what the caches
serve; ``benchmarks/gpu.py`` measures on a device.

The forms (:data:`FORMS`): plain BN, BN + ReLU, BN + add + ReLU, and BN + LeakyReLU in the
memory-saving mode; and the network as fused, each layer in the form it takes in ResNet-50
(:data:`batchnorm.cli.networks.RESNET50_EPILOGUES`).

Targets checked (forward and backward, every form): network totals at most
:data:`TARGET_RATIO` times the minimum bytes, at most :data:`TARGET_LAUNCHES` launches per
pass, and at least :data:`TARGET_WAVES` programs per SM for every layer over
:data:`BIG_LAYER_BYTES`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from . import _measure as M
from ._console import console, table
from .networks import RESNET50_EPILOGUES, resnet50_shapes

TARGET_RATIO = 1.15
TARGET_LAUNCHES = 3
TARGET_WAVES = 2.0
BIG_LAYER_BYTES = 1 << 20
DEFAULT_SMS = 132  # H100 / H200 SXM
PLAN_PASSES = ("forward", "backward", "inference")
DTYPES = ("float16", "float32")
LAYOUTS = ("nchw", "nhwc")
MODEL_NOTE = ("traffic model of the launch plans, not a timing: bytes each launch asks of "
              "global memory, caches not modelled")
# name -> (activation, residual, memory-saving mode: forward writes y over x, backward
# recovers xhat from y)
FORMS = {
    "bn": (None, False, False),
    "bn+relu": ("relu", False, False),
    "bn+add+relu": ("relu", True, False),
    "bn+leaky_relu in place": ("leaky_relu", False, True),
}
# the network as fused: each layer in the form RESNET50_EPILOGUES gives it
FUSED_NETWORK = "ResNet-50 fused"
_FORM_OF_EPILOGUE = {None: "bn", "relu": "bn+relu", "add_relu": "bn+add+relu"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``batchnorm bench --gpu-plan`` (it also reads --batch and --csv)."""
    parser.add_argument("--gpu-sms", type=int, default=DEFAULT_SMS,
                        help=f"streaming multiprocessors to plan for (default {DEFAULT_SMS}, "
                             "H100/H200 SXM)")


def _plan(gpu, pass_, x, layout, form, num_sms):
    """The plan of one layer's pass in one form."""
    import torch

    from .._shapes import Epilogue

    activation, residual, inplace = FORMS[form]
    epilogue = None if activation is None else Epilogue(activation, 0.01 * (
        activation == "leaky_relu"))
    if pass_ == "backward":
        y = torch.empty_like(x) if activation or inplace else None
        return gpu.launch_plan(pass_, None if inplace else x, layout, dy=torch.empty_like(x),
                               y=y, epilogue=epilogue, want_dz=residual, num_sms=num_sms)
    return gpu.launch_plan(pass_, x, layout, residual=torch.empty_like(x) if residual else None,
                           epilogue=epilogue, out=x if inplace else None, num_sms=num_sms)


def plan_rows(batches, dtypes=DTYPES, layouts=LAYOUTS, num_sms=DEFAULT_SMS,
              forms=tuple(FORMS)) -> list[dict]:
    """One row per (batch, dtype, layout, ResNet-50 layer shape, form, pass)."""
    import torch

    from .._shapes import resolve_layout
    from ..backends import gpu

    rows = []
    for batch in batches:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            for lay in layouts:
                fmt = torch.channels_last if lay == "nhwc" else torch.contiguous_format
                for shape, count in resnet50_shapes(batch):
                    x = torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)
                    layout = resolve_layout(shape)
                    for form in forms:
                        for pass_ in PLAN_PASSES:
                            p = _plan(gpu, pass_, x, layout, form, num_sms)
                            rows.append(dict(
                                batch=batch, dtype=dname, layout=lay, channels=shape[1],
                                hw=shape[2], count=count,
                                x_bytes=x.numel() * x.element_size(), form=form,
                                pass_=pass_, algorithm=p.algorithm,
                                bytes_moved=p.bytes_moved, min_bytes=p.min_bytes,
                                ratio=p.traffic_ratio, launches=len(p.launches),
                                programs_per_sm=p.programs_per_sm, num_sms=num_sms,
                                blocks="x".join(map(str, p.blocks)), splits=p.splits))
    return rows


def totals(rows) -> dict[tuple, dict]:
    """Network totals per (batch, dtype, layout, form, pass): bytes moved and minimum,
    weighted by how many layers of each shape the network has; and under the form
    :data:`FUSED_NETWORK`, each shape's layers counted in the forms they take."""
    out: dict[tuple, dict] = defaultdict(lambda: dict(bytes_moved=0, min_bytes=0))

    def add(key, r, n):
        out[key]["bytes_moved"] += n * r["bytes_moved"]
        out[key]["min_bytes"] += n * r["min_bytes"]

    for r in rows:
        case = (r["batch"], r["dtype"], r["layout"])
        add((*case, r["form"], r["pass_"]), r, r["count"])
        for epilogue, n in RESNET50_EPILOGUES.get((r["channels"], r["hw"]), {}).items():
            if _FORM_OF_EPILOGUE[epilogue] == r["form"]:
                add((*case, FUSED_NETWORK, r["pass_"]), r, n)
    return dict(out)


def check_targets(rows) -> list[str]:
    """The targets the plans miss, one line each (empty when all are met)."""
    misses = []
    for key, t in totals(rows).items():
        ratio = t["bytes_moved"] / t["min_bytes"]
        if key[4] in ("forward", "backward") and ratio > TARGET_RATIO:
            misses.append(f"batch {key[0]} {key[1]} {key[2]} {key[3]} {key[4]}: network total "
                          f"{ratio:.3f}x the minimum bytes (target <= {TARGET_RATIO})")
    for r in rows:
        if r["pass_"] not in ("forward", "backward"):
            continue
        where = (f"batch {r['batch']} {r['dtype']} {r['layout']} {r['form']} {r['pass_']} "
                 f"C={r['channels']} {r['hw']}x{r['hw']}")
        if r["launches"] > TARGET_LAUNCHES:
            misses.append(f"{where}: {r['launches']} launches (target <= {TARGET_LAUNCHES})")
        if r["x_bytes"] > BIG_LAYER_BYTES and r["programs_per_sm"] < TARGET_WAVES:
            misses.append(f"{where} ({r['algorithm']}, {r['x_bytes'] / 2**20:.1f} MiB): "
                          f"{r['programs_per_sm']:.2f} programs per SM (target >= "
                          f"{TARGET_WAVES:g})")
    return misses


def report(rows) -> list[str]:
    """Print the per-layer tables (plain BN), the network totals of every form and the
    target check; return the misses."""
    num_sms = rows[0]["num_sms"] if rows else DEFAULT_SMS
    console(f"gpu launch plans, ResNet-50's 53 BN layers, {num_sms} SMs: {MODEL_NOTE}")
    groups = defaultdict(list)
    for r in rows:
        if r["form"] == "bn":
            groups[(r["batch"], r["dtype"], r["layout"])].append(r)
    for (batch, dname, lay), rs in groups.items():
        by_shape = defaultdict(dict)
        for r in rs:
            by_shape[(r["channels"], r["hw"], r["count"], r["x_bytes"])][r["pass_"]] = r
        body = []
        for (c, hw, count, nbytes), passes in by_shape.items():
            cells = [f"{c} {hw}x{hw}", str(count), f"{nbytes / 2**20:.1f}"]
            for pass_ in PLAN_PASSES:
                p = passes[pass_]
                cells += [p["algorithm"], f"{p['ratio']:.2f}", str(p["launches"]),
                          f"{p['programs_per_sm']:.1f}"]
            body.append(cells)
        headers = ["layer", "n", "MiB"]
        for pass_ in PLAN_PASSES:
            short = {"forward": "fwd", "backward": "bwd", "inference": "inf"}[pass_]
            headers += [short, "bytes/min", "launches", "prog/SM"]
        table(f"batch {batch}, {dname}, {lay}, plain BN ({MODEL_NOTE})", headers, body)
    by_case = defaultdict(dict)
    for (batch, dname, lay, form, pass_), t in totals(rows).items():
        by_case[(batch, dname, lay, form)][pass_] = t
    order = {f: i for i, f in enumerate([*FORMS, FUSED_NETWORK])}
    tot_rows = []
    for (batch, dname, lay, form), passes in sorted(
            by_case.items(), key=lambda kv: (*kv[0][:3], order[kv[0][3]])):
        cells = [f"batch {batch} {dname} {lay}", form]
        cells += [f"{passes[p]['bytes_moved'] / passes[p]['min_bytes']:.3f}"
                  for p in PLAN_PASSES]
        train = [passes[p] for p in ("forward", "backward")]
        cells += [f"{sum(t['bytes_moved'] for t in train) / 2**30:.2f}",
                  f"{sum(t['min_bytes'] for t in train) / 2**30:.2f}"]
        tot_rows.append(cells)
    table(f"network totals, bytes moved over the minimum of each form ({MODEL_NOTE})",
          ["case", "form", "fwd", "bwd", "inf", "fwd+bwd GiB", "fwd+bwd min GiB"], tot_rows)
    misses = check_targets(rows)
    console(f"targets (forward and backward, every form): network bytes <= {TARGET_RATIO}x "
            f"the minimum, <= {TARGET_LAUNCHES} launches per pass, >= {TARGET_WAVES:g} "
            f"programs per SM for layers over {BIG_LAYER_BYTES >> 20} MiB")
    if misses:
        console(f"{len(misses)} target(s) not met by the plans:")
        for m in _grouped(misses, by_case):
            console("  " + m)
    else:
        console("all targets met by the plans")
    return misses


def _grouped(misses: list[str], by_case: dict) -> list[str]:
    """The misses to print: the network-total ones as one line per form and pass (the range
    of its ratios over the cases that miss), then the per-layer ones as they are."""
    ratios = defaultdict(list)
    for (*_, form), passes in by_case.items():
        for pass_ in ("forward", "backward"):
            t = passes[pass_]
            ratio = t["bytes_moved"] / t["min_bytes"]
            if ratio > TARGET_RATIO:
                ratios[(form, pass_)].append(ratio)
    cases = len({key[:3] for key in by_case})
    order = {f: i for i, f in enumerate([*FORMS, FUSED_NETWORK])}
    lines = [f"{form} {pass_}: network totals {min(rs):.3f}x to {max(rs):.3f}x the minimum "
             f"bytes in {len(rs)} of {cases} cases (target <= {TARGET_RATIO})"
             for (form, pass_), rs in sorted(ratios.items(),
                                             key=lambda kv: (order[kv[0][0]], kv[0][1]))]
    return lines + [m for m in misses if "network total" not in m]


def run(args) -> int:
    """``batchnorm bench --gpu-plan``: 0 (the report is informative; misses are printed)."""
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except ImportError as exc:
        console(f"--gpu-plan needs torch and triton (the gpu extra): {exc}")
        return 2
    batches = [args.batch] if getattr(args, "batch", None) else [32, 256]
    rows = plan_rows(batches, num_sms=args.gpu_sms)
    report(rows)
    if getattr(args, "csv", None):
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0
