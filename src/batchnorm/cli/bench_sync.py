"""``batchnorm bench --sync``: SyncBatchNorm's forward + backward over a group of gloo processes.

Each of ``--processes`` processes (2 by default, ``--threads`` split between them) holds one
shard of ResNet-50's BN shapes (``--batch`` x ``--image``, batch 8 at 128x128 by default: the
shape is each process's own) and times, in rounds of alternating order, through autograd:

- ``sync``: ``SyncBatchNorm`` forward + backward (the backend's phases and the
  collectives in between);
- ``local``: the same shard through this library's ``BatchNorm2d``, no communication;
- ``torch``: the same shard through ``torch.nn.BatchNorm2d``;
- ``collectives``: the two collectives of a layer's every call alone, with SyncBatchNorm's
  sizes (the moments' all_gather of 2C + 2 float64, the all_reduce of 2C; the header of a
  layer's first call falls in the warm-up).

The headline is the per-round ratio ``(sync - collectives) / local``: what synchronizing costs
beyond the communication itself. Every process runs the same fixed number of rounds (its
collectives must meet the others'), with a barrier before each measurement so that all start
together; process 0's times are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

from . import _measure as M
from ._console import console, table

KINDS = ("sync", "local", "torch", "collectives")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The options only this mode reads."""
    group.add_argument("--processes", type=int, default=2,
                       help="gloo processes in the group (default 2); --threads is split "
                            "between them")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(c: int, world: int, device):
    """SyncBatchNorm's collectives for C channels, alone: the callable that runs them."""
    import torch
    import torch.distributed as dist

    moments = torch.zeros(2 * c + 2, dtype=torch.float64, device=device)
    sums = torch.zeros(2 * c, dtype=torch.float64, device=device)

    def run() -> None:
        table = torch.empty((world, 2 * c + 2), dtype=torch.float64, device=device)
        dist.all_gather(list(table.unbind(0)), moments)
        dist.all_reduce(sums)
    return run


