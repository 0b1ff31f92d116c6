"""The three batch-norm operators as ``torch.library`` custom ops, with fake kernels, and the
per-call plan and implementations that both they and the eager route use.

The operators (``batchnorm::forward_training``, ``::forward_inference``, ``::backward``)
serve the calls that cannot take the eager route: ``torch.func`` transforms, tensor
subclasses, and ``check_finite=True`` under a compiler (which otherwise traces the torch
operations of :mod:`batchnorm.torch._decomp`). A compiler sees one opaque node per call,
and the fake kernels tell it the output shapes and dtypes.

Dispatch: a CPU tensor is handed to the backends as a zero-copy NumPy view
(``t.detach().numpy()``; contiguous and channels-last strides both work), the output is
allocated with ``torch.empty_like(x)`` so it keeps the input's memory format, and the backend
writes into it through ``out=``. A CUDA tensor goes to the GPU backend as it is; one that
backend refuses (float64, or Triton missing) takes a round trip through host memory and the
CPU backend, as ``"auto"`` promises a backend that can run. NumPy has no bfloat16, so a
bfloat16 CPU tensor is computed through a float32 copy and the result is rounded back.

Autograd formulas are registered in :mod:`batchnorm.torch.function`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _shapes as S
from ..backends import BackendUnavailable, select
from . import _args

_NS = "batchnorm"

# CPU tensors of these dtypes are read and written by the NumPy backends through views; the
# kernels compute in the input's dtype for the last two (float16 input goes through a copy).
_VIEWABLE = (torch.float16, torch.float32, torch.float64)
_DIRECT = (torch.float32, torch.float64)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 statistics for float64 input, float32 for every narrower float (contract §4).

    The torch-dtype form of :func:`batchnorm._shapes.stats_dtype` (NumPy has no bfloat16).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout_of(x: Tensor, mode: str) -> S.Layout:
    """x's :class:`~batchnorm._shapes.Layout` in ``mode`` (channel axis 1), sizes as they are:
    symbolic sizes under ``torch.compile`` stay symbolic (no specialization), so fake kernels
    and the double-backward formula can use it."""
    return S.Layout(tuple(x.shape), *S.mode_axes(x.dim(), mode))


def param_shape(x: Tensor, mode: str) -> tuple[int, ...]:
    """Shape of the per-channel tensors: ``(C,)`` in the spatial modes, ``x.shape[1:]`` else."""
    return layout_of(x, mode).param_shape


def check_layout(x: Tensor, mode: str, **params: Tensor | None) -> S.Layout:
    """Validate what the backends would validate, on tensors (which may live on a GPU); the
    rules are :mod:`._args`'s."""
    _args.check_input(x)
    layout = S.resolve_layout(x.shape, mode, 1)  # cached per (shape, mode)
    for name, t in params.items():
        if t is not None:
            _args.check_tensor(name, t, x, layout.param_shape, mode)
    return layout


def _needs_host(x: Tensor) -> bool:
    """Whether ``x`` runs on the NumPy backends: CPU tensors, and device tensors that the GPU
    backend refuses (float64, or no Triton), which then make a round trip through host memory.
    """
    if x.is_cpu:
        return True
    try:
        select("gpu", x)
    except BackendUnavailable:
        return True
    return False


class Plan:
    """What every call on tensors with the same metadata needs, decided once.

    A training loop calls each layer with the same shapes, strides, dtypes and devices on
    every step, so validating them, resolving the layout and choosing a backend and a kernel
    view are done on a layer's first call only (see :func:`plan`); a later call pays a
    dictionary look-up. Checks of values (``eps``, ``momentum``) still run on every call.

    Attributes:
        layout: x's validated :class:`~batchnorm._shapes.Layout`.
        sdt: the statistics dtype.
        host: the call runs on the NumPy backends (CPU tensors, and device tensors the GPU
            backend refuses, through host copies).
        direct: the CPU backend's kernels run on NumPy views of x, its output and every
            per-channel tensor, converting nothing and deciding nothing (float32 and float64
            input that its plan takes, per-channel tensors of a dtype NumPy has).
        backend: the backend module of a direct or device call (None: chosen per call).
        cpu: the CPU backend's :class:`~batchnorm.backends.cpu.Plan` of x's view when direct.
    """

    __slots__ = ("layout", "sdt", "host", "direct", "backend", "cpu")

    def __init__(self, x: Tensor, layout: S.Layout, params: tuple[Tensor | None, ...]):
        self.layout = layout
        self.sdt = stats_dtype(x.dtype)
        self.host = _needs_host(x)
        self.backend = self.cpu = None
        if not self.host:
            self.backend = select("auto", x)
        elif (x.is_cpu and x.dtype in _DIRECT
              and all(t is None or t.dtype in _VIEWABLE for t in params)
              and torch.empty_like(x).stride() == x.stride()):  # outputs in x's order
            probe = x.detach().numpy()
            backend = select("auto", probe)
            if backend.NAME == "cpu":
                cpu = backend.plan(probe, layout)
                if cpu.direct:
                    self.backend, self.cpu = backend, cpu
        self.direct = self.cpu is not None


