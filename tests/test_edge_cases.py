"""Named awkward inputs, on every NumPy backend that can run here, against the float64 math."""

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.backends import available
from conftest import assert_close

NUMPY_BACKENDS = ["reference"] + (["cpu"] if available()["cpu"] is None else [])


def naive(x, axes, eps):
    """The forward written out directly (no shared code with any backend)."""
    x = x.astype(np.float64)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


SHAPES = {
    "size-1 spatial": (4, 3, 1, 1),
    "batch of 1": (1, 3, 2, 2),
    "one channel": (5, 1, 3),
    "primes": (3, 7, 5, 11),
    "near power of two": (1, 1, 1023),
    "rank 5": (2, 3, 2, 3, 2),
    "rank 2": (17, 5),
}


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_awkward_shapes(backend, name, channel_axis):
    shape = SHAPES[name]
    x = np.random.default_rng(0).normal(2.0, 3.0, shape)
    c = shape[channel_axis]
    axes = tuple(a for a in range(len(shape)) if a != channel_axis % len(shape))
    if np.prod([shape[a] for a in axes]) == 1:   # (1, 1, 1023) channels-last: one value each
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bn.forward_training(x, None, None, channel_axis=channel_axis, backend=backend)
        return
    y, saved = bn.forward_training(x, np.ones(c), np.zeros(c), channel_axis=channel_axis,
                                   backend=backend)
    assert_close(y, naive(x, axes, 1e-5), np.float64, name=name)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("mode", ["spatial", "per_activation"])
def test_zero_size_batch(backend, mode):
    x = np.zeros((0, 3, 4, 4), dtype=np.float32)
    pshape = (3,) if mode == "spatial" else (3, 4, 4)
    rm, rv = np.full(pshape, 0.5, np.float32), np.full(pshape, 2.0, np.float32)
    y, saved = bn.forward_training(x, np.ones(pshape), np.zeros(pshape), mode=mode,
                                   running_mean=rm, running_var=rv, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(saved.mean == 0) and np.all(saved.invstd == 0)
    assert saved.mean.shape == pshape and saved.mean.dtype == np.float32
    assert np.all(rm == 0.5) and np.all(rv == 2.0), "running statistics must be unchanged"
    dx, dgamma, dbeta = bn.backward(x, x, np.ones(pshape), saved, mode=mode, backend=backend)
    assert dx.shape == x.shape
    assert np.all(dgamma == 0) and np.all(dbeta == 0)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_constant_channel(backend, eps):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 5))
    x[:, 1, :] = 7.25                       # channel 1 is constant
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3])
    y, saved = bn.forward_training(x, gamma, beta, eps=eps, backend=backend)
    assert np.all(np.isfinite(y))
    assert_close(y[:, 1, :], np.full((4, 5), 0.2), atol=1e-12, rtol=0, name="constant channel")
    expected_inv = 0.0 if eps == 0 else 1 / np.sqrt(eps)
    assert saved.invstd[1] == pytest.approx(expected_inv, rel=1e-12)
    dy = rng.normal(size=x.shape)
    dx, dgamma, dbeta = bn.backward(dy, x, gamma, saved, backend=backend)
    assert np.all(np.isfinite(dx))
    if eps == 0:
        assert np.all(dx[:, 1, :] == 0), "a zero-variance channel gets dx = 0 with eps = 0"


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_nan_stays_in_its_channel(backend):
    x = np.random.default_rng(2).normal(size=(4, 3, 6))
    x[2, 1, 3] = np.nan
    rm, rv = np.zeros(3), np.ones(3)
    y, saved = bn.forward_training(x, None, None, running_mean=rm, running_var=rv,
                                   backend=backend)
    assert np.all(np.isnan(y[:, 1, :]))
    assert np.all(np.isfinite(y[:, [0, 2], :]))
    assert np.isnan(rm[1]) and np.isfinite(rm[[0, 2]]).all()
    dx, _, dbeta = bn.backward(np.ones_like(x), x, None, saved, backend=backend)
    assert np.all(np.isfinite(dx[:, [0, 2], :]))
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1$"):
        bn.forward_training(x, None, None, check_finite=True, backend=backend)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_check_finite_passes_finite_input(backend):
    x = np.random.default_rng(3).normal(size=(4, 3, 6))
    y, _ = bn.forward_training(x, None, None, check_finite=True, backend=backend)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_overflowing_output_is_reported(backend):
    x = np.random.default_rng(4).normal(size=(4, 2, 6)).astype(np.float16)
    gamma = np.array([1.0, 1e5], dtype=np.float32)   # channel 1 overflows float16
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1$"):
        bn.forward_training(x, gamma, None, check_finite=True, backend=backend)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("kind", ["transposed", "sliced", "negative stride"])
