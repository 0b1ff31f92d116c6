"""Backend registry: which backend runs a call, by the kind of array it is given.

A backend is a module with ``NAME``, ``unavailable_reason(x) -> str | None`` and the three
functions of :mod:`batchnorm.reference` (same signatures, same results within the dtype's
tolerance). Backends are imported lazily, so a missing optional dependency (Numba, Triton)
costs nothing until that backend is asked for.

Two kinds of input, two lists:

* NumPy arrays (the API of :mod:`batchnorm`): ``"cpu"`` then ``"reference"``. Choosing for
  a NumPy array never imports torch or Triton.
* CUDA tensors (routed here by :mod:`batchnorm.torch`): ``"gpu"``. CPU tensors are handed to
  the NumPy backends as zero-copy views by the torch layer itself.

An explicitly requested backend that cannot run raises :class:`BackendUnavailable` with the
reason; ``"auto"`` quietly takes the first of its kind's list that can.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

_MODULES = {
    "reference": "batchnorm.reference",
    "cpu": "batchnorm.backends.cpu",
    "gpu": "batchnorm.backends.gpu",
}
NUMPY_BACKENDS = ("cpu", "reference")  # "auto" order for NumPy arrays
DEVICE_BACKENDS = ("gpu",)  # "auto" order for device tensors


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


@functools.cache  # import once; an import failure is not retried either
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as exc:  # missing optional dependency or not built yet
        return None, f"the {name!r} backend could not be imported: {exc}"


def _is_tensor(x) -> bool:
    # by the type's module, so that a NumPy call never imports torch to ask
    return type(x).__module__.split(".")[0] == "torch"


def select(name: str, x) -> ModuleType:
    """The backend module that runs a call on ``x``.

    Args:
        name: ``"auto"`` or a backend's name: ``"reference"`` or ``"cpu"`` for NumPy arrays,
            ``"gpu"`` for CUDA tensors.
        x: the call's input array (or tensor); backends decide whether they accept it.
    """
    if name == "auto":
        order = DEVICE_BACKENDS if _is_tensor(x) else NUMPY_BACKENDS
        reasons = []
        for candidate in order:
            module, reason = _load(candidate)
            if module is not None:
                reason = module.unavailable_reason(x)
                if reason is None:
                    return module
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailable(
            f"no backend can run an input of type {type(x).__name__} ({'; '.join(reasons)})"
        )
    if name not in _MODULES:
        raise ValueError(
            f"unknown backend {name!r}; valid choices are 'auto', "
            + ", ".join(repr(n) for n in NUMPY_BACKENDS)
            + " (and 'gpu' for CUDA tensors through batchnorm.torch)"
        )
    if name in DEVICE_BACKENDS and not _is_tensor(x):
        raise BackendUnavailable(
            f"the {name!r} backend runs CUDA tensors through batchnorm.torch, not "
            f"{type(x).__name__} input; NumPy arrays run on 'cpu' or 'reference'"
        )
    module, reason = _load(name)
    if module is None:
        raise BackendUnavailable(reason)
    reason = module.unavailable_reason(x)
    if reason is not None:
        raise BackendUnavailable(f"the {name!r} backend cannot run this call: {reason}")
    return module


def available() -> dict[str, str | None]:
    """Each backend's name mapped to None if it imports, else the reason it does not."""
    return {name: _load(name)[1] for name in _MODULES}
