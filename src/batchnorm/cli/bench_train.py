"""Training-step benchmark: a small ResNet-style network with our batch norms vs torch.nn's.

One step is forward, cross-entropy, backward and an SGD update. Both models start from the
same weights, use the same thread count and the same batches, and are timed alternately so
that machine noise hits both alike; the report is the median step time of each and their ratio
(> 1 means ours is faster). Outputs are allocated fresh by both sides on every step.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import sys
import time

from .networks import build_net


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the training-step benchmark."""
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--size", type=int, default=32, help="image height = width (default 32)")
    parser.add_argument("--width", type=int, default=32, help="channels of the network")
    parser.add_argument("--blocks", type=int, default=2, help="residual blocks")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both models (default: torch's current)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC activations")
    parser.add_argument("--csv", default=None, help="append one row per model to this CSV")


def _step(model, opt, x, target, loss_fn):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), target)
    loss.backward()
    opt.step()
    return loss


def run(args: argparse.Namespace) -> int:
    """Time both models; print the medians and the ratio; optionally append CSV rows."""
    import torch

    from .. import backends
    from ..torch import convert_model
    from ._console import console

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    theirs = build_net(args.width, args.blocks).to(memory_format=fmt).train()
    ours = convert_model(copy.deepcopy(theirs))
    models = {"torch": theirs, "batchnorm": ours}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randn(shape, generator=g).to(memory_format=fmt)
    target = torch.randint(0, 10, (args.batch,), generator=g)

    times = {k: [] for k in models}
    for i in range(args.warmup + args.steps):
        for name, model in models.items():
            t0 = time.perf_counter()
            _step(model, opts[name], x, target, loss_fn)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["torch"] / med["batchnorm"]
    backend = backends.select("auto", x.numpy()).NAME
    console(f"training step, batch {shape}, width {args.width}, {args.blocks} blocks, "
            f"{'channels_last' if args.channels_last else 'NCHW'}, "
            f"{torch.get_num_threads()} threads, backend {backend!r}")
    for name, t in med.items():
        spread = statistics.pstdev(times[name]) * 1e3
        console(f"  {name:>9}: median {t * 1e3:8.2f} ms  (stdev {spread:.2f} ms, "
                f"{args.steps} steps)")
    console(f"  speed-up of batchnorm over torch.nn: {ratio:.3f}x")
    if args.csv:
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            if f.tell() == 0:
                w.writerow(["provider", "pass", "shape", "layout", "threads", "backend",
                            "median_s", "stdev_s", "ratio_to_torch", "device", "torch"])
            for name, t in med.items():
                w.writerow([name, "train_step", "x".join(map(str, shape)),
                            "nhwc" if args.channels_last else "nchw", torch.get_num_threads(),
                            backend if name == "batchnorm" else "native", f"{t:.6g}",
                            f"{statistics.pstdev(times[name]):.3g}",
                            f"{med['torch'] / t:.4f}", platform.processor() or "cpu",
                            torch.__version__])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
