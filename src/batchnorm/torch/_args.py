"""The argument rules of ``torch.nn.functional.batch_norm``, checked before anything runs.

:func:`check` is called by :func:`batchnorm.torch.batch_norm` on every call and refuses what
torch 2.13 refuses (contract §5; the few deliberate differences are in contract §7). It reads
only what a tensor carries beside its data (dtype, shape, device, ``requires_grad``) and
Python scalars: no tensor operation, no device synchronisation, so meta and fake tensors pass
through it and it traces under ``torch.compile``.

It is two halves. :func:`scalars` looks at the Python arguments. :func:`tensors` depends only
on each tensor's (shape, dtype, device), on which optional tensors are given, on ``training``
and ``mode``, and on grad mode with the running statistics' ``requires_grad``: a caller that
caches a plan per such key can run it once per key.

Exceptions are instances of both the type the NumPy API raises for the same fault (contract
§5: ``ValueError`` for values and shapes, ``TypeError`` for types) and the type torch raises
(mostly ``RuntimeError``), so code written against either catches them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _shapes as S


class ArgumentError(ValueError, RuntimeError):
    """A refused value, shape or device (torch raises RuntimeError or ValueError for these)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A refused Python type or tensor dtype (torch: TypeError, or RuntimeError for dtypes)."""


class UnsupportedDTypeError(ArgumentTypeError, NotImplementedError):
    """An input dtype batch norm is not defined for (torch: NotImplementedError)."""


class RankError(ArgumentError, IndexError):
    """Input of rank 0 or 1 (torch: IndexError or RuntimeError, depending on the arguments)."""


INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NARROW = (torch.float16, torch.bfloat16)
# What torch's argument parser takes for a ``float`` argument (bool is an int).
_REAL = (int, float, np.integer, np.floating, np.bool_)


def real(name: str, value) -> float:
    """``value`` as a float where torch's argument parser takes it as one, else a TypeError.

    Python and NumPy reals (bools included) and 0-d tensors that do not require grad, as
    ``torch.nn.functional.batch_norm`` takes them; None, strings, complex numbers, arrays and
    other tensors are refused.
    """
    if type(value) is float:  # the common case first
        return value
    if isinstance(value, _REAL):
        return float(value)
    if isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad \
            and not value.is_complex():
        return float(value)
    hint = ""
    if name == "momentum" and value is None:
        hint = ("; momentum=None (a cumulative average) is a module setting: the functional "
                "form takes the factor itself (1 / number of batches), or `batches=`")
    raise ArgumentTypeError(f"`{name}` must be a real number, got {type(value).__name__}{hint}")


def scalars(training, momentum, eps) -> tuple[float, float]:
    """(momentum, eps) as floats after torch's rules: ``training`` a bool; any real
    ``momentum`` (NaN and values outside [0, 1] included, as torch takes them); ``eps > 0`` in
    training and ``eps >= 0`` otherwise (NaN and Inf pass, as in torch)."""
    if training is not True and training is not False:
        raise ArgumentTypeError(
            f"`training` must be a bool, got {type(training).__name__}"
            + (" (a tensor's value would need a device read on every call)"
               if isinstance(training, Tensor) else "")
        )
    momentum = real("momentum", momentum)
    eps = real("eps", eps)
    if training and eps <= 0.0:
        raise ArgumentError(
            f"batch_norm eps must be positive during training, but got {eps}: it keeps "
            "1 / sqrt(var + eps) finite for a channel whose batch values are all equal"
        )
    if eps < 0.0:
        raise ArgumentError(f"batch_norm eps must be non-negative, but got {eps}")
    return momentum, eps


def check_input(x) -> None:
    """``x`` is a tensor of a dtype batch norm is defined for."""
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"`input` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise UnsupportedDTypeError(
            f"batch_norm is defined for float16, bfloat16, float32 and float64 input, "
            f"got {x.dtype}"
        )


def check_tensor(name: str, t, x: Tensor, pshape: tuple[int, ...], mode: str) -> None:
    """A per-channel tensor: a floating-point tensor of shape ``pshape`` on x's device."""
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"`{name}` must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ArgumentTypeError(f"`{name}` must have a floating-point dtype, got {t.dtype}")
    if t.shape != pshape:
        raise ArgumentError(
            f"`{name}` must have shape {tuple(pshape)} (the kept axes of an input of shape "
            f"{tuple(x.shape)} in mode {mode!r}), got shape {tuple(t.shape)}"
        )
    # is_cpu answers the common case without building two device objects
    if not (x.is_cpu and t.is_cpu) and t.device != x.device:
        raise ArgumentError(f"`{name}` is on {t.device} but the input is on {x.device}")


