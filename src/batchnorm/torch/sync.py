"""Synchronized batch norm: the same op with its two per-channel reductions made global.

Each process holds a shard of the global batch. Forward first gathers a fixed-size header
from every process (the number of channels and the dtype), so that processes which disagree
all raise the same error instead of meeting in a collective of mismatched sizes; then every
shard's per-channel (count, mean, M2) in one collective, merged by count (Chan et al.), so
shards of any size, empty ones included, give exactly the statistics of the concatenated
batch. Backward sums (sum dy, sum dy * xhat) over the group in one all-reduce and uses the
global count.

The transport is ``torch.distributed`` (gloo on CPU, NCCL on GPUs). Eval mode, a group of one
process, or an uninitialized ``torch.distributed`` take the local path, this library's
:func:`batchnorm.torch.batch_norm`.

Gradients: dx is the gradient of the sum of every rank's loss (the backward all-reduce makes
it so); dgamma and dbeta are this rank's share only, because DistributedDataParallel averages
parameter gradients over the group afterwards, exactly as it does for any other parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _shapes as S
from . import _args
from ._ops import stats_dtype
from .function import batch_norm
from .modules import _Forward

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


def _world_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _widened(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # float32 / float64 are used as they are; narrower floats get a float32 copy.
    return t if t.dtype == acc else t.to(acc)


def _local_moments(x: torch.Tensor, layout: S.Layout) -> tuple[int, torch.Tensor, torch.Tensor]:
    """This shard's per-channel count, mean and M2 = sum (x - mean)^2.

    Args:
        x: [N, C, *spatial], any memory format; N may be 0.
        layout: x's spatial layout.
    Returns:
        count (values per channel), mean [C] and M2 [C] in the statistics dtype.
    """
    count = layout.count
    acc = stats_dtype(x.dtype)
    if count == 0:
        zero = torch.zeros(layout.channels, dtype=acc, device=x.device)
        return 0, zero, zero.clone()
    # torch.var_mean uses Welford / two-pass internally: cancellation-free (contract §4).
    # Narrower floats are widened first (a copy; float32 and float64 are reduced in place).
    var, mean = torch.var_mean(_widened(x, acc), dim=layout.reduce_axes, correction=0)
    return count, mean, var * count


# The header every process sends first: its number of channels and its dtype's code.
_DTYPE_CODES = {dt: i for i, dt in enumerate(_args.INPUT_DTYPES)}


def _check_agreement(x: torch.Tensor, process_group, world_size: int) -> None:
    """Every process's (C, dtype) in one fixed-size all_gather; if they differ, every process
    raises the same error. The collectives after it have sizes and dtypes that depend on
    them, and a collective whose sizes differ between processes is undefined (gloo aborts
    the process).
    """
    header = torch.tensor([x.shape[1], _DTYPE_CODES[x.dtype]], dtype=torch.int64,
                          device=x.device)
    rows = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(rows, header, group=process_group)
    table = torch.stack(rows).tolist()  # a device read on GPUs (the moments need one too)
    channels = [c for c, _ in table]
    dtypes = [_args.INPUT_DTYPES[d] for _, d in table]
    if len(set(channels)) == 1 and len(set(dtypes)) == 1:
        return
    ranks = (dist.get_process_group_ranks(process_group) if process_group is not None
             else range(world_size))
    what = "number of channels" if len(set(channels)) > 1 else "dtype"
    got = channels if what == "number of channels" else dtypes
    listed = ", ".join(f"rank {r}: {v}" for r, v in zip(ranks, got, strict=True))
    raise _args.ArgumentError(
        f"SyncBatchNorm: the processes of the group disagree on the input's {what} ({listed}); "
        "every process must normalize the same channels in the same dtype"
    )


def _gather_moments(count, mean, m2, process_group, world_size):
    """One all_gather of the packed [count, mean[C], M2[C]] -> per-rank rows [W, 2C+1].

    The pack is float64 whatever the input: counts stay exact beyond 2**24 and the merge
    loses nothing; it is only 2C+1 numbers per rank.
    """
    packed = torch.cat(
        [
            torch.tensor([float(count)], dtype=torch.float64, device=mean.device),
            mean.to(torch.float64),
            m2.to(torch.float64),
        ]
    )
    rows = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(rows, packed, group=process_group)
    return torch.stack(rows)


def _merge_moments(rows: torch.Tensor, c: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan's parallel merge of per-rank (n_r, mean_r, M2_r):

        n = sum n_r,  mean = sum n_r mean_r / n,  M2 = sum M2_r + sum n_r (mean_r - mean)^2

    Args:
        rows: [W, 2C+1] float64 as packed by ``_gather_moments``.
    Returns:
        global count, mean [C], M2 [C] (float64); zeros when the count is 0.
    """
    n_r = rows[:, :1]
    mean_r = rows[:, 1 : 1 + c]
    m2_r = rows[:, 1 + c :]
    n = int(n_r.sum().item())
    if n == 0:
        zero = torch.zeros(c, dtype=rows.dtype, device=rows.device)
        return 0, zero, zero.clone()
    mean = (n_r * mean_r).sum(0) / n
    m2 = m2_r.sum(0) + (n_r * (mean_r - mean) ** 2).sum(0)
    return n, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, batches, group,
                world):
        layout = S.resolve_layout(x.shape, "spatial", 1)
        c = layout.channels
        acc = stats_dtype(x.dtype)
        _check_agreement(x, group, world)
        count, mean_l, m2_l = _local_moments(x, layout)
        rows = _gather_moments(count, mean_l, m2_l, group, world)
        n, mean64, m264 = _merge_moments(rows, c)  # n on the host: a sync point on GPUs
        # Decided after the collective, from numbers every rank holds: all raise or none does.
        if n == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{x.shape} (1 value per channel over the {world} processes of the group)"
            )
        if batches is not None:  # momentum=None: the cumulative average, 1 / batches seen
            momentum = 1.0 / max(float(batches), 1.0)

        if n > 0:
            var64 = m264 / n
            denom = var64 + eps
            # contract §4: invstd = 0 where var + eps == 0 (constant channel, eps = 0), not inf.
            invstd64 = torch.where(denom > 0, denom.rsqrt(), torch.zeros_like(denom))
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(
                        mean64.to(running_mean.dtype), alpha=momentum
                    )
                if running_var is not None:
                    running_var.mul_(1 - momentum).add_(
                        (m264 / (n - 1)).to(running_var.dtype), alpha=momentum
                    )
        else:  # every shard empty: contract §5, saved stats 0, running stats unchanged
            invstd64 = torch.zeros_like(mean64)
        mean = mean64.to(acc)
        invstd = invstd64.to(acc)

        # y = (x - mean) * (gamma * invstd) + beta, built in the output buffer only;
        # torch.sub keeps x's memory format (channels_last stays channels_last).
        # float16 / bfloat16 are normalized in float32 (a widened copy) and rounded once.
        bshape = layout.broadcast_shape
        y = torch.sub(_widened(x, acc), mean.view(bshape))
        scale = invstd if weight is None else invstd * weight.to(acc)
        y.mul_(scale.view(bshape))
        if bias is not None:
            y.add_(bias.to(acc).view(bshape))
        y = y.to(x.dtype)

        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = n
        ctx.group = group
        ctx.layout = layout
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        n = ctx.count
        acc = mean.dtype
        dims, bshape = ctx.layout.reduce_axes, ctx.layout.broadcast_shape
        mean_v = mean.view(bshape)
        xw, dyw = _widened(x, acc), _widened(dy, acc)

        # One buffer the size of x: first (x - mean) * dy for the reduction, then dx.
        buf = torch.sub(xw, mean_v)
        buf.mul_(dyw)
        sum_dy_xmu = buf.sum(dims, dtype=acc)
        sum_dy = dy.sum(dims, dtype=acc)
        # dgamma / dbeta are this rank's share (DDP averages them); only dx needs the sums
        # over the whole group, in one packed all-reduce.
        dgamma_local = sum_dy_xmu * invstd
        dbeta_local = sum_dy
        packed = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(packed, group=ctx.group)
        c = mean.shape[0]
        g_sum_dy, g_sum_dy_xmu = packed[:c], packed[c:]

        dx = None
        if ctx.needs_input_grad[0]:
            # dx = gamma*invstd * (dy - (sum dy + xhat * sum dy*xhat) / n)
            #    = a*dy + b*(x - mean) + c0  with a, b, c0 per channel.
            a = invstd if weight is None else invstd * weight.to(acc)
            if n > 0:
                b = -a * invstd * invstd * g_sum_dy_xmu / n
                c0 = -a * g_sum_dy / n
            else:
                b = c0 = torch.zeros_like(a)
            torch.sub(xw, mean_v, out=buf)
            buf.mul_(b.view(bshape))
            buf.addcmul_(dyw, a.view(bshape))
            buf.add_(c0.view(bshape))
            dx = buf.to(x.dtype)

        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = dgamma_local.to(weight.dtype)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = dbeta_local.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    process_group=None,
    *,
    batches: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm whose training statistics cover the batch of every process in the group.

        y = gamma * (x - mean_global) / sqrt(var_global + eps) + beta

    Every process of ``process_group`` must call it (also with an empty shard), and in
    backward every process must reach it too. Running statistics are updated in place with
    the global count (unbiased variance ``M2 / (n - 1)``). Arguments follow the rules of
    :func:`batchnorm.torch.batch_norm`; processes that disagree on the number of channels or
    the dtype all raise a ValueError saying so.

    Args:
        input: [N, C, *spatial] (rank 2 and up, any memory format); N may differ per process.
        running_mean, running_var: [C] or None.
        weight, bias: [C] or None.
        training: use batch statistics (synchronized) rather than the running ones.
        momentum: running-statistics factor m.
        eps: added to the variance.
        process_group: the group to synchronize over; None is the default group.
        batches: as in :func:`batchnorm.torch.batch_norm`, the batches seen, this one
            included; replaces momentum by 1 / batches (torch.nn's momentum=None).
    """
    # Checked before any collective, so that a bad argument is an error here, not a hang
    # there. A shard may hold one value per channel: the count that matters is the group's.
    weight, bias, momentum, eps = _args.check(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps, count=False)
    world = _world_size(process_group)
    if not training or world == 1 or input.dim() < 2:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, batches=batches)
    return _SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, eps, momentum, batches, process_group,
        world,
    )


class SyncBatchNorm(_Forward, torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm synchronized over a process group, on CPU (gloo) or GPU (NCCL).

    The constructor, parameters, buffers and state_dict of ``torch.nn.SyncBatchNorm``;
    accepts [N, C], [N, C, L], [N, C, H, W] and [N, C, D, H, W] input. It derives from the
    common base ``_BatchNorm`` rather than from ``torch.nn.SyncBatchNorm`` itself because
    DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` instance in a CPU module.
    The forward is :class:`batchnorm.torch.BatchNorm2d`'s; only training synchronizes.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _batch_norm(self, input, running_mean, running_var, training, momentum, batches):
        if not self.training:  # eval is local, also when it normalizes by this shard's batch
            return super()._batch_norm(input, running_mean, running_var, training, momentum,
                                       batches)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                               training, momentum, self.eps, self.process_group,
                               batches=batches)

    @classmethod
    def from_batchnorm(cls, module: torch.nn.modules.batchnorm._BatchNorm, process_group=None):
        """A SyncBatchNorm holding ``module``'s parameters and buffers.

        The new module shares the Parameter and buffer tensors (as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so device, dtype,
        requires_grad and values carry over and an optimizer built before the conversion
        still updates them; the training flag is copied.

        Args:
            module: any ``torch.nn`` BatchNorm1d/2d/3d or SyncBatchNorm, or a subclass.
            process_group: the group to synchronize over; None is the default group.
        """
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"expected a batch norm module, got {type(module).__name__}")
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and (
            module.has_uninitialized_params()
        ):
            raise ValueError("cannot convert a lazy batch norm before its first forward")
        new = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device="meta",
        )
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