_PLANS: dict = {}
_MAX_PLANS = 512


def plan(x: Tensor, mode: str, role: str, p1: Tensor | None = None, p2: Tensor | None = None,
         s1: Tensor | None = None, s2: Tensor | None = None) -> Plan:
    """The cached :class:`Plan` of a call, validating its tensors on a first call.

    Args:
        x: the input.
        mode: as in :func:`forward_training`.
        role: ``"training"`` (``p1, p2, s1, s2`` = weight, bias, running_mean, running_var;
            checks that there is more than one value per channel), ``"inference"`` (weight,
            bias, mean, var), ``"backward"`` (weight, -, mean, invstd of a training call) or
            ``"backward_inference"``.
    The key is everything validation and the kernel choice read: x's shape, strides, dtype
    and device, and the per-channel tensors' dtype, shape and device. A tensor that differs
    in any of them gets its own plan.
    """
    key = (mode, role, x.shape, x.stride(), x.dtype, x.device,
           None if p1 is None else (p1.dtype, p1.shape, p1.device),
           None if p2 is None else (p2.dtype, p2.shape, p2.device),
           None if s1 is None else (s1.dtype, s1.shape, s1.device),
           None if s2 is None else (s2.dtype, s2.shape, s2.device))
    pl = _PLANS.get(key)
    if pl is None:
        pl = _build_plan(x, mode, role, p1, p2, s1, s2)
        if len(_PLANS) >= _MAX_PLANS:  # ever-new shapes: start over rather than grow
            _PLANS.clear()
        _PLANS[key] = pl
    return pl


_NAMES = {
    "training": ("weight", "bias", "running_mean", "running_var"),
    "inference": ("weight", "bias", "running_mean", "running_var"),
    "backward": ("weight", "bias", "mean", "invstd"),
    "backward_inference": ("weight", "bias", "mean", "invstd"),
}


def _build_plan(x, mode, role, *params) -> Plan:
    names = _NAMES[role]
    layout = check_layout(x, mode, **dict(zip(names, params, strict=True)))
    if role in ("training", "backward"):
        S.check_training_count(layout, x.shape)
    return Plan(x, layout, params)


def _np(t):
    """A CPU tensor read by the kernels as a NumPy view (no copy: ``force`` only drops the
    autograd history, at less cost than ``detach()``); None and arrays pass through."""
    if t is None or type(t) is np.ndarray:
        return t
    return t.numpy(force=True)


def _written(t: Tensor | None):
    """A CPU tensor the kernels write (running statistics), as a NumPy view of it."""
    if t is None:
        return None
    return (t.detach() if t.requires_grad else t).numpy()


# "auto" on a NumPy array depends on its dtype alone (the GPU backend refuses every array),
# so the choice is made once per dtype instead of on every call.
_AUTO_BY_DTYPE: dict = {}


def _backend(xa):
    """The backend that "auto" picks for ``xa`` (a NumPy array or a device tensor)."""
    if isinstance(xa, Tensor):
        return select("auto", xa)
    backend = _AUTO_BY_DTYPE.get(xa.dtype)
    if backend is None:
        backend = _AUTO_BY_DTYPE[xa.dtype] = select("auto", xa)
    return backend


