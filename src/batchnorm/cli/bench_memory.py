"""``batchnorm bench --memory``: the activation memory autograd holds through a stack of
BN-LeakyReLU layers, with the memory-saving mode and without.

The stack is ``--depth`` (20) blocks of a depthwise 3x3 convolution, then batch norm, then
LeakyReLU (slope 0.01), on ``--batch`` x 64 x ``--image`` x ``--image`` input (32 x 64 x 56 x
56 by default). The convolution is there because the memory-saving mode saves memory only
where something keeps the BN-act output apart from its input, as in a network: a
convolution keeps its own input (the previous block's output) and writes a fresh output,
which the memory-saving layer then overwrites. (Two memory-saving layers in a row would each
overwrite what the other saved, and a stack of BN-LeakyReLU alone holds one tensor per layer
in torch.nn too, with LeakyReLU(inplace=True).)

Providers, each on the same input and weights:

- ``torch.nn``: BatchNorm2d then LeakyReLU, as usually written (the activation saves its
  input): three tensors a block (the convolution's input and output, the BN output);
- ``torch.nn inplace``: BatchNorm2d then LeakyReLU(inplace=True), torch.nn's most frugal
  form: two a block;
- ``ours``: BatchNormAct2d(leaky_relu), out of place: two a block (x and y);
- ``ours inplace``: BatchNormAct2d(leaky_relu, inplace=True), y written over the
  convolution's output and saved alone: one a block.

What is measured: the bytes of the distinct storages that autograd's saved tensors hold at the
end of the forward (``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for
backward, counted once per storage; the peak, since nothing is released before backward).
``--rss`` also runs each provider's forward + backward in a fresh process and reports its peak
resident memory (everything: weights, gradients, allocator slack). The backward runs in both,
and each provider's stack is checked to compute torch.nn's output and input gradient (in
float64, on a small input: see :func:`same_function`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from ._console import console, table

PROVIDERS = ("torch.nn", "torch.nn inplace", "ours", "ours inplace")
TARGET = 0.40  # the memory-saving mode's saving against torch.nn's most frugal form
CHANNELS = 64


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The options only this mode reads."""
    group.add_argument("--depth", type=int, default=20,
                       help="memory: blocks (depthwise conv, BN, LeakyReLU) in the stack "
                            "(default 20)")
    group.add_argument("--rss", action="store_true",
                       help="memory: also each provider's peak resident memory over forward "
                            "+ backward, each in a fresh process")


def build(provider: str, depth: int, dtype, memory_format):
    """The stack of ``provider`` (all providers get the same initial weights)."""
    import torch
    from torch import nn

    from ..torch import BatchNormAct2d

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers.append(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS, bias=False))
        if provider.startswith("ours"):
            layers.append(BatchNormAct2d(CHANNELS, activation="leaky_relu",
                                         negative_slope=0.01, inplace="inplace" in provider))
        else:
            layers += [nn.BatchNorm2d(CHANNELS),
                       nn.LeakyReLU(0.01, inplace="inplace" in provider)]
    return nn.Sequential(*layers).to(dtype=dtype, memory_format=memory_format)


