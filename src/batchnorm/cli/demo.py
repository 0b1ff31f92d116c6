"""``batchnorm demo``: train a small CNN on scikit-learn's 8x8 digits three ways.

1. with ``batchnorm.torch`` layers (a ``torch.nn`` model passed through ``convert_model``),
2. with ``torch.nn`` batch norm (the same initial weights),
3. without batch norm.

All three train independently from the same initial weights and batch order. The time per
epoch is fair: the models step in turn on each batch, in an order that rotates from step to
step, with the same thread count for PyTorch and Numba; beside the whole step, hooks time the
batch-norm layers alone (``_measure.ModuleTimer``), the figure that compares our layers with
torch.nn's. After the timed steps a probe copy with our layers is loaded with the torch.nn
model's weights and buffers from before the step and run on the same batch (independent
trajectories drift apart chaotically, so they are compared on identical weights): its loss,
parameter gradients and updated running statistics must match torch.nn's within float32
tolerance. Where they do not, a float64 copy of the model decides:
a ReLU or max-pool input within rounding of its kink can go either way in float32, and the
step passes if our layers are at least as close to float64 as torch.nn's. The demo prints the
largest differences and exits with status 1 on a mismatch. The digits ship inside
scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np

from . import _measure

# Largest difference allowed between our layers and torch.nn's on identical weights, relative
# to each tensor's largest magnitude: float32 with a different summation order.
AGREEMENT_RTOL = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batch order")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both PyTorch and Numba (default: PyTorch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the training set (for smoke tests)")
    parser.add_argument("--plot", default="demo.png", metavar="PATH",
                        help="where to save the loss curves (PNG, default demo.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--csv", metavar="PATH",
                        help="also write the per-step training losses of the three models")


def load_digits_split(seed: int, quick: bool):
    """The 1797 digits as float32 (N, 1, 8, 8) in [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    if quick:
        train = train[: len(train) // 4]
    return x[train], y[train], x[test], y[test]


def make_cnn(with_bn: bool):
    """conv-BN-ReLU x3 with a residual, then Linear-BatchNorm1d-ReLU-Linear."""
    import torch.nn as nn

    def norm2d(c):
        return nn.BatchNorm2d(c) if with_bn else nn.Identity()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=not with_bn),
                                      norm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=not with_bn),
                                       norm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, padding=1, bias=not with_bn),
                                       norm2d(16))
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64),
                                      nn.BatchNorm1d(64) if with_bn else nn.Identity(),
                                      nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            h = self.stem(x)
            h = nn.functional.relu(h + self.block(h))   # residual connection
            return self.head(self.pool(h))

    return Net()


