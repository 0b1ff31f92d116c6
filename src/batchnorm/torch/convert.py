"""Model surgery: swap torch.nn batch norms for ours; fold eval-mode BN into the layer before."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import nn

from . import _fx
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    _Forward,
)

_log = logging.getLogger("batchnorm.torch")

_OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
# What sync=True replaces: torch.nn's, ours, and our fused layers (their activation kept)
_SYNCABLE = (*_OURS, *_OURS.values(), BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def shared_copy(bn: nn.Module, cls: type, **kwargs) -> nn.Module:
    """A ``cls`` batch norm holding ``bn``'s parameters and buffers, shared, not copied (as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does): optimizers holding the old
    parameters keep working, and requires_grad, device and dtype carry over, as do the
    training flag and ``check_finite``. ``kwargs`` go to ``cls``'s constructor."""
    if getattr(bn, "check_finite", False):
        kwargs.setdefault("check_finite", True)
    with torch.device("meta"):  # placeholders only; the real tensors are moved over below
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  **kwargs)
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _replacement(bn: nn.Module, sync: bool, process_group) -> nn.Module | None:
    """Our module for ``bn``, sharing its parameters and buffers; None to keep ``bn``."""
    if sync:
        if type(bn) in _SYNCABLE:
            from .sync import SyncBatchNorm

            return SyncBatchNorm.from_batchnorm(bn, process_group)
        return None
    cls = _OURS.get(type(bn))  # exact types: user subclasses may override forward
    return None if cls is None else shared_copy(bn, cls)