class _Host:
    """Turns tensors into what the backend takes, and remembers stand-ins to copy back.

    On the NumPy path a CPU tensor becomes a NumPy view (no copy), except bfloat16, which
    NumPy cannot represent: it becomes a float32 copy. A device tensor on that path becomes a
    host copy. Stand-ins of tensors the backend writes are copied back by :meth:`finish`.
    Otherwise (the GPU backend) tensors pass through.
    """

    __slots__ = ("numpy", "copies")

    def __init__(self, pl: Plan):
        self.numpy = pl.host
        self.copies: list[tuple[Tensor, Tensor]] = []

    def __call__(self, t: Tensor | None, *, writeback: bool = False):
        if t is None or not self.numpy:
            return t
        if t.is_cpu and t.dtype != torch.bfloat16:  # the common case: a view, no copy
            return (t.detach() if t.requires_grad else t).numpy()
        t = t.detach()
        host = t.cpu()
        if host.dtype == torch.bfloat16:
            host = host.float()
        if writeback:
            self.copies.append((t, host))
        return host.numpy()

    def finish(self) -> None:
        """Copy the stand-ins that the backend wrote back into their tensors."""
        for target, host in self.copies:
            target.copy_(host)


def _output_like(x: Tensor) -> Tensor:
    # empty_like keeps channels-last; bfloat16 results are produced in float32 first.
    if x.dtype == torch.bfloat16 and x.is_cpu:
        return torch.empty_like(x, dtype=torch.float32)
    return torch.empty_like(x)


def _tensor(a, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A backend result as a tensor on x's device (and of ``dtype`` if given)."""
    t = a if isinstance(a, Tensor) else torch.from_numpy(a)
    if not x.is_cpu:
        t = t.to(x.device)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _updated(running: Tensor | None, x: Tensor) -> Tensor:
    # A fresh copy for the backend to update, or an empty stand-in (ops cannot return None).
    if running is None:
        return x.new_empty((0,), dtype=stats_dtype(x.dtype))
    return running.detach().clone()


_increment_version = torch.autograd.graph.increment_version


def _raise_if_bad(bad, layout: S.Layout, restore) -> None:
    """check_finite: raise naming the non-finite channels, after putting the running
    statistics back as they were (a call that raises leaves them unchanged, contract §3)."""
    if bad is not None and bool(bad.any()):
        for target, before in restore:
            target.copy_(before)
        S.raise_bad_channels(layout, bad)


def running_momentum(momentum: float, batches: Tensor | None) -> float:
    """The running-average factor: ``momentum``, or ``1 / batches`` (at least 1) when the
    count of batches seen is given (torch.nn's ``momentum=None``, a cumulative average)."""
    return momentum if batches is None else 1.0 / max(float(batches), 1.0)


def train(pl: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None,
          running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
          eps: float, batches: Tensor | None = None, check_finite: bool = False):
    """(y, mean, invstd) with the batch's statistics, updating the running statistics in place.

    ``mean`` and ``invstd`` are NumPy arrays on the direct path (the eager route keeps them
    for its backward as they are) and tensors otherwise; :func:`training_impl` returns
    tensors.
    """
    momentum = running_momentum(momentum, batches)
    # eps and momentum were checked by batch_norm (torch's rules: any real momentum)
    restore = [(t, t.detach().clone()) for t in (running_mean, running_var)
               if t is not None] if check_finite else ()
    if pl.direct:  # CPU tensors the kernels read as they are: no conversion, no decision
        y = torch.empty_like(x)
        mean, invstd, bad = pl.cpu.train(
            x.numpy(force=True), None if weight is None else weight.numpy(force=True),
            None if bias is None else bias.numpy(force=True), eps, momentum,
            _written(running_mean), _written(running_var), y.numpy(), bool(check_finite))
    else:
        host = _Host(pl)
        xa = host(x)
        y = _output_like(x)
        _, mean, invstd, bad = (pl.backend or _backend(xa)).forward_training(
            xa, host(weight), host(bias), pl.layout, eps=eps, momentum=momentum,
            running_mean=host(running_mean, writeback=True),
            running_var=host(running_var, writeback=True),
            out=host(y, writeback=True), check_finite=check_finite,
        )
        host.finish()
        y = _as(y, x.dtype)
        mean, invstd = _tensor(mean, x), _tensor(invstd, x)
    # The backend wrote the running statistics through NumPy, behind autograd's back: count
    # the write, as an in-place torch operation would, so stale saved copies are detected.
    if running_mean is not None:
        _increment_version(running_mean)
    if running_var is not None:
        _increment_version(running_var)
    if check_finite:
        _raise_if_bad(bad, pl.layout, restore)
    return y, mean, invstd


def training_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                  eps: float, mode: str, batches: Tensor | None = None,
                  check_finite: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mu, invstd) of :func:`forward_training`, updating the running statistics in place.

    The custom op calls this on copies of the running statistics, since an operator with an
    autograd formula may not mutate its inputs.
    """
    pl = plan(x, mode, "training", weight, bias, running_mean, running_var)
    y, mean, invstd = train(pl, x, weight, bias, running_mean, running_var, momentum, eps,
                            batches, check_finite)
    return y, _tensor(mean, x), _tensor(invstd, x)


def infer(pl: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
          var: Tensor, eps: float, check_finite: bool = False) -> Tensor:
    """y with the given statistics (eps checked by batch_norm, torch's rules)."""
    if pl.direct:
        y = torch.empty_like(x)
        pl.cpu.infer(_np(x), _np(weight), _np(bias), _np(mean), _np(var), eps, y.numpy())
    else:
        host = _Host(pl)
        xa = host(x)
        y = _output_like(x)
        (pl.backend or _backend(xa)).forward_inference(
            xa, host(weight), host(bias), host(mean), host(var), pl.layout, eps=eps,
            out=host(y, writeback=True),
        )
        host.finish()
        y = _as(y, x.dtype)
    if check_finite:
        _raise_if_bad(_nonfinite_channels(y, pl.layout), pl.layout, ())
    return y


def _nonfinite_channels(y: Tensor, layout: S.Layout) -> Tensor:
    """[param_shape] mask of the channels of y holding an Inf or NaN (inference has no
    kernel flag for it: one extra read of y, only when asked)."""
    return (~torch.isfinite(y)).any(dim=layout.reduce_axes)


def inference_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                   var: Tensor, eps: float, mode: str, check_finite: bool = False) -> Tensor:
    """y of :func:`forward_inference` (the custom op's implementation)."""
    pl = plan(x, mode, "inference", weight, bias, mean, var)
    return infer(pl, x, weight, bias, mean, var, eps, check_finite)


