"""A training step under ``torch.compile``: torch.nn's batch norm against ours, interleaved.

The network is ``batchnorm.cli.bench_train.build_net`` (a small ResNet-style model). Each
variant is compiled with Inductor (the default backend) and warmed up, then the variants'
steps (forward, cross-entropy, backward, SGD) are timed in turn, round after round, with the
same batch and thread count; the report is each variant's median and quartile step time.

Variants: ``torch`` (torch.nn's batch norm, compiled), ``ours`` (batchnorm.torch, compiled:
the compiler traces and fuses batchnorm.torch._decomp), ``ours-kernels`` (compiled with
``COMPILE_DECOMPOSITION = False``: our kernels as opaque custom ops), and the eager runs of
torch.nn and ours for reference.

Usage: ``python benchmarks/compiled_step.py [--batch 32] [--size 32] [--width 32]
[--blocks 2] [--steps 30] [--threads 2] [--channels-last]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import batchnorm.torch as bnt  # noqa: E402
from batchnorm.cli.bench_train import _step, build_net  # noqa: E402
from batchnorm.torch import function  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)

    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    base = build_net(args.width, args.blocks).to(memory_format=fmt).train()
    # (name, model, compiled?, decomposition under the compiler?)
    variants = [("torch", copy.deepcopy(base), True, True),
                ("ours", bnt.convert_model(copy.deepcopy(base)), True, True),
                ("ours-kernels", bnt.convert_model(copy.deepcopy(base)), True, False),
                ("torch eager", copy.deepcopy(base), False, True),
                ("ours eager", bnt.convert_model(copy.deepcopy(base)), False, True)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn((args.batch, 3, args.size, args.size), generator=g).to(memory_format=fmt)
    target = torch.randint(0, 10, (args.batch,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    runs = []
    for name, model, compiled, decompose in variants:
        function.COMPILE_DECOMPOSITION = decompose
        t0 = time.perf_counter()
        fn = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            _step(fn, opt, x, target, loss_fn)
        print(f"{name:13s} ready in {time.perf_counter() - t0:5.1f} s", flush=True)
        runs.append((name, fn, opt, decompose, []))
    for _ in range(args.steps):
        for _name, fn, opt, decompose, times in runs:
            function.COMPILE_DECOMPOSITION = decompose  # a guard: no recompilation
            t0 = time.perf_counter()
            _step(fn, opt, x, target, loss_fn)
            times.append(time.perf_counter() - t0)
    function.COMPILE_DECOMPOSITION = True
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.size}x{args.size}, width {args.width}, {args.blocks} blocks, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {args.steps} rounds")
    ref = statistics.median(runs[0][4])
    for name, _, _, _, times in runs:
        q = statistics.quantiles(times, n=4)
        med = statistics.median(times)
        print(f"  {name:13s} median {med * 1e3:8.2f} ms  (quartiles {q[0] * 1e3:.2f} - "
              f"{q[2] * 1e3:.2f})  torch compiled / this: {ref / med:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
