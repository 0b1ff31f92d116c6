"""Checks of the reference against two independent oracles (``batchnorm verify``).

1. Central finite differences in float64 of the loss ``L = sum(y * w)``: the closed-form
   dx, dgamma and dbeta of contract §1 must match the numerical derivatives.
2. PyTorch (``torch.nn.functional.batch_norm`` with autograd), when it is installed: y, the
   three gradients and the running statistics must match.

Every case is a (mode, layout, rank, affine) combination on a small float64 input.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass

import numpy as np

from .. import _api
from .._shapes import resolve_layout

# Small shapes, channels at axis 1, with a size-1 axis and odd sizes; FD costs 2 forwards
# per element.
SHAPES = {2: (5, 3), 3: (3, 2, 5), 4: (2, 3, 2, 3), 5: (2, 2, 3, 1, 2)}
LAYOUTS = ("nchw", "nhwc", "per_activation")
FD_TOLERANCE = 1e-6      # relative to the gradient's scale; FD error is ~1e-9 here
TORCH_TOLERANCE = 1e-9   # float64 against float64


@dataclass(frozen=True)
class Case:
    layout: str          # "nchw" | "nhwc" | "per_activation"
    rank: int
    affine: bool
    training: bool = True
    mode: str = "spatial"

    @property
    def channel_axis(self) -> int:
        return -1 if self.layout == "nhwc" else 1

    @property
    def api_mode(self) -> str:
        return "per_activation" if self.layout == "per_activation" else self.mode

    @property
    def shape(self) -> tuple[int, ...]:
        s = SHAPES[self.rank]
        # channels-last: the same sizes with the channel axis moved to the end
        return (s[0], *s[2:], s[1]) if self.layout == "nhwc" else s

    def label(self) -> str:
        phase = "train" if self.training else "eval"
        aff = "affine" if self.affine else "plain"
        return f"{self.api_mode}/{self.layout}/rank{self.rank}/{aff}/{phase}"


def cases(quick: bool = False, layouts: tuple[str, ...] = LAYOUTS) -> list[Case]:
    ranks = (2, 4) if quick else (2, 3, 4, 5)
    out = []
    for layout in layouts:
        for rank in ranks:
            for affine in (True, False):
                for training in (True, False):
                    out.append(Case(layout, rank, affine, training))
    if not quick and "nchw" in layouts:
        out.append(Case("nchw", 4, True, True, mode="spatial_persistent"))
    return out


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 inputs for a case: x with an offset, parameters, statistics, dy."""
    rng = np.random.default_rng(seed)
    pshape = resolve_layout(case.shape, case.api_mode, case.channel_axis).param_shape
    return {
        "x": rng.normal(0.5, 2.0, case.shape),
        "gamma": rng.normal(1.0, 0.5, pshape) if case.affine else None,
        "beta": rng.normal(0.0, 0.5, pshape) if case.affine else None,
        "mean": rng.normal(0.0, 1.0, pshape),
        "var": rng.uniform(0.5, 2.0, pshape),
        "dy": rng.normal(0.0, 1.0, case.shape),
    }


def _forward(case: Case, inp: dict, eps: float = 1e-5) -> np.ndarray:
    kw = dict(eps=eps, mode=case.api_mode, channel_axis=case.channel_axis, backend="reference")
    if case.training:
        return _api.forward_training(inp["x"], inp["gamma"], inp["beta"], **kw)[0]
    return _api.forward_inference(inp["x"], inp["gamma"], inp["beta"], inp["mean"], inp["var"],
                                  **kw)


def _analytic(case: Case, inp: dict, eps: float = 1e-5):
    kw = dict(mode=case.api_mode, channel_axis=case.channel_axis, backend="reference")
    if case.training:
        _, saved = _api.forward_training(inp["x"], inp["gamma"], inp["beta"], eps=eps, **kw)
    else:
        saved = _api.SavedStats(inp["mean"], 1.0 / np.sqrt(inp["var"] + eps))
    return _api.backward(inp["dy"], inp["x"], inp["gamma"], saved, training=case.training, **kw)