def grad(pl: Plan, dy: Tensor, x: Tensor, weight: Tensor | None, mean, invstd,
         training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) with ``pl`` the plan that validated x and weight; ``mean`` and
    ``invstd`` as the forward returned them (NumPy arrays on the direct path)."""
    if dy.shape != x.shape:
        S.check_same_shape("dy", dy, pl.layout)
    dya = dy.numpy(force=True) if pl.direct else None
    if pl.direct and pl.cpu.takes(dya):  # the training loop's case: dy in x's order
        dx = torch.empty_like(x)
        dweight, dbias = pl.cpu.grad(
            dya, x.numpy(force=True), None if weight is None else weight.numpy(force=True),
            _np(mean), _np(invstd), bool(training), dx.numpy())
        return (dx, _zeros(pl, x) if dweight is None else torch.from_numpy(dweight),
                torch.from_numpy(dbias))
    if pl.direct:  # the CPU backend decides how to read dy
        dx = torch.empty_like(x)
        _, dweight, dbias = pl.backend.backward(
            dya, _np(x), _np(weight), _np(mean), _np(invstd), pl.layout, training=training,
            out=dx.numpy(), plan_=pl.cpu)
    else:
        host = _Host(pl)
        xa = host(x)
        dx = _output_like(x)
        _, dweight, dbias = (pl.backend or _backend(xa)).backward(
            host(dy), xa, host(weight), host(mean), host(invstd), pl.layout,
            training=training, out=host(dx, writeback=True),
        )
        host.finish()
        dx = _as(dx, x.dtype)
    if dweight is None:
        dweight = _zeros(pl, x)
    return dx, _tensor(dweight, x, pl.sdt), _tensor(dbias, x, pl.sdt)


def _zeros(pl: Plan, x: Tensor) -> Tensor:
    # dweight of a call without weight: the op's schema returns a tensor
    return torch.zeros(pl.layout.param_shape, dtype=pl.sdt, device=x.device)


def backward_impl(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                  training: bool, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of :func:`backward` (the custom op's implementation)."""
    role = "backward" if training else "backward_inference"
    pl = plan(x, mode, role, weight, None, mean, invstd)
    return grad(pl, dy, x, weight, mean, invstd, training)