def _evaluate(model, x, y):
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def run(args) -> int:
    """Train the three models in lock step; print the table; save the plot."""
    import numba
    import torch

    from ..torch import convert_model
    from ._console import console, progress_bar, table

    if args.epochs < 1 or args.batch < 2:
        console("--epochs must be >= 1 and --batch >= 2")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in load_digits_split(args.seed, args.quick))

    torch.manual_seed(args.seed)
    reference_net = make_cnn(with_bn=True)
    torch.manual_seed(args.seed)
    plain_net = make_cnn(with_bn=False)
    models = {
        "batchnorm.torch": convert_model(copy.deepcopy(reference_net)),
        "torch.nn BN": reference_net,
        "no BN": plain_net,
    }
    probe = convert_model(copy.deepcopy(reference_net))
    exact = copy.deepcopy(reference_net).double()     # the float64 referee
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for k, m in models.items()}
    losses = {k: [] for k in models}
    seconds = {k: [] for k in models}       # per step: the whole step
    bn_seconds = {k: [] for k in models}    # per step: inside the batch-norm layers
    timers = {k: _measure.ModuleTimer(_measure.bn_modules(m)) for k, m in models.items()}
    names = list(models)
    worst = 0.0       # largest relative difference, probe vs torch.nn, over all steps
    referee = []      # (ours vs float64, torch.nn vs float64) where the referee was asked

    n = len(xtr)
    steps = (n // args.batch) * args.epochs     # drop the last partial batch: BN needs > 1
    # Untimed first calls on throwaway copies: Numba loads its compiled kernels, PyTorch
    # its own, before the first timed step.
    for name, model in models.items():
        _loss_and_grads(probe if name == "batchnorm.torch" else copy.deepcopy(model),
                        xtr[:args.batch], ytr[:args.batch])
    gen = torch.Generator().manual_seed(args.seed)
    with progress_bar("training 3 models", total=steps) as advance:
        for _epoch in range(args.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(n // args.batch):
                idx = perm[i * args.batch:(i + 1) * args.batch]
                xb, yb = xtr[idx], ytr[idx]
                state = copy.deepcopy(models["torch.nn BN"].state_dict())
                step = len(losses[names[0]])
                for name in names[step % 3:] + names[:step % 3]:  # rotate who goes first
                    model, timer = models[name], timers[name]
                    timer.reset()
                    t0 = time.perf_counter()
                    opts[name].zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    opts[name].step()
                    seconds[name].append(time.perf_counter() - t0)
                    bn_seconds[name].append(timer.forward + timer.backward)
                    losses[name].append(loss.item())
                probe.load_state_dict(state)
                probe_loss = _loss_and_grads(probe, xb, yb)
                diff = _difference(probe, probe_loss, models["torch.nn BN"],
                                   losses["torch.nn BN"][-1])
                if diff > AGREEMENT_RTOL:
                    exact.load_state_dict(state)
                    _loss_and_grads(exact, xb.double(), yb)
                    referee.append((_grad_distance(probe, exact),
                                    _grad_distance(models["torch.nn BN"], exact)))
                    if referee[-1][0] <= referee[-1][1]:   # ours is the closer one
                        diff = 0.0
                worst = max(worst, diff)
                advance()

    rows = []
    per_epoch = n // args.batch
    for name, model in models.items():
        test_loss, test_acc = _evaluate(model, xte, yte)
        step, bn = (_measure.summarize(seconds[name]).median,
                    _measure.summarize(bn_seconds[name]).median)
        rows.append([name, f"{100 * test_acc:.1f} %", f"{test_loss:.4f}",
                     f"{np.mean(losses[name][-per_epoch:]):.4f}",
                     f"{1000 * per_epoch * step:.0f} ms",
                     f"{1000 * per_epoch * bn:.1f} ms" if timers[name].modules else "-"])
    table(f"8x8 digits: {n} training and {len(xte)} test images, {args.epochs} epochs, "
          f"batch {args.batch}, {threads} threads (PyTorch and Numba); time = median step "
          f"x {per_epoch} steps",
          ["model", "test accuracy", "test loss", "last-epoch train loss", "time / epoch",
           "BN layers / epoch"], rows)
    ratio = _measure.summarize(_measure.ratios(bn_seconds["batchnorm.torch"],
                                               bn_seconds["torch.nn BN"]))
    verdict = _measure.judge_ratios(ratio, target=0.1)
    console(f"time in the batch-norm layers (forward + backward, from hooks): ours "
            f"{ratio.median:.2f}x torch.nn's (< 1: ours faster; median over {ratio.n} steps "
            f"of the per-step ratio, spread {ratio.spread:.0%}, {verdict}); the models took "
            "turns on every batch")
    agree = worst <= AGREEMENT_RTOL
    console(f"batchnorm.torch vs torch.nn on identical weights at each of {steps} steps, largest "
            f"relative difference in loss, gradients and running statistics: {worst:.1e} -> "
            f"{'agree' if agree else 'DISAGREE'} within float32 tolerance ({AGREEMENT_RTOL:g})")
    for ours, theirs in referee:
        console(f"  a step differed by more: against a float64 copy, our gradients are off by "
                f"{ours:.1e}, torch.nn's by {theirs:.1e} (a kink decided differently)")
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write("step," + ",".join(losses) + "\n")
            for i, row in enumerate(zip(*losses.values(), strict=True)):
                fh.write(f"{i + 1}," + ",".join(f"{v:.6g}" for v in row) + "\n")
        console(f"wrote {steps} rows of losses to {args.csv}")
    if not args.no_plot:
        _plot(losses, args.plot, n // args.batch)
        console(f"loss curves saved to {args.plot}")
    return 0 if agree else 1


def _loss_and_grads(model, x, y):
    model.zero_grad()
    from torch.nn.functional import cross_entropy

    loss = cross_entropy(model(x), y)
    loss.backward()
    return loss


def _grad_distance(model, exact) -> float:
    """Relative L2 distance of all of model's gradients from those of the float64 copy."""
    ref = dict(exact.named_parameters())
    diff = sum(((p.grad.double() - ref[n].grad) ** 2).sum() for n, p in model.named_parameters())
    return (diff / sum((q.grad ** 2).sum() for q in ref.values())).sqrt().item()


def _difference(probe, probe_loss, model, loss: float) -> float:
    """Largest relative difference between the probe (our layers) and the torch.nn model.

    Loss and running statistics are compared element-wise. Gradients are compared as one
    vector in the L2 norm: a ReLU or max-pool input within rounding of its kink may go either
    way in two float32 implementations, which moves a few gradient entries by a whole
    sample's contribution without either being wrong.
    """
    worst = abs(probe_loss.item() - loss) / max(abs(loss), 1e-12)
    theirs = dict(model.named_parameters())
    diff = sum(((p.grad - theirs[n].grad) ** 2).sum() for n, p in probe.named_parameters())
    norm = sum((q.grad ** 2).sum() for q in theirs.values())
    worst = max(worst, (diff / max(norm, 1e-30)).sqrt().item())
    theirs = dict(model.named_buffers())
    for name, b in probe.named_buffers():
        if b.is_floating_point():
            q = theirs[name]
            worst = max(worst, (b - q).abs().max().item() / max(q.abs().max().item(), 1e-12))
    return worst


def _plot(losses: dict, path: str, steps_per_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, curve in losses.items():
        ax.plot(np.arange(1, len(curve) + 1) / steps_per_epoch, curve, label=name,
                linestyle="--" if name == "torch.nn BN" else "-", linewidth=1.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title("8x8 digits: with and without batch norm")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