def _dtype_error(x: Tensor, given) -> ArgumentTypeError:
    listed = ", ".join(f"`{n}` {t.dtype}" for n, t in given if t is not None)
    want = f"all {x.dtype} or all torch.float32" if x.dtype in _NARROW else f"{x.dtype}"
    return ArgumentTypeError(
        f"the parameters and running statistics of a {x.dtype} input must be {want} "
        f"(as in torch.nn.functional.batch_norm); got {listed}"
    )


def _slow_path(x: Tensor, running_mean, running_var, weight, bias, pshape, mode: str):
    """(weight, bias, common dtype) by the exact rules, or the error that names the fault."""
    if mode != "per_activation":  # torch takes weight and bias of any shape of C values
        if isinstance(weight, Tensor) and weight.shape != pshape and weight.numel() == pshape[0]:
            weight = weight.reshape(pshape)
        if isinstance(bias, Tensor) and bias.shape != pshape and bias.numel() == pshape[0]:
            bias = bias.reshape(pshape)
    given = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
             ("running_var", running_var))
    for name, t in given:
        if t is not None:
            check_tensor(name, t, x, pshape, mode)
    dtypes = {t.dtype for _, t in given if t is not None}
    if len(dtypes) > 1:
        raise _dtype_error(x, given)
    return weight, bias, dtypes.pop()


def tensors(x: Tensor, running_mean, running_var, weight, bias, training: bool,
            mode: str, *, count: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) after torch's rules on the tensors (see :func:`check`); weight and bias
    reshaped to ``(C,)`` when they hold C values in another shape, as torch takes them.

    Returns them unchanged for a rank-1 empty input, which torch returns empty; every other
    input of rank below 2 is refused. ``count=False`` leaves out the "more than 1 value per
    channel" rule (a shard of a synchronized batch may hold one value).
    """
    check_input(x)
    if training:
        if (running_mean is None) != (running_var is None):
            raise ArgumentError(
                "running_mean and running_var must either both be None or neither be None"
            )
    elif running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise ArgumentError(f"{missing} must be defined in evaluation mode")
    shape = x.shape
    if len(shape) < 2:
        if len(shape) == 1 and shape[0] == 0:  # nothing to normalize: torch returns it
            return weight, bias
        raise RankError(
            f"batch_norm expects an input of rank 2 or more (N, C, ...), got shape "
            f"{tuple(shape)}"
        )
    # Not through S.Layout: this runs under torch.compile too, and dynamo cannot trace a
    # cached_property (it holds a lock on Python 3.11).
    values = shape[0]  # per channel
    if mode == "per_activation":
        pshape = tuple(shape[1:])
    elif mode in S.MODES:
        pshape = (shape[1],)
        for n in shape[2:]:  # torch's count: the batch times the spatial sizes
            values *= n
    else:
        S.resolve_layout(shape, mode, 1)  # raises, listing the valid modes
    if training and count and values == 1:
        raise S.too_few_values(shape)
    # The common case in one cheap pass: tensors of the right shape and one dtype, on x's
    # device. Anything else takes the exact checks of _slow_path.
    dtype = None
    on_cpu = x.is_cpu
    for t in (weight, bias, running_mean, running_var):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.shape != pshape or (
                not (on_cpu and t.is_cpu) and t.device != x.device) or (
                dtype is not None and t.dtype != dtype):
            weight, bias, dtype = _slow_path(x, running_mean, running_var, weight, bias, pshape,
                                             mode)
            break
        if dtype is None:
            dtype = t.dtype
    if dtype is not None and dtype != x.dtype and not (
            dtype == torch.float32 and x.dtype in _NARROW):
        raise _dtype_error(x, (("weight", weight), ("bias", bias),
                               ("running_mean", running_mean), ("running_var", running_var)))
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise ArgumentError(
                    f"`{name}` requires grad, but running statistics are buffers updated in "
                    "place, not differentiable inputs: pass a tensor created with "
                    "requires_grad=False (or detach it)"
                )
    return weight, bias


def check(x, running_mean, running_var, weight, bias, training, momentum, eps,
          mode: str = "spatial", *, count: bool = True
          ) -> tuple[Tensor | None, Tensor | None, float, float]:
    """Every argument rule of ``torch.nn.functional.batch_norm`` (see the module notes).

    Returns:
        (weight, bias, momentum, eps): weight and bias as :func:`tensors` returns them,
        momentum and eps as floats.
    """
    momentum, eps = scalars(training, momentum, eps)
    weight, bias = tensors(x, running_mean, running_var, weight, bias, training, mode,
                           count=count)
    return weight, bias, momentum, eps


# ---- the fused forms' arguments (contract §8): activation, residual, the memory-saving mode

_EPILOGUES: dict = {}


def epilogue(activation, negative_slope) -> S.Epilogue | None:
    """The activation of a fused call (None for none), after the NumPy API's rules
    (:func:`batchnorm._shapes.check_epilogue`: a slope >= 0, so that y tells the sign of its
    input), raising this module's exception types. Cached per (activation, slope)."""
    if activation is None:
        return None
    try:
        key = (activation, type(negative_slope), negative_slope)
        found = _EPILOGUES.get(key)
    except TypeError:  # unhashable: let the check name it
        key = found = None
    if found is not None:
        return found
    try:
        found = S.check_epilogue(activation, negative_slope)
    except TypeError as err:
        raise ArgumentTypeError(str(err)) from None
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    if key is not None and len(_EPILOGUES) < 64:
        _EPILOGUES[key] = found
    return found