# Functional (mutates nothing) because torch.library refuses autograd formulas for mutating
# operators: the updated running statistics are returned, and ``batch_norm`` copies them into
# the buffers. They are per-channel, so the copies cost nothing next to the input.
@torch.library.custom_op(f"{_NS}::forward_training", mutates_args=())
def forward_training(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None,
                     momentum: float, eps: float, mode: str, batches: Tensor | None = None,
                     check_finite: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mu, invstd, new_running_mean, new_running_var) with the batch's statistics.

    y = weight * (x - mu) * invstd + bias; new_running = (1 - momentum) * running
    + momentum * batch value (the variance unbiased), or an empty tensor when not given.

    Args:
        x: [N, C, *spatial] input (any strides).
        weight, bias: [param_shape] or None.
        running_mean, running_var: [param_shape] or None; read, not modified.
        momentum, eps: as in contract §3 and §1.
        mode: ``"spatial"``, ``"spatial_persistent"`` or ``"per_activation"``.
        batches: optional one-element count of batches seen, this one included; when given,
            ``momentum`` is replaced by ``1 / batches`` (a cumulative average). Read here,
            inside the operator, so that a compiled graph need not know its value.
        check_finite: raise FloatingPointError naming the channels whose statistics or
            outputs are not finite.
    """
    new_mean, new_var = _updated(running_mean, x), _updated(running_var, x)
    y, mean, invstd = training_impl(
        x, weight, bias, new_mean if running_mean is not None else None,
        new_var if running_var is not None else None, momentum, eps, mode, batches,
        check_finite,
    )
    return y, mean, invstd, new_mean, new_var


@forward_training.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, mode, batches=None,
      check_finite=False):
    return _training_outputs_like(x, running_mean, running_var, mode)


def _training_outputs_like(x, running_mean, running_var, mode):
    """Empty stand-ins of a training operator's outputs (y, mean, invstd, new running mean
    and variance), for the fake kernels."""
    shape, sdt = param_shape(x, mode), stats_dtype(x.dtype)

    def like(r):
        return x.new_empty((0,), dtype=sdt) if r is None else torch.empty_like(r)

    return (torch.empty_like(x), x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt),
            like(running_mean), like(running_var))


@torch.library.custom_op(f"{_NS}::forward_inference", mutates_args=())
def forward_inference(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                      var: Tensor, eps: float, mode: str, check_finite: bool = False) -> Tensor:
    """y = weight * (x - mean) / sqrt(var + eps) + bias with the given statistics.

    Args:
        x: [N, C, *spatial] input.
        weight, bias: [param_shape] or None.
        mean, var: [param_shape] statistics (usually the running ones).
        eps, mode: as in :func:`forward_training`.
        check_finite: raise FloatingPointError naming the channels of y that hold an Inf
            or NaN.
    """
    return inference_impl(x, weight, bias, mean, var, eps, mode, check_finite)


@forward_inference.register_fake
def _(x, weight, bias, mean, var, eps, mode, check_finite=False):
    return torch.empty_like(x)


@torch.library.custom_op(f"{_NS}::backward", mutates_args=())
def backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
             training: bool, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias from dy and the saved statistics (contract §1).

    dx = weight * invstd * (dy - (dbias + xhat * dweight) / M) in training, and
    dx = weight * invstd * dy in inference. ``dweight`` is zeros when ``weight`` is None.

    Args:
        dy, x: [N, C, *spatial] upstream gradient and forward input.
        weight: [param_shape] or None.
        mean, invstd: [param_shape] saved statistics (stats dtype).
        training: whether the statistics were the batch's own.
        mode: as in :func:`forward_training`.
    """
    return backward_impl(dy, x, weight, mean, invstd, training, mode)


@backward.register_fake
def _(dy, x, weight, mean, invstd, training, mode):
    shape, sdt = param_shape(x, mode), stats_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt)


# ---- the fused forms (contract §8): y = act(bn(x) + residual), and the memory-saving mode

def _epilogue_kw(residual, epilogue) -> dict:
    """The backends' epilogue keywords, only those used: plain batch norm passes none."""
    kw = {}
    if residual is not None:
        kw["residual"] = residual
    if epilogue is not None:
        kw["epilogue"] = epilogue
    return kw


def _target(host: _Host, x: Tensor, xa, inplace: bool):
    """(y, its stand-in for the backend): a fresh output, or x itself in the memory-saving
    mode (the backend then writes over the array it reads, which the backends allow)."""
    if not inplace:
        y = _output_like(x)
        return y, host(y, writeback=True)
    if host.numpy and not (x.is_cpu and x.dtype != torch.bfloat16):
        host.copies.append((x.detach(), torch.from_numpy(xa)))  # a host copy: write it back
    return x, xa


