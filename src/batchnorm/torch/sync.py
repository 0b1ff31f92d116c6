"""Synchronized batch norm: the backend's phases with one collective between each pair.

Each process holds a shard of the global batch. Batch norm is two reductions, each followed by
an element-wise pass (:mod:`batchnorm.backends.protocol`); here every reduction's per-channel
result crosses the group before the pass that needs it:

- forward: on a layer's first call, a fixed-size header from every process (the number of
  channels and the dtype), so that processes which disagree all raise the same error instead
  of meeting in a collective of mismatched sizes (afterwards the layer's weight or running
  statistics pin C, and the dtype travels with the moments); then the backend's ``moments``
  of this shard, one ``all_gather`` of every shard's ``(count, dtype, mean, m2)``, Chan's
  merge (:func:`protocol.merge_moments`: shards of any size, empty ones included, give
  exactly the statistics of the concatenated batch), the running update with the global
  count, and the backend's ``apply`` (with the epilogue: residual add and activation,
  contract §8);
- backward: the backend's ``grad_sums`` of this shard, one ``all_reduce`` of them, and the
  backend's ``grad_apply`` with the global count (and dz for the residual).

The phases run on the backend that runs the single-process calls: the CPU kernels for CPU
tensors (gloo), the GPU kernels for CUDA tensors (NCCL). Eval mode, a group of one process, or
an uninitialized ``torch.distributed`` take the local path, this library's
:func:`batchnorm.torch.batch_norm`.

Gradients: dx (and dz) is the gradient of the sum of every rank's loss (the backward
all-reduce makes it so); dgamma and dbeta are this rank's share only, because
DistributedDataParallel averages parameter gradients over the group afterwards, exactly as it
does for any other parameter. Backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import _shapes as S
from ..backends.protocol import merge_moments
from ..reference import inverse_std
from . import _args, _ops
from .function import _inference_stats, batch_norm
from .modules import _Forward

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


def _world_size(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


# Each process's dtype travels as a code: in the header, and beside its moments.
_DTYPE_CODES = {dt: i for i, dt in enumerate(_args.INPUT_DTYPES)}


def _disagreement(what: str, values: list, process_group, world_size: int) -> None:
    """Raise the error every process of the group raises alike when they disagree."""
    ranks = (dist.get_process_group_ranks(process_group) if process_group is not None
             else range(world_size))
    listed = ", ".join(f"rank {r}: {v}" for r, v in zip(ranks, values, strict=True))
    raise _args.ArgumentError(
        f"SyncBatchNorm: the processes of the group disagree on the input's {what} ({listed}); "
        "every process must normalize the same channels in the same dtype"
    )


def _check_header(x: torch.Tensor, process_group, world_size: int) -> None:
    """Every process's (C, dtype) in one fixed-size all_gather; if they differ, every process
    raises the same error. The moments' collective has a size that depends on C, and a
    collective whose sizes differ between processes is undefined (gloo aborts the process).
    """
    header = torch.tensor([x.shape[1], _DTYPE_CODES[x.dtype]], dtype=torch.int64,
                          device=x.device)
    rows = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(rows, header, group=process_group)
    table = torch.stack(rows).tolist()  # a device read on GPUs (the moments need one too)
    channels = [c for c, _ in table]
    dtypes = [_args.INPUT_DTYPES[d] for _, d in table]
    if len(set(channels)) > 1:
        _disagreement("number of channels", channels, process_group, world_size)
    if len(set(dtypes)) > 1:
        _disagreement("dtype", dtypes, process_group, world_size)


# The per-channel tensors (a layer's weight or running statistics) whose C every process of a
# group has agreed on: {id(tensor): {group, ...}}. A call validates C against such a tensor
# before any collective, so once agreed, C cannot differ again and the header's collective
# is skipped; the dtype still travels with the moments and is compared after them.
_AGREED: dict[int, set] = {}


def _check_agreement(x: torch.Tensor, pin: torch.Tensor | None, process_group,
                     world_size: int) -> None:
    """The header's collective, unless ``pin`` (a per-channel tensor this call was validated
    against) has already been agreed on in this group."""
    key = id(pin)
    if pin is not None and process_group in _AGREED.get(key, ()):
        return
    _check_header(x, process_group, world_size)
    if pin is not None:
        if key not in _AGREED:
            _AGREED[key] = set()
            weakref.finalize(pin, _AGREED.pop, key, None)
        _AGREED[key].add(process_group)


# The per-channel numbers between the phases live where the phases put them: NumPy arrays
# when the backend runs on the host (CPU tensors), tensors on the device otherwise. Each step
# below takes either; only the collectives need tensors (on x's device).


def _pack(x: torch.Tensor, parts) -> torch.Tensor:
    """One float64 tensor on x's device holding ``parts`` (per-channel arrays, flattened)."""
    if isinstance(parts[0], np.ndarray):
        flat = np.concatenate([np.ravel(p) for p in parts]).astype(np.float64, copy=False)
        return torch.from_numpy(flat).to(x.device)
    return torch.cat([p.reshape(-1).to(torch.float64) for p in parts])


