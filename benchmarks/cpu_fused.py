"""The CPU backend's fused forms against PyTorch's separate operations, and plain batch norm
against another source tree's CPU backend: interleaved in one process.

``fused`` (the default): BN + ReLU and BN + add + ReLU, forward (training, running
statistics updated) then backward, on ResNet-50's BN shapes (``resnet50_shapes``, default
batch 8 at 128x128), NCHW and channels-last. Ours: the NumPy API on NumPy views of torch
tensors (``backend="cpu"``, fresh outputs; ``--route torch`` runs ``batchnorm.torch``'s
functional form instead, when it has ``activation=``). PyTorch: ``F.batch_norm``, ``+``
and ``F.relu`` through autograd (``out.backward(dy)``), fresh outputs too. Each pair is
timed in alternating order (a, b, b, a, ...), ``--rounds`` rounds of calls batched to at
least ``--min-ms``; the time of a shape is their median (``--stat best``: the best), the
network total the sum over the 53 layers weighted by their counts. Both sides run
``--threads`` threads.

``--baseline DIR`` instead times plain batch norm (forward training + backward, backend
level, fresh outputs) of this tree's CPU backend against the one in ``DIR/batchnorm``
(a source tree of an earlier commit, e.g. ``git archive <commit> src | tar -x -C DIR`` then
``DIR/src``), on a few ResNet-50 shapes at batches 8 and 32.

Usage: ``python benchmarks/cpu_fused.py [--batch 8] [--image 128] [--threads 2]``
``[--baseline DIR]``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run from a checkout: the package next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

STATS = {"median": statistics.median, "best": min}


def _batched(fn, min_s):
    """A step timing ``fn`` averaged over enough calls to last ``min_s``."""
    fn()
    fn()
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(min_s / max(time.perf_counter() - t0, 1e-7)))

    def step():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    return step


def _pair(a, b, rounds, min_s, stat):
    """Seconds of ``a`` and ``b`` (``stat`` of the rounds), timed in alternating order."""
    sa, sb = _batched(a, min_s), _batched(b, min_s)
    ta, tb = [], []
    for r in range(rounds):
        for which in ((sa, ta), (sb, tb)) if r % 2 == 0 else ((sb, tb), (sa, ta)):
            which[1].append(which[0]())
    return stat(ta), stat(tb)


def _fused_case(shape, layout, form, route):
    """(ours, torch) callables: forward training then backward of one BN (+ add) + ReLU."""
    import torch
    import torch.nn.functional as F

    import batchnorm as bn

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    c = shape[1]

    def tensor():
        return torch.randn(shape, generator=gen).contiguous(memory_format=fmt)

    x, z, dy = tensor(), tensor(), tensor()
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    with_z = form == "add+relu"

    xt, zt = x.clone().requires_grad_(), z.clone().requires_grad_()
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm_t, rv_t = torch.zeros(c), torch.ones(c)

    def theirs():
        pre = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True)
        out = F.relu(pre + zt if with_z else pre)
        out.backward(dy)
        for t in (xt, zt, wt, bt):
            t.grad = None

    if route == "torch":
        import batchnorm.torch as bnt

        xo, zo = x.clone().requires_grad_(), z.clone().requires_grad_()
        wo, bo = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm_o, rv_o = torch.zeros(c), torch.ones(c)

        def ours():
            out = bnt.batch_norm(xo, rm_o, rv_o, wo, bo, training=True, activation="relu",
                                 residual=zo if with_z else None)
            out.backward(dy)
            for t in (xo, zo, wo, bo):
                t.grad = None
        return ours, theirs

    xa, za, dya, wa, ba = (t.numpy() for t in (x, z, dy, w, b))
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    def ours():
        y, s = bn.forward_training(xa, wa, ba, running_mean=rm, running_var=rv,
                                   residual=za if with_z else None, activation="relu",
                                   backend="cpu")
        bn.backward(dya, xa, wa, s, y=y, activation="relu", residual=with_z, backend="cpu")
    return ours, theirs


def fused(args):
    from batchnorm.cli.networks import resnet50_shapes

    print(f"BN + ReLU and BN + add + ReLU, forward training + backward, {args.threads} "
          f"threads, resnet50_shapes({args.batch}, {args.image}), route={args.route}; "
          f"{args.stat} of {args.rounds} interleaved rounds")
    print(f"{'form':9} {'layout':6} {'shape':>20} {'ours ms':>9} {'torch ms':>9} "
          f"{'speed-up':>8}")
    for form in ("relu", "add+relu"):
        for layout in ("nchw", "nhwc"):
            tot_o = tot_t = 0.0
            for shape, count in resnet50_shapes(args.batch, args.image):
                ours, theirs = _fused_case(shape, layout, form, args.route)
                to, tt = _pair(ours, theirs, args.rounds, args.min_ms / 1e3, STATS[args.stat])
                tot_o += count * to
                tot_t += count * tt
                print(f"{form:9} {layout:6} {str(shape):>20} {to * 1e3:9.3f} {tt * 1e3:9.3f} "
                      f"{tt / to:8.2f}")
            print(f"{form:9} {layout:6} {'network total':>20} {tot_o * 1e3:9.2f} "
                  f"{tot_t * 1e3:9.2f} {tot_t / tot_o:8.2f}")


def _load_baseline(path):
    """The CPU backend of another source tree, imported under its own package name."""
    src = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(
        "batchnorm_baseline", src / "batchnorm" / "__init__.py",
        submodule_search_locations=[str(src / "batchnorm")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["batchnorm_baseline"] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module("batchnorm_baseline.backends.cpu")


def _plain_step(mod, x, dy, g, b, lay, rm, rv):
    """Forward training then backward of plain batch norm on backend module ``mod``."""
    def run():
        _, mean, invstd, _ = mod.forward_training(x, g, b, lay, eps=1e-5, momentum=0.1,
                                                  running_mean=rm, running_var=rv)
        mod.backward(dy, x, g, mean, invstd, lay)
    return run


def baseline(args):
    from batchnorm._shapes import resolve_layout
    from batchnorm.backends import cpu

    old = _load_baseline(args.baseline)
    print(f"plain BN forward training + backward, this tree / {args.baseline}, "
          f"{args.threads} threads; {args.stat} of {args.rounds} interleaved rounds")
    print(f"{'layout':6} {'shape':>22} {'new ms':>8} {'old ms':>8} {'old/new':>7}")
    rng = np.random.default_rng(0)
    for batch in (8, 32):
        for layout in ("nchw", "nhwc"):
            for c, hw in ((64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)):
                shape = (batch, c, hw, hw)
                x = rng.standard_normal(shape, dtype=np.float32)
                dy = rng.standard_normal(shape, dtype=np.float32)
                if layout == "nhwc":  # NCHW-shaped, stored channels-last (torch's view)
                    x, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
                             for a in (x, dy))
                lay = resolve_layout(shape, "spatial", 1)
                g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
                rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

                tn, to = _pair(_plain_step(cpu, x, dy, g, b, lay, rm, rv),
                               _plain_step(old, x, dy, g, b, lay, rm, rv), args.rounds,
                               args.min_ms / 1e3, STATS[args.stat])
                print(f"{layout:6} {str(shape):>22} {tn * 1e3:8.3f} {to * 1e3:8.3f} "
                      f"{to / tn:7.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=20.0)
    ap.add_argument("--route", choices=["numpy", "torch"], default="numpy")
    ap.add_argument("--stat", choices=list(STATS), default="median")
    ap.add_argument("--baseline", metavar="DIR", default=None)
    args = ap.parse_args(argv)

    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    if args.baseline:
        baseline(args)
    else:
        fused(args)


if __name__ == "__main__":
    main()
