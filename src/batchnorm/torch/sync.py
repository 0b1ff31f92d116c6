"""Synchronized batch norm: the same op with its two per-channel reductions made global.

Each process holds a shard of the global batch. Forward gathers every shard's per-channel
(count, mean, M2) in one collective and merges them by count (Chan et al.), so shards of any
size, empty ones included, give exactly the statistics of the concatenated batch. Backward
sums (sum dy, sum dy * xhat) over the group in one all-reduce and uses the global count.

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

from .._shapes import check_scalars
from ._ops import check_layout
from .function import batch_norm

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


def _world_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # contract §4: statistics in float64 for float64 input, float32 for everything narrower.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """[C] -> [1, C, 1, ...] so it broadcasts against an input of rank ``ndim``."""
    return t.view((1, -1) + (1,) * (ndim - 2))


def _widened(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # float32 / float64 are used as they are; narrower floats get a float32 copy.
    return t if t.dtype == acc else t.to(acc)


def _local_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """This shard's per-channel count, mean and M2 = sum (x - mean)^2.

    Args:
        x: [N, C, *spatial], any memory format; N may be 0.
    Returns:
        count (values per channel), mean [C] and M2 [C] in the accumulation dtype.
    """
    count = x.shape[0]
    for s in x.shape[2:]:
        count *= s
    acc = _acc_dtype(x.dtype)
    c = x.shape[1]
    if count == 0:
        zero = torch.zeros(c, dtype=acc, device=x.device)
        return 0, zero, zero.clone()
    dims = [0] + list(range(2, x.dim()))
    # torch.var_mean uses Welford / two-pass internally: cancellation-free (contract §4).
    # Narrower floats are widened first (a copy; float32 and float64 are reduced in place).
    var, mean = torch.var_mean(_widened(x, acc), dim=dims, correction=0)
    return count, mean, var * count


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
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world):
        c = x.shape[1]
        acc = _acc_dtype(x.dtype)
        count, mean_l, m2_l = _local_moments(x)
        rows = _gather_moments(count, mean_l, m2_l, group, world)
        n, mean64, m264 = _merge_moments(rows, c)  # n on the host: a sync point on GPUs
        # Decided after the collective, from numbers every rank holds: all raise or none does.
        if n == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{x.shape} (1 value per channel over the {world} processes of the group)"
            )

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
        nd = x.dim()
        y = torch.sub(_widened(x, acc), _channel_view(mean, nd))
        scale = invstd if weight is None else invstd * weight.to(acc)
        y.mul_(_channel_view(scale, nd))
        if bias is not None:
            y.add_(_channel_view(bias.to(acc), nd))
        y = y.to(x.dtype)

        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = n
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        n = ctx.count
        nd = x.dim()
        acc = mean.dtype
        dims = [0] + list(range(2, nd))
        mean_v = _channel_view(mean, nd)
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
            buf.mul_(_channel_view(b, nd))
            buf.addcmul_(dyw, _channel_view(a, nd))
            buf.add_(_channel_view(c0, nd))
            dx = buf.to(x.dtype)

        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = dgamma_local.to(weight.dtype)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = dbeta_local.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None, None


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
) -> torch.Tensor:
    """Batch norm whose training statistics cover the batch of every process in the group.

        y = gamma * (x - mean_global) / sqrt(var_global + eps) + beta

    Every process of ``process_group`` must call it (also with an empty shard), and in
    backward every process must reach it too. Running statistics are updated in place with
    the global count (unbiased variance ``M2 / (n - 1)``).

    Args:
        input: [N, C, *spatial] (rank 2 to 5, any memory format); N may differ per process.
        running_mean, running_var: [C] or None.
        weight, bias: [C] or None.
        training: use batch statistics (synchronized) rather than the running ones.
        momentum: running-statistics factor m in [0, 1].
        eps: added to the variance.
        process_group: the group to synchronize over; None is the default group.
    """
    if input.dim() < 2:
        raise ValueError(f"expected an input of rank 2 or more, got shape {tuple(input.shape)}")
    # Every rank refuses bad arguments before the collective, so none is left waiting.
    check_layout(input, "spatial", weight=weight, bias=bias, running_mean=running_mean,
            running_var=running_var)
    check_scalars(eps, momentum)
    world = _world_size(process_group)
    if not training or world == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, eps, momentum, process_group, world
    )


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm synchronized over a process group, on CPU (gloo) or GPU (NCCL).

    The constructor, parameters, buffers and state_dict of ``torch.nn.SyncBatchNorm``;
    accepts [N, C], [N, C, L], [N, C, H, W] and [N, C, D, H, W] input. It derives from the
    common base ``_BatchNorm`` rather than from ``torch.nn.SyncBatchNorm`` itself because
    DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` instance in a CPU module.
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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # momentum=None is a cumulative average: m = 1 / num_batches_tracked (contract §3).
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        if self.training:
            running = self.track_running_stats
            return sync_batch_norm(
                input,
                self.running_mean if running else None,
                self.running_var if running else None,
                self.weight, self.bias, True, factor, self.eps, self.process_group,
            )
        # Eval is local; without running statistics it normalizes by this shard's batch.
        use_batch = self.running_mean is None and self.running_var is None
        return batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            use_batch, factor, self.eps,
        )

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