def _global_moments(x: torch.Tensor, host, moments, process_group, world_size: int):
    """Chan's merge of every rank's ``(count, mean [C], m2 [C])`` from one all_gather.

    The pack ``[count, dtype code, mean, m2]`` is float64 whatever the input: counts stay
    exact beyond 2**24 and the merge loses nothing; it is only 2C + 2 numbers per rank.
    Processes whose dtypes differ all raise, naming them.

    Returns:
        the global count (a Python int: a device read on GPUs), mean [C] and m2 [C] (float64,
        in the phases' space; zeros when the count is 0).
    """
    count, mean, m2 = moments
    c = np.size(mean) if isinstance(mean, np.ndarray) else mean.numel()
    head = [float(count), float(_DTYPE_CODES[x.dtype])]
    lead = np.array(head) if isinstance(mean, np.ndarray) else mean.new_tensor(head)
    packed = _pack(x, (lead, mean, m2))
    table = torch.empty((world_size, 2 * c + 2), dtype=torch.float64, device=x.device)
    dist.all_gather(list(table.unbind(0)), packed, group=process_group)
    rows = host(table)
    codes = [int(v) for v in rows[:, 1].tolist()]
    if len(set(codes)) > 1:  # every process holds the same table: all raise alike
        _disagreement("dtype", [_args.INPUT_DTYPES[k] for k in codes], process_group,
                      world_size)
    n, mean, m2 = merge_moments(rows[:, :1], rows[:, 2:2 + c], rows[:, 2 + c:])
    return int(n), mean, m2


def _inverse_std(var, eps: float):
    """1 / sqrt(var + eps), 0 where var + eps == 0 (contract §4), float64 as var."""
    if isinstance(var, np.ndarray):
        return inverse_std(var, eps)
    return _inference_stats(var, var, eps, torch.float64)[1]


