"""The three batch-norm operators as ``torch.library`` custom ops, with fake kernels.

Registering them as operators (``batchnorm::forward_training``, ``::forward_inference``,
``::backward``) rather than calling NumPy from an ``autograd.Function`` is what lets
``torch.compile(..., fullgraph=True)`` trace a model through them: the compiler sees one
opaque node per call, and the fake kernels tell it the output shapes and dtypes.

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

import torch
from torch import Tensor

from .. import _shapes as S
from ..backends import BackendUnavailable, select
from . import _args

_NS = "batchnorm"


def param_shape(x: Tensor, mode: str) -> tuple[int, ...]:
    """Shape of the per-channel tensors: ``(C,)`` in the spatial modes, ``x.shape[1:]`` else."""
    return tuple(x.shape[1:]) if mode == "per_activation" else (x.shape[1],)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 statistics for float64 input, float32 for every narrower float (contract §4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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

    def __init__(self, x: Tensor):
        self.numpy = _needs_host(x)
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


def training_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                  eps: float, mode: str, batches: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, S.Layout]:
    """(y, mu, invstd, layout) of :func:`forward_training`, updating the running statistics
    in place.

    The eager path calls this directly; the custom op calls it on copies of the running
    statistics, since an operator with an autograd formula may not mutate its inputs.
    """
    layout = check_layout(x, mode, weight=weight, bias=bias, running_mean=running_mean,
                          running_var=running_var)
    if batches is not None:
        momentum = 1.0 / max(float(batches), 1.0)
    # momentum and eps were checked by batch_norm (torch's rules: any real momentum)
    S.check_training_count(layout)
    host = _Host(x)
    xa = host(x)
    y = _output_like(x)
    _, mean, invstd, _ = _backend(xa).forward_training(
        xa, host(weight), host(bias), layout, eps=eps, momentum=momentum,
        running_mean=host(running_mean, writeback=True),
        running_var=host(running_var, writeback=True),
        out=host(y, writeback=True), check_finite=False,
    )
    host.finish()
    # The backend wrote the running statistics through NumPy, behind autograd's back: count
    # the write, as an in-place torch operation would, so stale saved copies are detected.
    for running in (running_mean, running_var):
        if running is not None:
            torch.autograd.graph.increment_version(running)
    return _as(y, x.dtype), _tensor(mean, x), _tensor(invstd, x), layout


def inference_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                   var: Tensor, eps: float, mode: str) -> tuple[Tensor, S.Layout]:
    """(y, layout) of :func:`forward_inference` (shared by the custom op and the eager path)."""
    layout = check_layout(x, mode, weight=weight, bias=bias, running_mean=mean, running_var=var)
    host = _Host(x)
    xa = host(x)
    y = _output_like(x)
    _backend(xa).forward_inference(
        xa, host(weight), host(bias), host(mean), host(var), layout, eps=eps,
        out=host(y, writeback=True),
    )
    host.finish()
    return _as(y, x.dtype), layout


def backward_impl(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                  training: bool, mode: str, layout: S.Layout | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of :func:`backward` (shared by the custom op and the eager path).

    ``layout``, when given, is the one the forward validated ``x`` and ``weight`` with (the
    statistics are the forward's own), so only ``dy`` is checked again.
    """
    if layout is None:
        layout = check_layout(x, mode, weight=weight, mean=mean, invstd=invstd)
        if training:
            S.check_training_count(layout)
    if dy.shape != layout.shape:
        S.check_same_shape("dy", dy, layout)
    host = _Host(x)
    xa = host(x)
    dx = _output_like(x)
    _, dweight, dbias = _backend(xa).backward(
        host(dy), xa, host(weight), host(mean), host(invstd), layout, training=training,
        out=host(dx, writeback=True),
    )
    host.finish()
    sdt = stats_dtype(x.dtype)
    if dweight is None:
        dweight = torch.zeros(layout.param_shape, dtype=sdt, device=x.device)
    return _as(dx, x.dtype), _tensor(dweight, x, sdt), _tensor(dbias, x, sdt)


# Functional (mutates nothing) because torch.library refuses autograd formulas for mutating
# operators: the updated running statistics are returned, and ``batch_norm`` copies them into
# the buffers. They are per-channel, so the copies cost nothing next to the input.
@torch.library.custom_op(f"{_NS}::forward_training", mutates_args=())
def forward_training(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None,
                     momentum: float, eps: float, mode: str, batches: Tensor | None = None
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
    """
    new_mean, new_var = _updated(running_mean, x), _updated(running_var, x)
    y, mean, invstd, _ = training_impl(
        x, weight, bias, new_mean if running_mean is not None else None,
        new_var if running_var is not None else None, momentum, eps, mode, batches,
    )
    return y, mean, invstd, new_mean, new_var


@forward_training.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, mode, batches=None):
    shape, sdt = param_shape(x, mode), stats_dtype(x.dtype)

    def like(r):
        return x.new_empty((0,), dtype=sdt) if r is None else torch.empty_like(r)

    return (torch.empty_like(x), x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt),
            like(running_mean), like(running_var))


@torch.library.custom_op(f"{_NS}::forward_inference", mutates_args=())
def forward_inference(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                      var: Tensor, eps: float, mode: str) -> Tensor:
    """y = weight * (x - mean) / sqrt(var + eps) + bias with the given statistics.

    Args:
        x: [N, C, *spatial] input.
        weight, bias: [param_shape] or None.
        mean, var: [param_shape] statistics (usually the running ones).
        eps, mode: as in :func:`forward_training`.
    """
    return inference_impl(x, weight, bias, mean, var, eps, mode)[0]


@forward_inference.register_fake
def _(x, weight, bias, mean, var, eps, mode):
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
