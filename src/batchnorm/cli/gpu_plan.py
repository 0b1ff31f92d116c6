"""``batchnorm bench --gpu-plan``: the gpu backend's launch plans for ResNet-50's BN layers.

For each layer, pass, batch, dtype and layout this prints what the plan of
:func:`batchnorm.backends.gpu.launch_plan` says a call does: its algorithm, the bytes its
launches ask of global memory against the minimum (read x once and write y once forward and
in inference; read x and dy once and write dx once backward), its launches, and its
streaming programs per SM. It is a model of the plan, not a timing: it needs no GPU (the
plans are built on ``device="meta"`` tensors) and it does not know what the caches serve;
``batchnorm bench --gpu`` measures on a device.

Targets checked (forward and backward): network totals at most :data:`TARGET_RATIO` times the
minimum bytes, at most :data:`TARGET_LAUNCHES` launches per pass, and at least
:data:`TARGET_WAVES` programs per SM for every layer over :data:`BIG_LAYER_BYTES`.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

from ._console import console, table
from .networks import resnet50_shapes

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``batchnorm bench --gpu-plan`` (it also reads --batch and --csv)."""
    parser.add_argument("--gpu-sms", type=int, default=DEFAULT_SMS,
                        help=f"streaming multiprocessors to plan for (default {DEFAULT_SMS}, "
                             "H100/H200 SXM)")


def plan_rows(batches, dtypes=DTYPES, layouts=LAYOUTS, num_sms=DEFAULT_SMS) -> list[dict]:
    """One row per (batch, dtype, layout, ResNet-50 layer shape, pass)."""
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
                    for pass_ in PLAN_PASSES:
                        p = gpu.launch_plan(pass_, x, layout, num_sms=num_sms)
                        rows.append(dict(
                            batch=batch, dtype=dname, layout=lay, channels=shape[1],
                            hw=shape[2], count=count, x_bytes=x.numel() * x.element_size(),
                            pass_=pass_, algorithm=p.algorithm, bytes_moved=p.bytes_moved,
                            min_bytes=p.min_bytes, ratio=p.traffic_ratio,
                            launches=len(p.launches), programs_per_sm=p.programs_per_sm,
                            num_sms=num_sms, blocks="x".join(map(str, p.blocks)),
                            splits=p.splits))
    return rows


def totals(rows) -> dict[tuple, dict]:
    """Network totals per (batch, dtype, layout, pass): bytes moved and minimum, weighted by
    how many layers of each shape the network has."""
    out: dict[tuple, dict] = defaultdict(lambda: dict(bytes_moved=0, min_bytes=0))
    for r in rows:
        t = out[(r["batch"], r["dtype"], r["layout"], r["pass_"])]
        t["bytes_moved"] += r["count"] * r["bytes_moved"]
        t["min_bytes"] += r["count"] * r["min_bytes"]
    return dict(out)


def check_targets(rows) -> list[str]:
    """The targets the plans miss, one line each (empty when all are met)."""
    misses = []
    for key, t in totals(rows).items():
        ratio = t["bytes_moved"] / t["min_bytes"]
        if key[3] in ("forward", "backward") and ratio > TARGET_RATIO:
            misses.append(f"batch {key[0]} {key[1]} {key[2]} {key[3]}: network total "
                          f"{ratio:.3f}x the minimum bytes (target <= {TARGET_RATIO})")
    for r in rows:
        if r["pass_"] not in ("forward", "backward"):
            continue
        where = (f"batch {r['batch']} {r['dtype']} {r['layout']} {r['pass_']} "
                 f"C={r['channels']} {r['hw']}x{r['hw']}")
        if r["launches"] > TARGET_LAUNCHES:
            misses.append(f"{where}: {r['launches']} launches (target <= {TARGET_LAUNCHES})")
        if r["x_bytes"] > BIG_LAYER_BYTES and r["programs_per_sm"] < TARGET_WAVES:
            misses.append(f"{where} ({r['algorithm']}, {r['x_bytes'] / 2**20:.1f} MiB): "
                          f"{r['programs_per_sm']:.2f} programs per SM (target >= "
                          f"{TARGET_WAVES:g})")
    return misses


def report(rows) -> list[str]:
    """Print the per-layer tables, the network totals and the target check; return misses."""
    num_sms = rows[0]["num_sms"] if rows else DEFAULT_SMS
    console(f"gpu launch plans, ResNet-50's 53 BN layers, {num_sms} SMs: {MODEL_NOTE}")
    groups = defaultdict(list)
    for r in rows:
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
        table(f"batch {batch}, {dname}, {lay} ({MODEL_NOTE})", headers, body)
    tot_rows = []
    for (batch, dname, lay, pass_), t in totals(rows).items():
        tot_rows.append([f"batch {batch} {dname} {lay}", pass_,
                         f"{t['bytes_moved'] / 2**30:.2f}", f"{t['min_bytes'] / 2**30:.2f}",
                         f"{t['bytes_moved'] / t['min_bytes']:.3f}"])
    table(f"network totals ({MODEL_NOTE})", ["case", "pass", "GiB moved", "GiB minimum",
                                              "bytes/min"], tot_rows)
    misses = check_targets(rows)
    console(f"targets (forward and backward): network bytes <= {TARGET_RATIO}x the minimum, "
            f"<= {TARGET_LAUNCHES} launches per pass, >= {TARGET_WAVES:g} programs per SM for "
            f"layers over {BIG_LAYER_BYTES >> 20} MiB")
    if misses:
        console(f"{len(misses)} target(s) not met by the plans:")
        for m in misses:
            console("  " + m)
    else:
        console("all targets met by the plans")
    return misses


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
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0