def convert_model(module: nn.Module, *, sync: bool = False, process_group=None) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by this library's, in place.

    Parameters and buffers are shared with the replaced modules (so ``requires_grad``, device,
    dtype and optimizer state carry over); training flags are kept. Nested modules,
    ``Sequential``, ``ModuleList`` and ``ModuleDict`` are all walked.

    Args:
        module: the model (or a single batch-norm module).
        sync: build ``batchnorm.torch.SyncBatchNorm`` layers instead (from ours or torch's).
        process_group: the group that ``SyncBatchNorm`` reduces over (None: the default group).

    Returns:
        ``module`` itself, or its replacement when ``module`` is a batch norm.
    """
    new = _replacement(module, sync, process_group)
    if new is not None:
        return new
    for name, child in module.named_children():
        converted = convert_model(child, sync=sync, process_group=process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


class FoldedIntoLinear(nn.Identity):
    """Stands where a BatchNorm1d folded into the preceding Linear was.

    The fold is exact only for (N, C) input: Linear acts on the last axis, BatchNorm1d on
    axis 1, so on (N, C, L) input the folded model would silently compute something else.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2:
            raise ValueError(
                "fold_batchnorm folded a BatchNorm1d into the Linear before it, which is exact "
                f"only for (N, C) input; got {input.dim()}-d input. Fold a model that sees 2-d "
                "input there, or keep that BatchNorm1d unfolded."
            )
        return input


def _fold_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(running_var + eps)."""
    with torch.no_grad():
        w = layer.weight
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if layer.bias is not None:
            shift = shift + layer.bias.double() * scale
        else:
            layer.bias = nn.Parameter(w.new_empty(w.shape[0]), requires_grad=w.requires_grad)
        w.copy_(w.double() * scale.view(-1, *([1] * (w.dim() - 1))))
        layer.bias.copy_(shift)


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# Batch norms whose forward is one of these normalize with their running statistics in eval
# mode, which is what folding assumes; a subclass with its own forward may do anything.
_PLAIN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                   _Forward.forward}


def _bn_reason(bn: nn.Module) -> str | None:
    """Why this batch norm cannot become constants, or None."""
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False): eval mode " \
               "normalizes by each batch's own statistics"
    if type(bn).forward not in _PLAIN_FORWARDS:
        return f"its class {type(bn).__name__} overrides forward"
    return None


def _pair_reason(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot fold into ``layer`` (the module right before it), or None."""
    if not isinstance(layer, _FOLDABLE):
        return f"its input comes from a {type(layer).__name__}, not a Conv1d/2d/3d or Linear"
    if bn.num_features != _out_features(layer):
        return (f"it has {bn.num_features} features and the {type(layer).__name__} before "
                f"it {_out_features(layer)} outputs")
    if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
        return f"a {type(bn).__name__} after a Linear normalizes another axis than its outputs"
    return None


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batchnorm` did.

    Attributes:
        folded: (batch norm, layer it was folded into) qualified names.
        left: (batch norm, the reason it was left as it was) for every other batch norm.
        traced: whether the model's graph was traced (else only ``nn.Sequential`` pairs
            were considered).
        trace_error: why tracing failed, when it did.
    """

    folded: tuple[tuple[str, str], ...] = ()
    left: tuple[tuple[str, str], ...] = ()
    traced: bool = True
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"fold_batchnorm: {len(self.folded)} folded, {len(self.left)} left"]
        if not self.traced:
            lines.append(f"  the model could not be traced ({self.trace_error}); only "
                         "batch norms right after a Conv/Linear inside nn.Sequential were "
                         "considered")
        lines += [f"  folded {bn} into {layer}" for bn, layer in self.folded]
        lines += [f"  left {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


class _Folder:
    """Folds pairs in ``root`` (a copy of the user's model) and records what it did."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.folded: list[tuple[str, str]] = []
        self.left: list[tuple[str, str]] = []

    def registered_once(self, module: nn.Module, name: str) -> str | None:
        """Why ``module`` cannot be changed for one use alone, or None."""
        where = _fx.paths(self.root, module)
        if len(where) > 1:
            return f"`{name}` is registered {len(where)} times ({', '.join(where)})"
        shared = _fx.shared_parameters(self.root, module)
        if shared:
            return f"`{name}` shares its parameters with {', '.join(shared)}"
        return None

    def fold(self, layer_name: str, bn_name: str) -> None:
        """Fold the batch norm into the layer and put an identity wherever it was."""
        layer = self.root.get_submodule(layer_name)
        bn = self.root.get_submodule(bn_name)
        _fold_pair(layer, bn)
        for path in _fx.paths(self.root, bn):
            _fx.replace(self.root, path,
                        FoldedIntoLinear() if isinstance(layer, nn.Linear) else nn.Identity())
        self.folded.append((bn_name, layer_name))

    def graph(self, traced: _fx.Traced) -> None:
        """Every batch norm the graph calls, folded or left with the reason."""
        reads = traced.attribute_reads()
        called = set()
        for name, nodes in traced.calls.items():
            bn = traced.root.get_submodule(name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            called.add(id(bn))
            layer_name, why = self._graph_pair(traced, name, nodes, reads)
            if why is None:
                self.fold(layer_name, name)
            else:
                self.left.append((name, why))
        for name, m in traced.root.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in called:
                self.left.append((name, "forward never calls it"))

    def _graph_pair(self, traced: _fx.Traced, name: str, nodes: list, reads: set[str]
                    ) -> tuple[str | None, str | None]:
        """(the layer to fold batch norm ``name`` into, None), or (None, why not).

        Foldable when every call of the batch norm takes the output of one Conv/Linear,
        and every call of that layer feeds these batch-norm calls and nothing else.
        """
        bn = traced.root.get_submodule(name)
        why = _bn_reason(bn)
        if why is not None:
            return None, why
        inputs = [_fx.first_input(n) for n in nodes]
        producers = {i.target if i is not None and i.op == "call_module" else None
                     for i in inputs}
        if len(producers) > 1:
            return None, (f"it is called {len(nodes)} times, on the outputs of "
                          + ", ".join(_fx.describe(i) for i in inputs))
        layer_name = producers.pop()
        if layer_name is None:
            return None, f"its input comes from {_fx.describe(inputs[0])}, not a module"
        layer = traced.root.get_submodule(layer_name)
        why = _pair_reason(layer, bn)
        if why is not None:
            return None, why
        calls = traced.calls[layer_name]
        others = [u for call in calls for u in call.users if u not in nodes]
        if others:
            times = f"`{layer_name}` is called {len(calls)} times, and " if len(calls) > 1 else ""
            return None, (f"{times}the output of `{layer_name}` also goes to "
                          + ", ".join(_fx.describe(u) for u in others)
                          + "; folding would change that use")
        why = self.registered_once(layer, layer_name) or self.registered_once(bn, name)
        if why is not None:
            return None, why
        touched = sorted(r for r in reads if r.startswith((f"{layer_name}.", f"{name}.")))
        if touched:
            return None, f"forward reads {', '.join(touched)} directly"
        return layer_name, None

    def sequential(self) -> None:
        """Without a graph: a batch norm right after its layer inside an nn.Sequential (the
        order of a Sequential is its data flow), unless either is used elsewhere too."""
        done = set()
        for seq in list(self.root.modules()):
            if not isinstance(seq, nn.Sequential):
                continue
            names = list(seq._modules)
            for prev_name, name in zip(names[:-1], names[1:], strict=True):
                prev, bn = seq._modules[prev_name], seq._modules[name]
                if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or id(bn) in done:
                    continue
                done.add(id(bn))
                bn_name, layer_name = _fx.paths(self.root, bn)[0], _fx.paths(self.root, prev)[0]
                why = (_bn_reason(bn) or _pair_reason(prev, bn)
                       or self.registered_once(prev, layer_name)
                       or self.registered_once(bn, bn_name))
                if why is None:
                    self.fold(layer_name, bn_name)
                else:
                    self.left.append((bn_name, why))
        for name, m in self.root.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in done:
                self.left.append((name, "it does not follow a layer inside an nn.Sequential, "
                                        "and without a graph nothing else says what feeds it"))


@overload
def fold_batchnorm(module: nn.Module, *, report: Literal[False] = ...) -> nn.Module: ...
@overload
def fold_batchnorm(module: nn.Module, *, report: Literal[True]
                   ) -> tuple[nn.Module, FoldReport]: ...


def fold_batchnorm(module: nn.Module, *, report: bool = False):
    """A copy of an eval-mode ``module`` with each foldable batch norm merged into its layer.

    The model is traced with ``torch.fx``, so pairs are found wherever they are written (in
    ``nn.Sequential`` or as attributes called in ``forward``, as in torchvision's blocks). A
    batch norm (ours or torch's, with running statistics) is folded into the Conv1d/2d/3d or
    Linear whose output it normalizes when that is all the layer's output is used for, at
    every call of either: then ``bn(layer(x))`` is ``layer'(x)`` with
    ``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(running_var + eps)``,
    and the batch norm is replaced by ``nn.Identity`` (after a ``Linear``, by
    :class:`FoldedIntoLinear`, an identity that refuses input of rank other than 2, the only
    case where that fold is exact). A layer called more than once, registered twice, sharing
    its parameters or whose output is also used elsewhere is left alone, since folding would
    change its other uses. A model that cannot be traced falls back to pairs inside
    ``nn.Sequential``. The returned model keeps the original's class and ``forward``.

    Args:
        module: a model in eval mode (``module.eval()``); it is not modified.
        report: also return a :class:`FoldReport` of what was folded, what was left and why.

    Returns:
        the folded copy, or ``(copy, FoldReport)`` with ``report=True``. The report is also
        logged (logger ``batchnorm.torch``, INFO; a model that cannot be traced, WARNING).

    Raises:
        ValueError: if ``module`` or any submodule is in training mode, where batch norm uses
            batch statistics and cannot be folded into constants.
    """
    training = [name or "<root>" for name, m in module.named_modules() if m.training]
    if training:
        raise ValueError(
            "fold_batchnorm needs a model in eval mode (call .eval() first); in training mode "
            f"batch norm uses batch statistics. Modules in training mode: {training[:5]}"
        )
    folded = copy.deepcopy(module)
    folder = _Folder(folded)
    traced = _fx.trace(folded)
    if traced.graph is not None:
        folder.graph(traced)
    else:
        folder.sequential()
    result = FoldReport(tuple(folder.folded), tuple(folder.left), traced.graph is not None,
                        traced.error)
    _log.log(logging.INFO if result.traced else logging.WARNING, "%s", result)
    return (folded, result) if report else folded