def train_fused(pl: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                residual: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float, eps: float, epilogue,
                inplace: bool = False, batches: Tensor | None = None,
                check_finite: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) of ``y = act(weight * xhat + bias + residual)`` with the batch's
    statistics, updating the running statistics in place (as :func:`train`).

    ``mean`` and ``invstd`` are NumPy arrays on the direct path and tensors otherwise, as
    :func:`train` returns them. ``inplace``: y is written over x (the memory-saving mode;
    the caller checked its conditions and clamped ``weight``) and x is returned. With
    ``check_finite`` y is computed into a fresh tensor first and copied over x once it is
    known to be finite, so that a call that raises leaves x as it was (contract §3).
    """
    momentum = running_momentum(momentum, batches)
    restore = [(t, t.detach().clone()) for t in (running_mean, running_var)
               if t is not None] if check_finite else ()
    over_x = inplace and not check_finite
    if pl.direct and (residual is None or residual.stride() == x.stride()):
        xa = _np(x)
        y = x if over_x else torch.empty_like(x)
        mean, invstd, bad = pl.cpu.train(
            xa, _np(weight), _np(bias), eps, momentum, _written(running_mean),
            _written(running_var), xa if over_x else y.numpy(), bool(check_finite),
            residual=_np(residual), epilogue=epilogue)
    else:
        host = _Host(pl)
        xa = host(x)
        y, ya = _target(host, x, xa, over_x)
        _, mean, invstd, bad = (pl.backend or _backend(xa)).forward_training(
            xa, host(weight), host(bias), pl.layout, eps=eps, momentum=momentum,
            running_mean=host(running_mean, writeback=True),
            running_var=host(running_var, writeback=True), out=ya, check_finite=check_finite,
            **_epilogue_kw(host(residual), epilogue),
        )
        host.finish()
    for t in (running_mean, running_var, y if y is x else None):
        if t is not None:  # written through NumPy: count the write, as torch would
            torch.autograd.graph.increment_version(t)
    if check_finite:
        _raise_if_bad(bad, pl.layout, restore)
    y = _as(y, x.dtype)
    if inplace and y is not x:
        with torch.no_grad():
            x.copy_(y)
        y = x
    return y, mean, invstd


def infer_fused(pl: Plan, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                residual: Tensor | None, mean: Tensor, var: Tensor, eps: float, epilogue,
                inplace: bool = False, check_finite: bool = False) -> Tensor:
    """``y = act(weight * (x - mean) / sqrt(var + eps) + bias + residual)``, written over x
    when ``inplace`` (as in :func:`train_fused`)."""
    over_x = inplace and not check_finite
    if pl.direct and (residual is None or residual.stride() == x.stride()):
        xa = _np(x)
        y = x if over_x else torch.empty_like(x)
        pl.cpu.infer(xa, _np(weight), _np(bias), _np(mean), _np(var), eps,
                     xa if over_x else y.numpy(), residual=_np(residual), epilogue=epilogue)
    else:
        host = _Host(pl)
        xa = host(x)
        y, ya = _target(host, x, xa, over_x)
        (pl.backend or _backend(xa)).forward_inference(
            xa, host(weight), host(bias), host(mean), host(var), pl.layout, eps=eps, out=ya,
            **_epilogue_kw(host(residual), epilogue),
        )
        host.finish()
    if y is x:
        torch.autograd.graph.increment_version(x)
    y = _as(y, x.dtype)
    if check_finite:
        _raise_if_bad(_nonfinite_channels(y, pl.layout), pl.layout, ())
    if inplace and y is not x:
        with torch.no_grad():
            x.copy_(y)
        y = x
    return y


def _beta_read(pl: Plan, x, bias, epilogue, residual: bool, ref: Tensor):
    """The shift backward is given: the memory-saving mode recovers xhat with it, and with
    an activation and no residual in the forward (pre is then a function of x and the
    statistics) it lets the CPU backend take act' from x, reading y only where x leaves its
    sign in doubt (zeros without a bias). None otherwise."""
    if x is None:
        return bias
    if epilogue is None or residual:
        return None
    if bias is None:
        return torch.zeros(pl.layout.param_shape, dtype=pl.sdt, device=ref.device)
    return bias


def grad_fused(pl: Plan, dy: Tensor, x: Tensor | None, y: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
               training: bool, epilogue, want_dz: bool, residual: bool | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, dweight, dbias, dz) of a fused forward (contract §8), ``dz`` None unless
    ``want_dz``: with g = dy * act'(pre) (read off y's sign), §1's formulas with dy replaced
    by g, and dz = g. ``residual``: whether the forward added one (``want_dz`` when None).

    ``mean`` and ``invstd`` as the forward returned them (NumPy arrays on the direct path).
    ``x`` None is the memory-saving mode: xhat is recovered from ``y`` as
    ``(act^-1(y) - bias) / weight`` (weight as the forward used it, clamped). ``y`` is needed
    with an activation or without x. ``pl`` is the plan of the forward's input (any tensor
    of its shape, strides and dtype).
    """
    ref = x if x is not None else y
    if dy.shape != ref.shape:
        S.check_same_shape("dy", dy, pl.layout)
    yr = y if epilogue is not None or x is None else None  # what backward reads of y
    beta = _beta_read(pl, x, bias, epilogue, want_dz if residual is None else residual, ref)
    if pl.direct:
        dya = _np(dy)
        if pl.cpu.takes(dya) and (yr is None or yr.stride() == ref.stride()):
            dx = torch.empty_like(ref)
            dz = torch.empty_like(ref) if want_dz else None
            dweight, dbias = pl.cpu.grad(
                dya, _np(x), _np(weight), _np(mean), _np(invstd), bool(training), dx.numpy(),
                y=_np(yr), beta=_np(beta), epilogue=epilogue,
                dz=None if dz is None else dz.numpy())
            if dweight is None:
                dweight = torch.zeros(pl.layout.param_shape, dtype=pl.sdt, device=ref.device)
            return dx, _tensor(dweight, ref, pl.sdt), _tensor(dbias, ref, pl.sdt), dz
    host = _Host(pl)
    mean, invstd = _tensor(mean, ref), _tensor(invstd, ref)  # arrays from a direct forward
    dx = _output_like(ref)
    dz = _output_like(ref) if want_dz else None
    kw: dict = {}
    if yr is not None:
        kw["y"] = host(yr)
    if beta is not None:
        kw["beta"] = host(beta)
    if epilogue is not None:
        kw["epilogue"] = epilogue
    if want_dz:
        kw["residual"], kw["out_dz"] = True, host(dz, writeback=True)
    dya = host(dy)
    result = (pl.backend or _backend(dya)).backward(
        dya, host(x), host(weight), host(mean), host(invstd), pl.layout, training=training,
        out=host(dx, writeback=True), **kw)
    host.finish()
    dweight, dbias = result[1], result[2]
    if dweight is None:
        dweight = torch.zeros(pl.layout.param_shape, dtype=pl.sdt, device=ref.device)
    if want_dz:
        dz = _as(dz, ref.dtype)
    return (_as(dx, ref.dtype), _tensor(dweight, ref, pl.sdt), _tensor(dbias, ref, pl.sdt),
            dz)


