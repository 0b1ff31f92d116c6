"""The ``batchnorm`` command: ``verify`` | ``bench`` | ``demo``.

Exit status: 0 on success, 1 when a check finds a mismatch, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module implementing add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "verify": ("batchnorm.cli.verify",
               "check the reference against finite differences and PyTorch autograd"),
    "bench": ("batchnorm.cli.bench", "time our layers and kernels against PyTorch's, side by side"),
    "demo": ("batchnorm.cli.demo", "train a small CNN on the 8x8 digits three ways and compare"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch normalization: exact reference, fast CPU/GPU kernels, PyTorch layers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional extra is missing: say so when it is run
            p.set_defaults(import_error=f"`batchnorm {name}` needs an optional dependency: {exc}")
            continue
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "import_error", None):
        print(args.import_error, file=sys.stderr)
        return 2
    return importlib.import_module(args.module).run(args)
