"""The private APIs of torch and Numba gathered in batchnorm._compat, one test each: a release
that removes or changes one fails here, by name."""

import pytest

from batchnorm import _compat


def test_functorch_transforms_active():
    torch = pytest.importorskip("torch")
    active = _compat.functorch_transforms_active()
    assert active() is False
    seen = []

    def f(x):
        seen.append(active())
        return (x * x).sum()

    torch.func.grad(f)(torch.ones(3))
    torch.func.vmap(f)(torch.ones(2, 3))
    assert seen == [True, True]


def test_direct_apply_is_function_apply_without_the_wrapper():
    torch = pytest.importorskip("torch")

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale):
            ctx.save_for_backward(x)
            ctx.scale = scale
            return x * x * scale

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g * ctx.scale, None

    apply = _compat.direct_apply(Square)
    assert apply is not Square.apply  # the C entry point, not the Python wrapper
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = apply(x, 0.5)
    assert type(y.grad_fn).__name__ == "SquareBackward"
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.5, 2.0, 4.5]))
    assert torch.equal(x.grad, torch.tensor([1.0, -2.0, 3.0]))


def test_numba_thread_count_reader():
    numba = pytest.importorskip("numba")
    import numpy as np

    read = _compat.numba_thread_count_reader()
    assert read is not None, "Numba no longer has numba.np.ufunc.parallel._get_num_threads"

    @numba.njit(parallel=True)
    def total(a):
        s = 0.0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    assert total(np.ones(100)) == 100.0  # the pool is launched
    n = numba.get_num_threads()
    assert read() == n
    if n > 1:
        numba.set_num_threads(1)
        try:
            assert read() == 1
        finally:
            numba.set_num_threads(n)


def test_launch_numba_threads_sets_the_spin_count_for_the_launch_only(monkeypatch):
    numba = pytest.importorskip("numba")
    import os

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = []
    real = numba.get_num_threads

    def spy():
        seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return real()

    monkeypatch.setattr(numba, "get_num_threads", spy)
    _compat.launch_numba_threads(123)
    assert seen == ["123"] and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    _compat.launch_numba_threads(123)
    assert seen[-1] is None and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
