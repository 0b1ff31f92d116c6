"""``batchnorm bench``: the benchmark modes, their common options, and the thread setting.

Each mode is a flag (``--layers``, the default, ``--kernels``, ``--train``, ``--compile``,
``--memory``, ``--sync``, ``--gpu-plan``) naming a module with ``add_arguments(group)``,
which adds the options only that mode reads, and a function ``run(args) -> exit status``; the
module imports nothing heavy at import time.
Options shared by several modes are declared here once and each mode lists those it reads: an
option given to a mode that does not read it is a usage error (nothing is silently ignored).
To add a mode, add one :data:`MODES` entry.

Every mode times our code and PyTorch's with the same number of threads (``--threads``, 2 by
default, set for both Numba and PyTorch), interleaves what it compares, and reports figures
that cannot be true as invalid measurements (see ``batchnorm.cli._measure``).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

from ._console import console


@dataclass(frozen=True)
class Mode:
    module: str    # one module per mode
    function: str  # its run(args) -> exit status
    help: str
    shared: tuple[str, ...]  # the common options (their dest) this mode reads


MODES = {
    "layers": Mode("batchnorm.cli.bench_layers", "run",
                   "the users' path (default): BatchNorm2d forward + backward through autograd "
                   "vs torch.nn.BatchNorm2d on every ResNet-50 BN shape",
                   ("quick", "reps", "budget", "csv", "layout", "dtype", "passes", "only",
                    "batch", "image")),
    "kernels": Mode("batchnorm.cli.bench_kernels", "run",
                    "the kernels through the NumPy API (preallocated and fresh outputs) vs "
                    "ATen's, with f and f_alg", ("quick", "reps", "budget", "csv", "layout",
                                                 "dtype", "passes", "only", "batch")),
    "train": Mode("batchnorm.cli.bench_train", "run",
                  "time in the BN modules inside a ResNet-50 training step, and the step",
                  ("quick", "reps", "budget", "csv", "layout", "batch", "image")),
    "compile": Mode("batchnorm.cli.bench_compile", "run",
                    "a small ResNet-style training step under torch.compile, ours vs torch.nn's",
                    ("quick", "reps", "budget", "csv", "layout", "batch", "image")),
    "memory": Mode("batchnorm.cli.bench_memory", "run",
                   "activation memory autograd holds through 20 (conv, BN, LeakyReLU) blocks: "
                   "the memory-saving BatchNormAct2d vs torch.nn",
                   ("csv", "layout", "dtype", "batch", "image")),
    "sync": Mode("batchnorm.cli.bench_sync", "run",
                 "SyncBatchNorm forward + backward on gloo processes vs the same shard "
                 "through BatchNorm2d, and the collectives alone",
                 ("quick", "reps", "csv", "layout", "only", "batch", "image")),
    "gpu-plan": Mode("batchnorm.cli.gpu_plan", "run",
                     "the gpu backend's launch plans for ResNet-50 at batch 32 and 256: a "
                     "traffic model (bytes, launches, waves), no GPU needed", ("batch", "csv")),
}
DEFAULT_MODE = "layers"
DEFAULT_THREADS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``batchnorm bench``: a mode flag, the common options, each mode's own."""
    modes = parser.add_argument_group("mode (one of)").add_mutually_exclusive_group()
    for name, mode in MODES.items():
        modes.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                           help=mode.help)
    parser.set_defaults(mode=DEFAULT_MODE)
    common = parser.add_argument_group("common options (each mode reads those that apply)")
    common.add_argument("--quick", action="store_true",
                        help="a smaller run (batch 8, fewer rounds): about 2 minutes or less")
    common.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"threads for both Numba and PyTorch (default {DEFAULT_THREADS})")
    common.add_argument("--reps", type=int, default=None,
                        help="rounds (or training steps) measured at least, per case")
    common.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="about how long the rounds may take: every case gets its --reps "
                             "rounds, and cases share what is left for more rounds while "
                             "their spreads exceed the 5%% target")
    common.add_argument("--csv", default=None, help="write CSV rows to this path")
    common.add_argument("--layout", default="both", choices=["nchw", "nhwc", "both"])
    common.add_argument("--dtype", default="float32",
                        choices=["float16", "bfloat16", "float32", "float64"])
    common.add_argument("--pass", dest="passes", default="all",
                        choices=["fwd", "inf", "bwd", "train", "all"],
                        help="kernels: fwd, inf, bwd; layers: train (forward + backward), "
                             "fwd, inf")
    common.add_argument("--only", default=None, metavar="TEXT",
                        help="only shapes whose NxCxHxW name contains TEXT (e.g. x2048x)")
    common.add_argument("--batch", type=int, default=None,
                        help="batch size (layers: one size, batch x image, instead of 8 x 128 "
                             "and 32 x 224; kernels: 32, --quick 8; train: 8; compile: 32; "
                             "memory: 32; sync: 8 per process)")
    common.add_argument("--image", type=int, default=None,
                        help="image height = width (layers: 128 with --batch; train: 128; "
                             "compile: 32; memory: 56; sync: 128)")
    # dest -> (the module that reads it, or None for a common option; its default)
    options = {a.dest: (None, a.default) for a in common._group_actions}
    for name, mode in MODES.items():
        group = parser.add_argument_group(f"--{name} options")
        importlib.import_module(mode.module).add_arguments(group)
        options.update({a.dest: (mode.module, a.default) for a in group._group_actions})
    parser.set_defaults(_options=options)


def misplaced(args) -> list[str]:
    """The options given a value that the chosen mode does not read, as flags."""
    mode = MODES[args.mode]
    wrong = []
    for dest, (owner, default) in args._options.items():
        reads = owner == mode.module if owner else dest in mode.shared or dest == "threads"
        if not reads and getattr(args, dest) != default:
            wrong.append("--" + ("pass" if dest == "passes" else dest.replace("_", "-")))
    return wrong


def run(args) -> int:
    """Set the threads, then run the chosen mode; 2 on a usage error."""
    import numba

    wrong = misplaced(args)
    if wrong:
        console(f"batchnorm bench --{args.mode} does not read {', '.join(wrong)}")
        return 2
    if args.reps is not None and args.reps < 3:
        console("--reps must be at least 3 (a spread needs three values)")
        return 2
    if args.budget is not None and args.budget < 0:
        console("--budget must not be negative")
        return 2
    if args.threads < 1 or args.threads > numba.config.NUMBA_NUM_THREADS:
        console(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}")
        return 2
    numba.set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        if args.mode != "kernels":
            console(f"batchnorm bench --{args.mode} needs PyTorch")
            return 2
    mode = MODES[args.mode]
    return getattr(importlib.import_module(mode.module), mode.function)(args)

