"""Properties of batch norm that hold for any input (hypothesis), checked on the reference."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import batchnorm as bn
from conftest import assert_close

shapes = st.lists(st.integers(1, 5), min_size=2, max_size=5).map(tuple).filter(
    lambda s: int(np.prod(s)) // s[1] >= 2)
finite = st.floats(-100, 100, allow_nan=False, width=64)


@st.composite
def inputs(draw):
    shape = draw(shapes)
    x = draw(arrays(np.float64, shape, elements=finite))
    # keep every channel away from zero variance so scaling is well conditioned
    x = x + np.random.default_rng(draw(st.integers(0, 2**16))).normal(0, 1, shape)
    return x


@given(inputs(), st.floats(-1e3, 1e3), st.floats(0.1, 10.0))
def test_output_is_invariant_to_shift_and_positive_scale(x, shift, scale):
    y1, _ = bn.forward_training(x, None, None, eps=0.0, backend="reference")
    y2, _ = bn.forward_training(x * scale + shift, None, None, eps=0.0, backend="reference")
    assert_close(y2, y1, atol=1e-6, rtol=1e-6, name="y(a*x+b) vs y(x)")


@given(inputs())
def test_normalized_output_has_zero_mean_unit_variance(x):
    axes = (0, *range(2, x.ndim))
    y, saved = bn.forward_training(x, None, None, eps=0.0, backend="reference")
    assert_close(y.mean(axis=axes), np.zeros(x.shape[1]), atol=1e-9, rtol=0, name="mean")
    assert_close(y.var(axis=axes), np.ones(x.shape[1]), atol=1e-9, rtol=1e-9, name="var")


@given(inputs(), st.integers(0, 2**16))
def test_dx_is_orthogonal_to_shift_and_scale_of_a_channel(x, seed):
    # y does not change when a channel is shifted or scaled, so dx sums to zero per channel
    # and is orthogonal to xhat (for gamma = 1, eps = 0).
    axes = (0, *range(2, x.ndim))
    dy = np.random.default_rng(seed).normal(size=x.shape)
    _, saved = bn.forward_training(x, None, None, eps=0.0, backend="reference")
    dx, _, _ = bn.backward(dy, x, None, saved, backend="reference")
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    xhat = (x - saved.mean.reshape(bshape)) * saved.invstd.reshape(bshape)
    scale = np.abs(dy).sum(axis=axes) + 1
    assert_close(dx.sum(axis=axes) / scale, np.zeros(x.shape[1]), atol=1e-9, rtol=0,
                 name="sum dx")
    assert_close((dx * xhat).sum(axis=axes) / scale, np.zeros(x.shape[1]), atol=1e-9, rtol=0,
                 name="sum dx*xhat")


@given(inputs(), st.sampled_from([0.0, 0.3, 1.0]))
def test_running_statistics_follow_the_update_rule(x, momentum):
    c = x.shape[1]
    rm0, rv0 = np.linspace(-1, 1, c), np.linspace(1, 2, c)
    rm, rv = rm0.copy(), rv0.copy()
    axes = (0, *range(2, x.ndim))
    m = x.size // c
    bn.forward_training(x, None, None, running_mean=rm, running_var=rv, momentum=momentum,
                        backend="reference")
    assert_close(rm, (1 - momentum) * rm0 + momentum * x.mean(axis=axes), atol=1e-9, rtol=1e-9)
    assert_close(rv, (1 - momentum) * rv0 + momentum * x.var(axis=axes) * m / (m - 1),
                 atol=1e-9, rtol=1e-9)
