"""The private APIs of PyTorch and Numba this package uses, in one place.

Each is used for speed (a call made on every batch-norm call) and each has a test of its own
(tests/test_compat.py): a release that renames or changes one of them fails there, with its
name, instead of somewhere inside a training step. Nothing here is imported at package
import time: torch and Numba are optional, so every accessor imports what it needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def functorch_transforms_active() -> Callable[[], bool]:
    """``torch._C._are_functorch_transforms_active``: True inside a ``torch.func`` transform
    (grad, vmap, jacrev, ...). The eager fast path of :mod:`batchnorm.torch` calls its
    kernels directly and must leave such calls to the custom ops, which torch.func handles."""
    import torch

    return torch._C._are_functorch_transforms_active


def direct_apply(function_cls: type) -> Callable:
    """``function_cls.apply`` without its Python wrapper: the C entry point of
    ``torch.autograd.Function`` (``torch._C._FunctionBase.apply``), reached through ``super``.

    The wrapper binds default arguments and unwraps ``torch.func`` tensors, a few
    microseconds a call; callers use this only when no ``torch.func`` transform is active and
    pass every argument positionally.
    """
    import torch

    return super(torch.autograd.Function, function_cls).apply


def numba_thread_count_reader() -> Callable[[], int] | None:
    """Numba's unchecked reader of the calling thread's thread count,
    ``numba.np.ufunc.parallel._get_num_threads`` (several times cheaper than
    ``numba.get_num_threads()``, which also checks that the pool is launched), or None when
    this Numba has none.

    Launches Numba's thread pool first: the reader only exists (as a module global of
    ``numba.np.ufunc.parallel``) once the pool is up. It returns 0 or less on a thread that
    never asked ``numba.get_num_threads()``.
    """
    import numba
    from numba.np.ufunc import parallel

    numba.get_num_threads()  # launches the pool, which defines the reader
    return getattr(parallel, "_get_num_threads", None)


_LAUNCH_LOCK = threading.Lock()


def launch_numba_threads(spin_count: int) -> None:
    """Launch Numba's thread pool. When its threading layer is OpenMP (GNU libgomp, loaded
    as a runtime of its own next to PyTorch's), its idle threads spin ``spin_count``
    iterations before they sleep, unless the environment already sets ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY``: libgomp reads them once, when Numba loads it here, so the variable
    is set for the launch only and then removed. Without effect when the pool is already up.
    """
    import os

    import numba

    with _LAUNCH_LOCK:  # two threads' first calls must not both set and remove the variable
        if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
            numba.get_num_threads()
            return
        os.environ["GOMP_SPINCOUNT"] = str(int(spin_count))
        try:
            numba.get_num_threads()  # launches the pool, loading the threading layer
        finally:
            os.environ.pop("GOMP_SPINCOUNT", None)
