"""Model surgery: swap torch.nn batch norms for ours; fold eval-mode BN into the layer before."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

_OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _replacement(bn: nn.Module, sync: bool, process_group) -> nn.Module | None:
    """Our module for ``bn``, sharing its parameters and buffers; None to keep ``bn``."""
    if sync:
        if type(bn) in _OURS or type(bn) in _OURS.values():
            from .sync import SyncBatchNorm

            return SyncBatchNorm.from_batchnorm(bn, process_group)
        return None
    cls = _OURS.get(type(bn))  # exact types: user subclasses may override forward
    if cls is None:
        return None
    with torch.device("meta"):  # placeholders only; the real tensors are moved over below
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    # Shared, not copied (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does): optimizers
    # holding the old parameters keep working, and requires_grad, device and dtype carry over.
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


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


def _foldable(prev: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(prev, _FOLDABLE)
        and isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.running_mean is not None  # without running statistics eval uses the batch's
        and bn.num_features == _out_features(prev)
    )


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``module`` with each foldable batch norm merged into its layer.

    The rule: inside every ``torch.nn.Sequential``, a batch norm (ours or torch's, with running
    statistics) that comes right after a ``Conv1d/2d/3d`` or ``Linear`` with as many output
    channels is folded into that layer's weight and bias and replaced by ``nn.Identity`` (after
    a ``Linear``, by :class:`FoldedIntoLinear`, an identity that refuses input of rank other
    than 2, the only case where that fold is exact).
    Batch norms anywhere else (after a ReLU, or wired in a custom ``forward``) are left as
    they are, because module order outside ``Sequential`` says nothing about data flow.

    Args:
        module: a model in eval mode (``module.eval()``); it is not modified.

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
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for prev_name, name in zip(names[:-1], names[1:], strict=True):
            prev, bn = seq._modules[prev_name], seq._modules[name]
            if _foldable(prev, bn):
                _fold_pair(prev, bn)
                linear = isinstance(prev, nn.Linear)
                seq._modules[name] = FoldedIntoLinear() if linear else nn.Identity()
    return folded
