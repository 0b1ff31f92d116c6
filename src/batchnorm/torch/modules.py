"""``BatchNorm1d/2d/3d``: the ``torch.nn`` classes with their forward routed to our operator;
``BatchNormAct1d/2d/3d``: the same with a fused residual add and activation.

Subclassing keeps the constructor, parameters, buffers (``num_batches_tracked`` included),
``extra_repr``, input-dimension errors and ``state_dict`` format of ``torch.nn``, so the two
load each other's checkpoints. Only ``forward`` differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _args
from .function import batch_norm


class _Forward:
    """The forward of ``torch.nn``'s batch norm, calling :func:`batch_norm`.

    ``SyncBatchNorm`` shares it and overrides :meth:`_batch_norm` alone.

    ``check_finite`` (a constructor keyword and a plain attribute, default False; not part of
    the state dict, so checkpoints load both ways) makes training calls raise
    FloatingPointError naming the channels whose batch statistics or outputs are not finite,
    and eval calls those whose outputs are not; see :func:`batch_norm`.
    """

    check_finite = False  # also the value of instances unpickled from before it existed

    def __init__(self, *args, check_finite: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_finite = bool(check_finite)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + ", check_finite=True" if self.check_finite else text

    def forward(self, input: Tensor) -> Tensor:
        return self._batch_norm(input, *self._prepare(input))

    def _prepare(self, input: Tensor) -> tuple:
        """(running_mean, running_var, training, momentum, batches) of this call, as torch.nn
        decides them; counts the batch in ``num_batches_tracked`` in training."""
        self._check_input_dim(input)
        training, track = self.training, self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        batches = None
        if training and track:
            tracked = self.num_batches_tracked
            if tracked is not None:
                tracked.add_(1)
                if self.momentum is None:  # cumulative average: the n-th batch weighs 1/n
                    batches = tracked
        running_mean, running_var = self.running_mean, self.running_var
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch = training or (running_mean is None and running_var is None)
        keep_running = not training or track
        return (running_mean if keep_running else None, running_var if keep_running else None,
                use_batch, momentum, batches)

    def _batch_norm(self, input: Tensor, running_mean: Tensor | None,
                    running_var: Tensor | None, training: bool, momentum: float,
                    batches: Tensor | None) -> Tensor:
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, training,
                          momentum, self.eps, batches=batches, check_finite=self.check_finite)


class BatchNorm1d(_Forward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on (N, C) or (N, C, L) input, computed by this library."""


class BatchNorm2d(_Forward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on (N, C, H, W) input (NCHW or channels-last)."""


class BatchNorm3d(_Forward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on (N, C, D, H, W) input (NCDHW or channels-last-3d)."""


class _ActForward(_Forward):
    """The forward of the fused layers: torch.nn's batch norm, then the residual add and the
    activation, in one :func:`batch_norm` call (contract §8).

    ``activation`` (None, ``"relu"`` or ``"leaky_relu"``), ``negative_slope`` and ``inplace``
    (the memory-saving mode: y written over the input, backward keeps y alone; see
    :func:`batch_norm`) are constructor keywords and plain attributes, not part of the state
    dict, which is torch.nn's: checkpoints load both ways.
    """

    activation = "relu"
    negative_slope = 0.01
    inplace = False

    def __init__(self, *args, activation: str | None = "relu", negative_slope: float = 0.01,
                 inplace: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        act = _args.epilogue(activation, negative_slope)  # refused here, not on first call
        if inplace:
            _args.check_inplace_mode(act, False)
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.inplace = bool(inplace)

    def _check_fused(self, input: Tensor, residual: Tensor | None) -> None:
        """The arguments torch.nn's layers do not have, refused before the batch is counted
        (a refused call changes nothing, contract §3)."""
        if residual is not None:
            _args.check_residual(residual, input)
        if self.inplace:
            _args.check_inplace(input, _args.epilogue(self.activation, self.negative_slope),
                                residual, (self.weight, self.bias, self.running_mean,
                                           self.running_var))

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text + (", inplace=True" if self.inplace else "")

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """y = act(bn(input) + residual); input [N, C, *spatial], residual of its shape."""
        self._check_fused(input, residual)
        running_mean, running_var, training, momentum, batches = self._prepare(input)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, training,
                          momentum, self.eps, batches=batches, check_finite=self.check_finite,
                          activation=self.activation, negative_slope=self.negative_slope,
                          residual=residual, inplace=self.inplace)


class BatchNormAct1d(_ActForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` followed by an optional residual add and an activation, fused:
    (N, C) or (N, C, L) input."""


class BatchNormAct2d(_ActForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` followed by an optional residual add and an activation, fused:
    (N, C, H, W) input (NCHW or channels-last)."""


class BatchNormAct3d(_ActForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` followed by an optional residual add and an activation, fused:
    (N, C, D, H, W) input (NCDHW or channels-last-3d)."""
