"""Per-layer timing of what users run: ``BatchNorm2d`` through autograd against torch.nn's.

For every BN shape of ResNet-50 (``batchnorm.cli.networks.resnet50_shapes``) and a tiny
(8, 16, 8, 8) probe, one ``batchnorm.torch.BatchNorm2d`` and one ``torch.nn.BatchNorm2d`` with
the same parameters are timed alternately (ours, theirs, ours, ...) in one process, with the
same thread count for Numba and PyTorch. Outputs are allocated fresh by both on every call.

Passes:

* ``train``: forward + backward through autograd (``y = bn(x); y.backward(dy)``).
* ``eval``: the eval-mode forward under ``torch.no_grad()``.

With ``--conv`` each BN sits between torch operations as in a network: a 1x1 convolution
makes its input and a ReLU follows it; only the BN's own forward and backward are timed
(wall clock around the forward call; the backward from a hook on the BN output's gradient to
a hook on its input's gradient). The convolution and the ReLU's backward run just before
the BN forward and backward, so each BN call starts right after a parallel region of
PyTorch's thread pool, as it does inside a network.

Reported per shape: the median time of each side and the ratio torch / ours (> 1: ours is
faster); the network total weights each shape by its number of layers.

Usage: ``python benchmarks/user_path.py [--batch 8 --image 128] [--layout nchw|nhwc|both]
[--pass train|eval|both] [--conv] [--reps 15] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import batchnorm.torch as bnt  # noqa: E402
from batchnorm.cli.networks import resnet50_shapes  # noqa: E402

TINY = ((8, 16, 8, 8), 1)
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _pair(c: int, fmt) -> dict[str, torch.nn.Module]:
    theirs = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
        theirs.running_var.uniform_(0.5, 2.0)
    ours = bnt.BatchNorm2d(c)
    ours.load_state_dict(theirs.state_dict())
    return {"ours": ours, "torch": theirs}


def _plain(bn, x, dy, training: bool) -> float:
    if not training:
        with torch.no_grad():
            t0 = time.perf_counter()
            bn(x)
            return time.perf_counter() - t0
    t0 = time.perf_counter()
    bn(x).backward(dy)
    return time.perf_counter() - t0


def _in_network(bn, conv, x, dy, training: bool) -> float:
    """BN time between a 1x1 convolution and a ReLU (forward; backward from hooks)."""
    if not training:
        with torch.no_grad():
            h = conv(x)
            t0 = time.perf_counter()
            y = bn(h)
            t1 = time.perf_counter()
            y.relu_()
        return t1 - t0
    marks = {}
    h = conv(x)
    h.register_hook(lambda g: marks.__setitem__("out", time.perf_counter()))
    t0 = time.perf_counter()
    y = bn(h)
    t1 = time.perf_counter()
    y.register_hook(lambda g: marks.__setitem__("in", time.perf_counter()))
    y.relu().backward(dy)
    return (t1 - t0) + (marks["out"] - marks["in"])


def measure(shape, fmt, training: bool, conv: bool, reps: int, warmup: int = 3):
    """{"ours": [s, ...], "torch": [s, ...]} for one shape, the two sides interleaved."""
    g = torch.Generator().manual_seed(0)
    n, c, hh, ww = shape
    pair = _pair(c, fmt)
    for m in pair.values():
        m.train(training)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(memory_format=fmt)
    dy = torch.randn(shape, generator=g).to(memory_format=fmt)
    if conv:
        layer = torch.nn.Conv2d(c, c, 1, bias=False).to(memory_format=fmt)
        x.requires_grad_(training)

        def run(bn):
            return _in_network(bn, layer, x, dy, training)
    else:
        x.requires_grad_(training)

        def run(bn):
            return _plain(bn, x, dy, training)

    times = {k: [] for k in pair}
    for i in range(warmup + reps):
        for name, bn in pair.items():
            t = run(bn)
            if i >= warmup:
                times[name].append(t)
        x.grad = None
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, default=128)
    p.add_argument("--layout", default="both", choices=["nchw", "nhwc", "both"])
    p.add_argument("--pass", dest="passes", default="both", choices=["train", "eval", "both"])
    p.add_argument("--conv", action="store_true", help="a convolution before, a ReLU after")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny-only", action="store_true")
    args = p.parse_args(argv)

    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    shapes = [TINY] if args.tiny_only else [*resnet50_shapes(args.batch, args.image), TINY]
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    passes = ["train", "eval"] if args.passes == "both" else [args.passes]
    print(f"torch {torch.__version__}, numba {numba.__version__}, {args.threads} threads, "
          f"batch {args.batch}, {args.image}x{args.image}, conv before: {args.conv}, "
          f"median of {args.reps}")
    for pas in passes:
        for lay in layouts:
            tot = {"ours": 0.0, "torch": 0.0}
            worst = (float("inf"), None)
            print(f"\n{pas} {lay}: shape, layers, ours ms, torch ms, torch/ours")
            for shape, count in shapes:
                t = measure(shape, LAYOUTS[lay], pas == "train", args.conv, args.reps)
                med = {k: statistics.median(v) for k, v in t.items()}
                ratio = med["torch"] / med["ours"]
                print(f"  {str(shape):20} {count:3d} {med['ours'] * 1e3:9.3f} "
                      f"{med['torch'] * 1e3:9.3f} {ratio:6.2f}x")
                if shape != TINY[0]:
                    for k in tot:
                        tot[k] += count * med[k]
                worst = min(worst, (ratio, shape))
            if not args.tiny_only:
                print(f"  total (53 layers): ours {tot['ours'] * 1e3:.2f} ms, torch "
                      f"{tot['torch'] * 1e3:.2f} ms, {tot['torch'] / tot['ours']:.2f}x; "
                      f"worst {worst[0]:.2f}x at {worst[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