def _case(shape, layout: str, rank: int, world: int, config: dict) -> dict[str, list]:
    """Per-round seconds of each kind on one shard shape (every process runs it alike)."""
    import torch
    import torch.distributed as dist

    from ..torch import BatchNorm2d, SyncBatchNorm

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(shape, generator=g).to(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(memory_format=fmt)
    c = shape[1]
    layers = {"sync": SyncBatchNorm(c), "local": BatchNorm2d(c), "torch": torch.nn.BatchNorm2d(c)}
    collectives = _collectives(c, world, x.device)

    def measure(kind: str) -> float:
        x.grad = None
        dist.barrier()  # every process starts the measurement together
        t0 = time.perf_counter()
        if kind == "collectives":
            collectives()
        else:
            layers[kind](x).backward(dy)
        return time.perf_counter() - t0

    for _ in range(config["warmup"]):
        for kind in KINDS:
            measure(kind)
    times: dict[str, list] = {k: [] for k in KINDS}
    for r in range(config["rounds"]):
        for kind in KINDS if r % 2 == 0 else reversed(KINDS):
            times[kind].append(measure(kind))
    return times


def _worker(rank: int, world: int, port: int, config: dict) -> None:
    import datetime

    import numba
    import torch
    import torch.distributed as dist

    numba.set_num_threads(config["threads"])
    torch.set_num_threads(config["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        results = [dict(shape=shape, count=count, layout=layout,
                        times=_case(shape, layout, rank, world, config))
                   for shape, count, layout in config["cases"]]
        if rank == 0:
            with open(config["out"], "w") as fh:
                json.dump(results, fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # torch's gloo teardown can abort at interpreter exit after all work is done; leave
    # without it (the results are written)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(args) -> int:
    """Time SyncBatchNorm against local batch norm on each shape; print and write the rows."""
    import torch.multiprocessing as mp

    from .networks import resnet50_shapes

    world = args.processes
    if world < 2:
        console("--processes must be at least 2")
        return 2
    batch, image = args.batch or 8, args.image or 128
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    rounds = args.reps or (5 if args.quick else 10)
    threads = max(1, args.threads // world)
    shapes = [(s, n) for s, n in resnet50_shapes(batch, image)
              if not args.only or args.only in "x".join(map(str, s))]
    if not shapes:
        console(f"no shape matches --only {args.only!r}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(cases=[(list(s), n, lay) for lay in layouts for s, n in shapes],
                      threads=threads, warmup=1 if args.quick else 2, rounds=rounds,
                      out=os.path.join(tmp, "rank0.json"))
        console(f"timing {len(config['cases'])} cases on {world} gloo processes of "
                f"{threads} thread(s), {rounds} rounds each...")
        mp.start_processes(_worker, args=(world, _free_port(), config), nprocs=world,
                           start_method="spawn")
        with open(config["out"]) as fh:
            results = json.load(fh)
    rows = _rows(results, world, threads)
    _print(rows, world, threads, batch, image)
    if args.csv:
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def _rows(results: list[dict], world: int, threads: int) -> list[dict]:
    """One row per case, plus a network total per layout (the per-shape medians weighted by
    how many layers have that shape)."""
    resolution = M.timer_resolution()
    rows = []
    totals: dict[str, dict] = {}
    for res in results:
        t = res["times"]
        beyond = [(s - c) / loc for s, c, loc in
                  zip(t["sync"], t["collectives"], t["local"], strict=True)]
        ratio = M.summarize(beyond)
        vs_torch = M.summarize(M.ratios(t["sync"], t["torch"]))
        med = {k: M.summarize(v) for k, v in t.items()}
        verdict = M.combine([
            *(M.judge_times(s, interval=s.min, resolution=resolution) for s in med.values()),
            M.judge_ratios(ratio, what="(sync - collectives) / local ratio")])
        shape = "x".join(map(str, res["shape"]))
        rows.append(dict(
            mode="sync", shape=shape, layers=res["count"], layout=res["layout"],
            dtype="float32", processes=world, threads_per_process=threads, reps=ratio.n,
            **{f"{k}_ms": med[k].median * 1e3 for k in KINDS},
            sync_spread=med["sync"].spread, beyond_collectives_ratio=ratio.median,
            ratio_spread=ratio.spread, sync_over_torch=vs_torch.median)
            | M.as_fields(verdict) | dict(device=M.device(), versions=M.versions()))
        total = totals.setdefault(res["layout"], {k: 0.0 for k in KINDS} | {"verdicts": []})
        for k in KINDS:
            total[k] += res["count"] * med[k].median
        total["verdicts"].append(verdict)
    for layout, total in totals.items():
        beyond = (total["sync"] - total["collectives"]) / total["local"]
        rows.append(dict(
            mode="sync", shape="total", layers=sum(r["layers"] for r in rows
                                                    if r["layout"] == layout),
            layout=layout, dtype="float32", processes=world, threads_per_process=threads,
            reps=rows[0]["reps"], **{f"{k}_ms": total[k] * 1e3 for k in KINDS},
            sync_spread=float("nan"), beyond_collectives_ratio=beyond,
            ratio_spread=float("nan"), sync_over_torch=total["sync"] / total["torch"])
            | M.as_fields(M.total_verdict(total["verdicts"], "shapes"))
            | dict(device=M.device(), versions=M.versions()))
    return rows


def _print(rows, world, threads, batch, image) -> None:
    console(f"batchnorm bench --sync: SyncBatchNorm forward + backward on {world} gloo "
            f"processes ({threads} thread(s) each), each holding a {batch}x...x{image}-image "
            f"shard of ResNet-50's BN shapes, float32; {M.device()}; {M.versions()}")
    console("ms = median per call through autograd; collectives = the layer's two collectives "
            "alone; beyond = median over rounds of (sync - collectives) / local; total = "
            "the shapes weighted by their number of layers")
    body = [[r["shape"], r["layout"], str(r["layers"]),
             *(f"{r[f'{k}_ms']:.3f}" for k in KINDS), f"{r['beyond_collectives_ratio']:.2f}",
             f"{r['sync_over_torch']:.2f}", M.from_fields(r).brief()] for r in rows]
    table("SyncBatchNorm", ["shape", "layout", "layers", "sync ms", "local ms", "torch ms",
                            "collectives ms", "beyond", "sync/torch", "status"], body)