def numerical_gradient(f, arr: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function ``f()`` with respect to every entry of arr.

    ``arr`` is perturbed in place and restored, one entry at a time.
    """
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + h
        up = f()
        flat[i] = orig - h
        down = f()
        flat[i] = orig
        gflat[i] = (up - down) / (2 * h)
    return grad


def _rel_err(a, b) -> float:
    if a is None and b is None:
        return 0.0
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(1.0, np.max(np.abs(b), initial=0.0)))


def fd_errors(case: Case, seed: int = 0) -> dict[str, float]:
    """Largest relative error of the closed-form gradients against finite differences."""
    inp = make_inputs(case, seed)
    dx, dgamma, dbeta = _analytic(case, inp)

    def loss() -> float:
        return float(np.sum(_forward(case, inp) * inp["dy"]))

    errors = {"dx": _rel_err(dx, numerical_gradient(loss, inp["x"]))}
    if case.affine:
        errors["dgamma"] = _rel_err(dgamma, numerical_gradient(loss, inp["gamma"]))
        errors["dbeta"] = _rel_err(dbeta, numerical_gradient(loss, inp["beta"]))
    return errors


def torch_errors(case: Case, seed: int = 0, momentum: float = 0.1) -> dict[str, float]:
    """Largest relative error of the reference against PyTorch autograd (float64)."""
    import torch
    import torch.nn.functional as F

    inp = make_inputs(case, seed)
    eps = 1e-5
    layout = resolve_layout(case.shape, case.api_mode, case.channel_axis)
    rm, rv = inp["mean"].copy(), inp["var"].copy()
    kw = dict(eps=eps, mode=case.api_mode, channel_axis=case.channel_axis, backend="reference")
    if case.training:
        y, saved = _api.forward_training(inp["x"], inp["gamma"], inp["beta"], running_mean=rm,
                                         running_var=rv, momentum=momentum, **kw)
    else:
        y = _api.forward_inference(inp["x"], inp["gamma"], inp["beta"], rm, rv, **kw)
        saved = _api.SavedStats(rm, 1.0 / np.sqrt(rv + eps))
    dx, dgamma, dbeta = _api.backward(inp["dy"], inp["x"], inp["gamma"], saved,
                                      training=case.training, mode=case.api_mode,
                                      channel_axis=case.channel_axis, backend="reference")

    # Torch sees (N, C, ...) with C at axis 1; per-activation flattens the features to (N, F).
    def to_torch_layout(a):
        t = torch.from_numpy(a.copy())
        if case.layout == "nhwc":
            t = t.movedim(-1, 1)
        if case.layout == "per_activation":
            t = t.reshape(t.shape[0], -1)
        return t

    def param(a):
        return None if a is None else torch.from_numpy(a.reshape(-1).copy()).requires_grad_()

    xt = to_torch_layout(inp["x"]).requires_grad_()
    wt, bt = param(inp["gamma"]), param(inp["beta"])
    trm = torch.from_numpy(inp["mean"].reshape(-1).copy())
    trv = torch.from_numpy(inp["var"].reshape(-1).copy())
    yt = F.batch_norm(xt, trm, trv, wt, bt, training=case.training, momentum=momentum, eps=eps)
    yt.backward(to_torch_layout(inp["dy"]))

    def back(t):
        if case.layout == "per_activation":
            t = t.reshape(case.shape)
        if case.layout == "nhwc":
            t = t.movedim(1, -1)
        return t.detach().numpy()

    pshape = layout.param_shape
    errors = {
        "y": _rel_err(y, back(yt)),
        "dx": _rel_err(dx, back(xt.grad)),
        "running_mean": _rel_err(rm, trm.numpy().reshape(pshape)),
        "running_var": _rel_err(rv, trv.numpy().reshape(pshape)),
    }
    if case.affine:
        errors["dgamma"] = _rel_err(dgamma, wt.grad.numpy().reshape(pshape))
        errors["dbeta"] = _rel_err(dbeta, bt.grad.numpy().reshape(pshape))
    return errors


COLUMNS = ("dx", "dgamma", "dbeta", "y", "running_mean", "running_var")


def run_all(quick: bool = False, use_torch: bool = True, progress=None,
            layouts: tuple[str, ...] = LAYOUTS) -> list[dict]:
    """One row per case: the largest FD and torch error of each formula and a verdict."""
    rows = []
    for case in cases(quick, layouts):
        row = {"case": case.label()}
        for k, v in fd_errors(case).items():
            row[f"fd_{k}"] = v
        if use_torch:
            for k, v in torch_errors(case).items():
                row[f"torch_{k}"] = v
        row["ok"] = all(
            v <= (FD_TOLERANCE if k.startswith("fd_") else TORCH_TOLERANCE)
            for k, v in row.items() if k.startswith(("fd_", "torch_"))
        )
        rows.append(row)
        if progress is not None:
            progress()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="ranks 2 and 4 only")
    parser.add_argument("--layout", default="all", choices=[*LAYOUTS, "all"],
                        help="check one layout only (default: all); the checks run in float64")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch oracle even when torch is installed")
    parser.add_argument("--detail", action="store_true",
                        help="one line per case instead of per mode / layout / phase")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows to a CSV file")


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "0" if v == 0 else f"{v:.0e}"


def run(args) -> int:
    """Print the table; exit status 0 when every error is within tolerance, 1 otherwise."""
    from ._console import console, progress_bar, table

    use_torch = not args.no_torch and _have_torch()
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    n = len(cases(args.quick, layouts))
    with progress_bar("verifying the reference", total=n) as advance:
        rows = run_all(args.quick, use_torch, progress=advance, layouts=layouts)
    sources = ["fd"] + (["torch"] if use_torch else [])
    columns = [(s_, c) for s_ in sources for c in COLUMNS if any(f"{s_}_{c}" in r for r in rows)]
    # One line per mode / layout / phase: the largest error over ranks and affine settings.
    groups: dict[str, list[dict]] = {}
    for r in rows if args.detail else ():
        groups[r["case"]] = [r]
    for r in rows if not args.detail else ():
        mode, layout, _rank, _affine, phase = r["case"].split("/")
        name = f"{mode} {phase}" if layout == mode else f"{mode} {layout} {phase}"
        groups.setdefault(name, []).append(r)
    body = []
    for name, members in groups.items():
        cells = [name, str(len(members))]
        for s_, c in columns:
            vals = [m[f"{s_}_{c}"] for m in members if f"{s_}_{c}" in m]
            cells.append(_fmt(max(vals)) if vals else "-")
        cells.append("yes" if all(m["ok"] for m in members) else "NO")
        body.append(cells)
    short = {"dgamma": "dγ", "dbeta": "dβ", "running_mean": "run.mean", "running_var": "run.var"}
    headers = ["case", "n"] + [f"{s_} {short.get(c, c)}" for s_, c in columns] + ["ok"]
    table("largest relative error of the reference, float64 (n cases per row)", headers, body)
    bad = [r["case"] for r in rows if not r["ok"]]
    console(f"tolerances: finite differences {FD_TOLERANCE:g}, PyTorch {TORCH_TOLERANCE:g}"
            + ("" if use_torch else "; PyTorch not installed or --no-torch: oracle skipped"))
    if args.csv:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        console(f"wrote {len(rows)} rows to {args.csv}")
    if bad:
        console(f"MISMATCH in {len(bad)} case(s): {', '.join(bad)}")
        return 1
    console(f"all {len(rows)} cases agree")
    return 0