def _update_running(running, momentum: float, value) -> None:
    """running = (1 - m) * running + m * value, computed in float64 (contract §3)."""
    if running is None:
        return
    if isinstance(running, np.ndarray):
        running[...] = (1.0 - momentum) * running.astype(np.float64) + momentum * value
    else:
        running.copy_((1.0 - momentum) * running.double() + momentum * value)


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = act(weight * xhat + bias + residual) with the group's statistics, on the phases.

    Inputs x, weight, bias, residual and one tuple of the rest (running statistics, eps,
    momentum, batches, group, world size, epilogue, check_finite). Saves x, weight, and y
    when there is an activation (its sign gives act'); the float64 statistics are kept
    beside them.

    ``check_finite`` costs one read of y and one all-reduce of a [C] mask: every rank then
    raises alike (one rank raising alone would leave the others waiting in a collective),
    before the running statistics are touched.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, call):
        (running_mean, running_var, eps, momentum, batches, group, world, epilogue,
         check_finite) = call
        # validation and the backend choice, once per shape (no count check: a shard may
        # hold one value per channel, or none; the count that matters is the group's)
        pl = _ops.plan(x, "spatial", "inference", weight, bias)
        layout = pl.layout
        pin = next((t for t in (weight, running_mean, running_var) if t is not None), None)
        _check_agreement(x, pin, group, world)
        host = _ops._Host(pl)
        xa = host(x)
        backend = pl.backend or _ops._backend(xa)
        n, mean, m2 = _global_moments(x, host, backend.moments(xa, layout), group, world)
        # Decided after the collective, from numbers every rank holds: all raise or none does.
        if n == 1:
            raise S.too_few_values(
                x.shape, f"1 value per channel over the {world} processes of the group")
        momentum = _ops.running_momentum(momentum, batches)
        # every shard empty: contract §5, saved stats 0, running stats unchanged
        invstd = _inverse_std(m2 / n, eps) if n > 0 else mean * 0

        y = _ops._output_like(x)
        backend.apply(xa, mean, invstd, host(weight), host(bias), layout,
                      out=host(y, writeback=True),
                      **_ops._epilogue_kw(host(residual), epilogue))
        host.finish()
        if check_finite:
            _check_finite_group(y, mean, m2, layout, group)
        if n > 0:
            stats = _ops._Host(pl)
            _update_running(stats(running_mean, writeback=True), momentum, mean)
            _update_running(stats(running_var, writeback=True), momentum, m2 / (n - 1))
            stats.finish()
        for running in (running_mean, running_var):
            if running is not None:  # written through NumPy: count the write, as torch would
                torch.autograd.graph.increment_version(running)
        y = _ops._as(y, x.dtype)

        ctx.save_for_backward(x, weight, y if epilogue is not None else None)
        ctx.stats, ctx.plan, ctx.count = (mean, invstd), pl, n
        ctx.group, ctx.epilogue = group, epilogue
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual = residual is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        mean, invstd = ctx.stats
        pl = ctx.plan
        layout = pl.layout
        host = _ops._Host(pl)
        xa, dya = host(x), host(dy)
        backend = pl.backend or _ops._backend(xa)
        # with an activation, act' is read off y's sign (contract §8)
        fused = {} if ctx.epilogue is None else {"y": host(y), "epilogue": ctx.epilogue}
        local = backend.grad_sums(dya, xa, mean, invstd, layout, **fused)
        # dgamma / dbeta are this rank's share (DDP averages them); only dx needs the sums
        # over the whole group, in one packed all-reduce.
        packed = _pack(x, local)
        dist.all_reduce(packed, group=ctx.group)
        total = host(packed)
        c = layout.channels

        dx = _ops._output_like(x)
        dz = _ops._output_like(x) if ctx.residual else None
        if dz is not None:
            fused.update(out_dz=host(dz, writeback=True), want_dz=True)
        backend.grad_apply(dya, xa, mean, invstd, host(weight), (total[:c], total[c:]),
                           layout, count=ctx.count, training=True,
                           out=host(dx, writeback=True), **fused)
        host.finish()

        need = ctx.needs_input_grad
        dweight = None
        if weight is not None and need[1]:
            dweight = _ops._tensor(local[1], x, weight.dtype).reshape(weight.shape)
        dbias = None
        if ctx.bias_dtype is not None and need[2]:
            dbias = _ops._tensor(local[0], x, ctx.bias_dtype).reshape(layout.param_shape)
        return (_ops._as(dx, x.dtype) if need[0] else None, dweight, dbias,
                _ops._as(dz, x.dtype) if dz is not None and need[3] else None, None)