def held_bytes(model, x) -> tuple[int, int, object]:
    """(bytes, storages) that autograd holds at the end of ``model(x)``'s forward, and the
    output."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return sum(storages.values()), len(storages), y


def _input(batch: int, image: int, dtype, memory_format):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, image, image, generator=g)
    return x.to(dtype=dtype, memory_format=memory_format).requires_grad_()


def measure(provider, batch, image, depth, dtype, memory_format):
    """(held bytes, storages, output, input gradient) of one provider."""
    model = build(provider, depth, dtype, memory_format)
    x = _input(batch, image, dtype, memory_format)
    nbytes, count, y = held_bytes(model, x)
    y.backward(_gradient(y))
    return nbytes, count, y.detach(), x.grad


def same_function(provider, depth, memory_format) -> bool:
    """Whether ``provider``'s stack computes torch.nn's output and input gradient, checked
    in float64 on a small input (through 20 blocks the float32 input gradient carries a few
    percent of rounding error, torch.nn's as much as ours: batch norm's backward cancels)."""
    import torch

    results = [measure(p, 4, 8, depth, torch.float64, memory_format)[2:]
               for p in ("torch.nn", provider)]
    return all(torch.allclose(a, e, rtol=1e-9, atol=1e-9 * float(e.abs().max()))
               for a, e in zip(*results, strict=True))


def _gradient(y):
    """A fixed random output gradient: with a constant one, batch norm's backward cancels
    almost everything and the float32 comparison of the input gradients would measure the
    cancellation, not the providers."""
    import torch

    g = torch.Generator().manual_seed(2)
    return torch.empty_like(y).copy_(torch.randn(y.shape, generator=g))  # y's memory format


def _rss_child(provider, batch, image, depth, dtype_name, layout) -> None:
    """Run in a fresh process: forward + backward, print the peak resident memory (MB)."""
    import resource

    import torch

    dtype = getattr(torch, dtype_name)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    model = build(provider, depth, dtype, fmt)
    x = _input(batch, image, dtype, fmt)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y = model(x)
    y.backward(_gradient(y))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024}))


def _rss(provider, args, layout) -> dict:
    cmd = [sys.executable, "-m", "batchnorm.cli.bench_memory", provider, str(args.batch or 32),
           str(args.image or 56), str(args.depth), args.dtype, layout, str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> int:
    import torch

    from . import _measure as M

    if args.depth < 1:
        console("--depth must be at least 1")
        return 2
    batch, image = args.batch or 32, args.image or 56
    dtype = getattr(torch, args.dtype)
    layouts = ["nchw", "nhwc"] if args.layout == "both" else [args.layout]
    tensor_bytes = batch * CHANNELS * image * image * dtype.itemsize
    console(f"batchnorm bench --memory: {args.depth} x (depthwise conv 3x3, BN, LeakyReLU) on "
            f"{batch}x{CHANNELS}x{image}x{image} {args.dtype} (one activation "
            f"{tensor_bytes / 2**20:.1f} MiB); {M.device()}; {M.versions()}")
    console("held = bytes of the distinct storages autograd's saved tensors hold at the end of "
            "the forward (saved-tensor hooks)")
    # The fresh processes first: a child's peak resident memory starts at its parent's, which
    # is small only before the measurements below.
    rss = {(lay, p): _rss(p, args, lay) for lay in layouts for p in PROVIDERS} if args.rss \
        else {}
    rows, failed = [], False
    for layout in layouts:
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        results = {p: measure(p, batch, image, args.depth, dtype, fmt)[:2] for p in PROVIDERS}
        base = results["torch.nn"]
        for p, (nbytes, count) in results.items():
            same = same_function(p, args.depth, fmt)
            failed |= not same
            row = dict(mode="memory", provider=p, layout=layout, batch=batch, image=image,
                       depth=args.depth, dtype=args.dtype, threads=args.threads,
                       held_mib=nbytes / 2**20, storages=count,
                       activations_per_block=nbytes / tensor_bytes / args.depth,
                       vs_torch_nn=nbytes / base[0],
                       vs_torch_nn_inplace=nbytes / results["torch.nn inplace"][0],
                       matches_torch_nn=same, device=M.device(), versions=M.versions())
            row |= rss.get((layout, p), {})
            rows.append(row)
    body = [[r["layout"], r["provider"], f"{r['held_mib']:.1f}", str(r["storages"]),
             f"{r['activations_per_block']:.2f}", f"{r['vs_torch_nn']:.2f}",
             f"{r['vs_torch_nn_inplace']:.2f}"]
            + ([f"{r['peak_mb']:.0f}"] if args.rss else [])
            + ["yes" if r["matches_torch_nn"] else "NO"] for r in rows]
    table("activation memory held by autograd",
          ["layout", "provider", "held MiB", "storages", "activations / block",
           "vs torch.nn", "vs torch.nn inplace"] + (["peak RSS MB"] if args.rss else [])
          + ["same values"], body)
    for layout in layouts:
        ours = next(r for r in rows if r["layout"] == layout and r["provider"] == "ours inplace")
        saving = 1 - ours["vs_torch_nn_inplace"]
        console(f"{layout}: the memory-saving mode holds {saving:.0%} less than torch.nn with "
                f"LeakyReLU(inplace=True) and {1 - ours['vs_torch_nn']:.0%} less than with "
                f"LeakyReLU(); target at least {TARGET:.0%} less: "
                + ("met" if saving >= TARGET else "NOT met"))
    if failed:
        console("a provider's output or input gradient differs from torch.nn's (float64 "
                "check): the figures compare different computations")
    if args.csv:
        M.write_csv(args.csv, rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    return 1 if failed else 0


if __name__ == "__main__":  # the --rss child: provider batch image depth dtype layout threads
    import torch as _torch

    _torch.set_num_threads(int(sys.argv[7]))
    _rss_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
               sys.argv[6])