def test_non_contiguous_inputs(backend, kind):
    base = np.random.default_rng(5).normal(1.0, 2.0, (6, 4, 5, 8))
    if kind == "transposed":
        x = base.transpose(0, 3, 1, 2)             # (6, 8, 4, 5), channels at axis 1
    elif kind == "sliced":
        x = base[::2, :, 1:, ::3]
    else:
        x = base[::-1, ::-1, :, ::-2]
    c = x.shape[1]
    dy = np.random.default_rng(6).normal(size=x.shape)[:, :, ::-1]
    g = np.linspace(0.5, 2, c)
    y_ref, s_ref = bn.forward_training(np.ascontiguousarray(x), g, None, backend="reference")
    y, s = bn.forward_training(x, g, None, backend=backend)
    assert_close(y, y_ref, np.float64, name="y")
    got = bn.backward(dy, x, g, s, backend=backend)
    want = bn.backward(np.ascontiguousarray(dy), np.ascontiguousarray(x), g, s_ref,
                       backend="reference")
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        assert_close(a, b, np.float64, name=name)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_inputs_are_not_modified(backend):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    g, b = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    mean, var = rng.normal(size=3).astype(np.float32), rng.uniform(1, 2, 3).astype(np.float32)
    before = [a.copy() for a in (x, g, b, dy, mean, var)]
    rm, rv = mean.copy(), var.copy()
    y, saved = bn.forward_training(x, g, b, running_mean=rm, running_var=rv, backend=backend)
    saved_before = [saved.mean.copy(), saved.invstd.copy()]
    bn.forward_inference(x, g, b, mean, var, backend=backend)
    bn.backward(dy, x, g, saved, backend=backend)
    for a, c in zip((x, g, b, dy, mean, var), before, strict=True):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(saved.mean, saved_before[0])
    np.testing.assert_array_equal(saved.invstd, saved_before[1])
    assert not np.array_equal(rm, mean), "the running statistics handed in are updated"


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("strided", [False, True])
def test_out_receives_the_result(backend, strided):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 3, 5))
    dy = rng.normal(size=x.shape)

    def buffer():  # a contiguous buffer, or a strided view into a larger one
        return np.empty((4, 3, 10))[:, :, ::2] if strided else np.empty_like(x)

    y_ref, s_ref = bn.forward_training(x, None, None, backend="reference")
    out = buffer()
    y, saved = bn.forward_training(x, None, None, out=out, backend=backend)
    assert y is out
    assert_close(out, y_ref, np.float64, name="y in out")
    y2 = bn.forward_inference(x, None, None, saved.mean, 1 / saved.invstd**2 - 1e-5,
                              out=buffer(), backend=backend)
    assert_close(y2, y_ref, np.float64, name="inference with the batch statistics")
    dx_out = buffer()
    dx, _, _ = bn.backward(dy, x, None, saved, out=dx_out, backend=backend)
    assert dx is dx_out
    want = bn.backward(dy, x, None, s_ref, backend="reference")[0]
    assert_close(dx_out, want, np.float64, name="dx in out")


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_axis_tuple_keeps_non_adjacent_axes(backend):
    # axis=(1,) on (N, A, B) keeps (N, B): parameters of shape (N, B), not adjacent in memory
    x = np.random.default_rng(9).normal(size=(3, 5, 4))
    y, saved = bn.forward_training(x, None, None, axis=(1,), backend=backend)
    assert saved.mean.shape == (3, 4)
    assert_close(y, naive(x, (1,), 1e-5), np.float64, name="y")
    # axis=(0, 3) on (N, A, B, L) keeps (A, B)
    x4 = np.random.default_rng(10).normal(size=(3, 2, 4, 5))
    y4, s4 = bn.forward_training(x4, np.ones((2, 4)), None, axis=(0, 3), backend=backend)
    assert s4.mean.shape == (2, 4)
    assert_close(y4, naive(x4, (0, 3), 1e-5), np.float64, name="y")


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_spatial_persistent_matches_the_reference(backend, channel_axis):
    # The mode must select an algorithm with spatial's exact result, also on a large offset.
    shape = (4, 3, 7, 7) if channel_axis == 1 else (4, 7, 7, 3)
    x = np.random.default_rng(11).normal(1e4, 2.0, shape).astype(np.float32)
    g = np.array([0.5, 1.0, 2.0], np.float32)
    want, s_want = bn.forward_training(x.astype(np.float64), g, None, channel_axis=channel_axis,
                                       backend="reference")
    got, s_got = bn.forward_training(x, g, None, mode="spatial_persistent",
                                     channel_axis=channel_axis, backend=backend)
    # float32 input: x - mu keeps ~1e-3 of absolute precision at an offset of 1e4
    assert_close(got, want, atol=2e-3, rtol=1e-4, name="y")
    assert_close(s_got.invstd, s_want.invstd, atol=0, rtol=1e-4, name="invstd")


def test_per_activation_on_rank2_equals_spatial():
    x = np.random.default_rng(12).normal(size=(9, 4))
    a, _ = bn.forward_training(x, None, None, mode="spatial", backend="reference")
    b, _ = bn.forward_training(x, None, None, mode="per_activation", backend="reference")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_float16_running_statistics(backend):
    """Running statistics in float16 are updated (Numba has no float16 arithmetic: the CPU
    backend updates them through NumPy)."""
    x = np.random.default_rng(0).normal(1.0, 2.0, (6, 3, 4)).astype(np.float16)
    rm, rv = np.zeros(3, np.float16), np.ones(3, np.float16)
    bn.forward_training(x, None, None, running_mean=rm, running_var=rv, momentum=1.0,
                        backend=backend)
    x64 = x.astype(np.float64)
    assert_close(rm, x64.mean(axis=(0, 2)), np.float16, name="running_mean")
    assert_close(rv, x64.var(axis=(0, 2), ddof=1), np.float16, name="running_var")