# The fused forms as operators, for the compilers (the eager route calls the functions above
# directly). They write no input: the memory-saving mode is a flag, ``recover``, that makes
# the autograd formula save y instead of x (batchnorm.torch.fused), and batch_norm writes y
# over the input after the call.

def _epilogue_of(activation: str | None, negative_slope: float):
    return _args.epilogue(activation, negative_slope)


@torch.library.custom_op(f"{_NS}::forward_training_fused", mutates_args=())
def forward_training_fused(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                           residual: Tensor | None, running_mean: Tensor | None,
                           running_var: Tensor | None, momentum: float, eps: float, mode: str,
                           batches: Tensor | None, check_finite: bool, activation: str | None,
                           negative_slope: float, recover: bool
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mu, invstd, new_running_mean, new_running_var) of
    ``y = act(weight * xhat + bias + residual)`` with the batch's statistics (contract §8).

    Args:
        x, weight, bias, running_mean, running_var, momentum, eps, mode, batches,
            check_finite: as in :func:`forward_training`.
        residual: [x.shape] tensor of x's dtype added before the activation, or None.
        activation, negative_slope: None, ``"relu"`` or ``"leaky_relu"`` with its slope.
        recover: the memory-saving mode (weight already clamped away from 0 by the caller):
            backward recovers xhat from y and saves no x. The values are the same.
    """
    new_mean, new_var = _updated(running_mean, x), _updated(running_var, x)
    pl = plan(x, mode, "training", weight, bias, running_mean, running_var)
    y, mean, invstd = train_fused(
        pl, x, weight, bias, residual, new_mean if running_mean is not None else None,
        new_var if running_var is not None else None, momentum, eps,
        _epilogue_of(activation, negative_slope), False, batches, check_finite)
    return y, _tensor(mean, x), _tensor(invstd, x), new_mean, new_var


@forward_training_fused.register_fake
def _(x, weight, bias, residual, running_mean, running_var, momentum, eps, mode, batches,
      check_finite, activation, negative_slope, recover):
    return _training_outputs_like(x, running_mean, running_var, mode)


@torch.library.custom_op(f"{_NS}::forward_inference_fused", mutates_args=())
def forward_inference_fused(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                            residual: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                            mode: str, check_finite: bool, activation: str | None,
                            negative_slope: float, recover: bool) -> Tensor:
    """``y = act(weight * (x - mean) / sqrt(var + eps) + bias + residual)``; arguments as in
    :func:`forward_training_fused` and :func:`forward_inference`."""
    pl = plan(x, mode, "inference", weight, bias, mean, var)
    return infer_fused(pl, x, weight, bias, residual, mean, var, eps,
                       _epilogue_of(activation, negative_slope), False, check_finite)


@forward_inference_fused.register_fake
def _(x, weight, bias, residual, mean, var, eps, mode, check_finite, activation,
      negative_slope, recover):
    return torch.empty_like(x)


def _no_dz(x: Tensor) -> Tensor:
    return x.new_empty((0,))  # an operator cannot return None


@torch.library.custom_op(f"{_NS}::backward_fused", mutates_args=())
def backward_fused(dy: Tensor, x: Tensor, y: Tensor | None, weight: Tensor | None,
                   bias: Tensor | None, mean: Tensor, invstd: Tensor, training: bool,
                   mode: str, activation: str | None, negative_slope: float, residual: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dz) of a fused forward (contract §8); ``dz`` (= g, the residual's
    gradient) is an empty tensor unless ``residual`` (the forward added one).

    Args:
        dy, x: [N, C, *spatial] upstream gradient and forward input.
        y: the forward's output (its sign gives act'), or None without an activation.
        weight, mean, invstd, training, mode: as in :func:`backward`.
        bias: the forward's, or None: with it (and no residual) a backend may take act'
            from x and the statistics, reading y only where they leave its sign in doubt.
        activation, negative_slope: the forward's.
        residual: whether the forward added a residual.
    """
    role = "backward" if training else "backward_inference"
    pl = plan(x, mode, role, weight, bias, mean, invstd)
    dx, dweight, dbias, dz = grad_fused(pl, dy, x, y, weight, bias, mean, invstd, training,
                                        _epilogue_of(activation, negative_slope), residual)
    return dx, dweight, dbias, dz if dz is not None else _no_dz(x)


