"""``BatchNorm1d/2d/3d``: the ``torch.nn`` classes with their forward routed to our operator.

Subclassing keeps the constructor, parameters, buffers (``num_batches_tracked`` included),
``extra_repr``, input-dimension errors and ``state_dict`` format of ``torch.nn``, so the two
load each other's checkpoints. Only ``forward`` differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
        return self._batch_norm(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            use_batch,
            momentum,
            batches,
        )

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