def _check_finite_group(y: torch.Tensor, mean, m2, layout, group) -> None:
    """check_finite over the group: the channels whose statistics (the same on every rank)
    or whose output on any rank are not finite; all ranks raise alike, naming them."""
    bad = _ops._nonfinite_channels(y, layout)
    for stat in (mean, m2):
        bad |= ~torch.isfinite(torch.as_tensor(stat, device=bad.device)).reshape(bad.shape)
    bad = bad.to(torch.int32)
    dist.all_reduce(bad, group=group)
    if bool(bad.any()):
        S.raise_bad_channels(layout, bad.cpu().numpy() > 0)


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
    activation: str | None = None,
    negative_slope: float = 0.01,
    residual: torch.Tensor | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """Batch norm whose training statistics cover the batch of every process in the group.

        y = act(gamma * (x - mean_global) / sqrt(var_global + eps) + beta + residual)

    (the activation and the residual optional, as in :func:`batchnorm.torch.batch_norm`,
    contract §8). Every process of ``process_group`` must call it (also with an empty shard),
    and in backward every process must reach it too. Running statistics are updated in place
    with the global count (unbiased variance ``M2 / (n - 1)``). Arguments follow the rules of
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
        activation, negative_slope: None, ``"relu"`` or ``"leaky_relu"`` (slope >= 0).
        residual: None or a tensor of the input's shape, dtype and device, added before the
            activation; its gradient is returned too.
        check_finite: raise FloatingPointError naming the channels whose statistics or
            outputs are not finite; in training every rank raises alike (at the cost of one
            read of y and one all-reduce of a [C] mask), and the running statistics are left
            unchanged.
    """
    # Checked before any collective, so that a bad argument is an error here, not a hang
    # there. A shard may hold one value per channel: the count that matters is the group's.
    weight, bias, momentum, eps = _args.check(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps, count=False)
    epilogue = _args.epilogue(activation, negative_slope)
    if residual is not None:
        _args.check_residual(residual, input)
    world = _world_size(process_group)
    if not training or world == 1 or input.dim() < 2:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, batches=batches, activation=activation,
                          negative_slope=negative_slope, residual=residual,
                          check_finite=check_finite)
    return _SyncBatchNormFunction.apply(
        input, weight, bias, residual,
        (running_mean, running_var, eps, momentum, batches, process_group, world, epilogue,
         bool(check_finite)),
    )


class SyncBatchNorm(_Forward, torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm synchronized over a process group, on CPU (gloo) or GPU (NCCL).

    The constructor, parameters, buffers and state_dict of ``torch.nn.SyncBatchNorm``;
    accepts [N, C], [N, C, L], [N, C, H, W] and [N, C, D, H, W] input. It derives from the
    common base ``_BatchNorm`` rather than from ``torch.nn.SyncBatchNorm`` itself because
    DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` instance in a CPU module.
    The forward is :class:`batchnorm.torch.BatchNorm2d`'s; only training synchronizes.

    ``activation`` (None, the default, ``"relu"`` or ``"leaky_relu"``) and ``negative_slope``
    make it the synchronized form of ``BatchNormAct*d`` (contract §8): ``forward(input,
    residual=None)`` returns ``act(bn(input) + residual)``. They are plain attributes, not
    part of the state dict. There is no memory-saving mode (``inplace``) here.
    """

    activation = None
    negative_slope = 0.01

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
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
        check_finite: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device,
            dtype=dtype, check_finite=check_finite,
        )
        _args.epilogue(activation, negative_slope)  # refused here, not on the first call
        self.activation, self.negative_slope = activation, float(negative_slope)
        self.process_group = process_group

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """y = act(bn(input) + residual) (without an activation and a residual, batch norm);
        ``residual`` has the input's shape, dtype and device."""
        if residual is not None:  # refused before the batch is counted (contract §3)
            _args.check_residual(residual, input)
        return self._batch_norm(input, *self._prepare(input), residual=residual,
                                activation=self.activation, negative_slope=self.negative_slope)

    def _batch_norm(self, input, running_mean, running_var, training, momentum, batches, *,
                    residual=None, activation=None, negative_slope=0.01):
        fused = dict(activation=activation, negative_slope=negative_slope, residual=residual)
        if not self.training:  # eval is local, also when it normalizes by this shard's batch
            return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                              training, momentum, self.eps, batches=batches,
                              check_finite=self.check_finite, **fused)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                               training, momentum, self.eps, self.process_group,
                               batches=batches, check_finite=self.check_finite, **fused)

    @classmethod
    def from_batchnorm(cls, module: torch.nn.modules.batchnorm._BatchNorm, process_group=None):
        """A SyncBatchNorm holding ``module``'s parameters and buffers.

        The new module shares the Parameter and buffer tensors (as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), so device, dtype,
        requires_grad and values carry over and an optimizer built before the conversion
        still updates them; the training flag is copied.

        A fused layer (``BatchNormAct*d``, or a SyncBatchNorm with an activation) keeps its
        activation; its memory-saving mode does not carry over (the synchronized layer keeps
        its input for backward, and does not clamp ``|weight|``).

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
            activation=getattr(module, "activation", None),
            negative_slope=getattr(module, "negative_slope", 0.01),
            check_finite=getattr(module, "check_finite", False),
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