def check_residual(z, x: Tensor) -> None:
    """The residual is a tensor of the input's shape, dtype and device (no broadcasting: it is
    added element by element, and its gradient has x's shape)."""
    if not isinstance(z, Tensor):
        raise ArgumentTypeError(f"`residual` must be a torch.Tensor or None, got "
                                f"{type(z).__name__}")
    if z.dtype != x.dtype:
        raise ArgumentTypeError(f"`residual` must have the input's dtype {x.dtype}, got "
                                f"{z.dtype}")
    if z.shape != x.shape:
        raise ArgumentError(f"`residual` must have the input's shape {tuple(x.shape)}, got "
                            f"{tuple(z.shape)}")
    if not (x.is_cpu and z.is_cpu) and z.device != x.device:
        raise ArgumentError(f"`residual` is on {z.device} but the input is on {x.device}")


_OVERLAPS: dict = {}


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded or otherwise overlapping
    view): sorted by stride, each dimension must step over all of the smaller ones. False
    answers are exact; a True may be a layout torch would also refuse to prove safe. Cached
    per (shape, strides)."""
    key = (t.shape, t.stride())
    found = _OVERLAPS.get(key)
    if found is None:
        dims = sorted((abs(st), n) for st, n in zip(key[1], key[0], strict=True) if n > 1)
        span, found = 1, False
        for stride, n in dims:
            if stride < span:
                found = True
                break
            span = stride * n
        if len(_OVERLAPS) >= 256:
            _OVERLAPS.clear()
        _OVERLAPS[key] = found
    return found


def check_inplace_mode(act: S.Epilogue | None, residual: bool) -> None:
    """The memory-saving mode's conditions (:func:`batchnorm._shapes.inplace_refusal`),
    raised as this module's error."""
    why = S.inplace_refusal(act, residual, "inplace=True")
    if why is not None:
        raise ArgumentError(why)


def check_inplace(x: Tensor, act: S.Epilogue | None, residual, others) -> None:
    """The memory-saving mode's conditions (contract §8), and torch's rules for an operation
    that writes its input, checked before anything is written.

    The mode's conditions are :func:`check_inplace_mode`'s. As torch's in-place operations,
    it refuses a leaf that requires grad (or a view of one) while grad mode is on, an
    inference tensor outside inference mode, an input whose elements share memory, and an
    input sharing memory with ``others`` (the per-channel tensors). An input that another
    operation saved for its backward is not refused here: the write counts in its version, and
    that backward raises, as after any in-place operation. Under a compiler only the mode's
    conditions are checked: the traced graph is functional.
    """
    check_inplace_mode(act, residual is not None)
    if torch.compiler.is_compiling() or x.is_meta:
        return  # the traced graph is functional; meta tensors hold no memory to overlap
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise ArgumentError("Inplace update to inference tensor outside InferenceMode is not "
                            "allowed. You can make a clone to get a normal tensor before doing "
                            "inplace update.")
    if torch.is_grad_enabled() and x.requires_grad:
        if x.is_leaf:
            raise ArgumentError("a leaf Variable that requires grad is being used in an "
                                "in-place operation.")
        base = x._base
        if base is not None and base.is_leaf and base.requires_grad:
            raise ArgumentError("a view of a leaf Variable that requires grad is being used "
                                "in an in-place operation.")
    if _overlaps_itself(x):
        raise ArgumentError("unsupported operation: more than one element of the written-to "
                            "tensor refers to a single memory location. Please clone() the "
                            "tensor before performing the operation.")
    if x.numel():
        storage = x.untyped_storage()
        start = storage.data_ptr()
        end = start + storage.nbytes()
        for t in others:
            if t is not None and t.numel() and start <= t.data_ptr() < end:
                raise ArgumentError("unsupported operation: some elements of the input tensor "
                                    "and the written-to tensor refer to a single memory "
                                    "location. Please clone() the tensor before performing "
                                    "the operation.")