@backward_fused.register_fake
def _(dy, x, y, weight, bias, mean, invstd, training, mode, activation, negative_slope,
      residual):
    shape, sdt = param_shape(x, mode), stats_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt),
            torch.empty_like(x) if residual else _no_dz(x))


@torch.library.custom_op(f"{_NS}::backward_recover", mutates_args=())
def backward_recover(dy: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
                     invstd: Tensor, training: bool, mode: str, activation: str | None,
                     negative_slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of the memory-saving mode, from y alone (contract §8): xhat is
    recovered as ``(act^-1(y) - bias) / weight``.

    Args:
        dy, y: [N, C, *spatial] upstream gradient and forward output.
        weight: [param_shape] as the forward used it (every |weight| >= GAMMA_MIN), or None.
        bias: [param_shape] or None.
        invstd: [param_shape] the forward's 1 / sqrt(var + eps).
        training, mode: as in :func:`backward`.
        activation, negative_slope: the forward's (None, or leaky_relu with a slope > 0).
    """
    role = "backward" if training else "backward_inference"
    pl = plan(y, mode, role, weight, bias, invstd, invstd)
    dx, dweight, dbias, _ = grad_fused(pl, dy, None, y, weight, bias, torch.zeros_like(invstd),
                                       invstd, training,
                                       _epilogue_of(activation, negative_slope), False)
    return dx, dweight, dbias


@backward_recover.register_fake
def _(dy, y, weight, bias, invstd, training, mode, activation, negative_slope):
    shape, sdt = param_shape(y, mode), stats_dtype(y.dtype)
    return torch.empty_like(y), y.new_empty(shape, dtype=sdt), y.new_empty(shape, dtype=sdt)
