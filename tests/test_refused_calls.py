"""A refused call changes nothing: every array the caller handed in is left bit-identical.

Property test (hypothesis) over shapes, layouts, dtypes, backends and the optional arrays:
``check_finite=True`` calls whose input holds a NaN or an Inf, or whose output overflows its
dtype, must raise FloatingPointError and leave x, gamma, beta, the running statistics and
``out`` exactly as they were; the others must return a finite result and update the running
statistics as the same call without the check does.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm.backends import available

NUMPY_BACKENDS = ["reference"] + (["cpu"] if available()["cpu"] is None else [])


def _bits(a):
    return None if a is None else (a.dtype, a.shape, a.tobytes())


@st.composite
def calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from([(4, 3), (3, 2, 5), (2, 3, 4, 4), (5, 4, 1, 3)]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    channel_axis = draw(st.sampled_from([1, -1]))
    mode = draw(st.sampled_from(["spatial", "per_activation"]))
    if mode == "per_activation":
        channel_axis = None
        pshape = shape[1:]
    else:
        pshape = (shape[channel_axis],)
    x = rng.normal(1.0, 2.0, shape).astype(dtype)
    fault = draw(st.sampled_from(["nan", "inf", "overflow", "none"]))
    if fault in ("nan", "inf"):
        for _ in range(draw(st.integers(1, 3))):
            x[tuple(rng.integers(0, n) for n in shape)] = np.nan if fault == "nan" else -np.inf
    gamma = rng.uniform(0.5, 2.0, pshape).astype(dtype) if draw(st.booleans()) else None
    beta = rng.normal(0, 1, pshape).astype(dtype) if draw(st.booleans()) else None
    if fault == "overflow":  # finite input and statistics, an output beyond the dtype's range
        # beta at the largest finite value and gamma half of it: a channel's positive
        # normalized values (it has some: its values are not all equal) push y past it
        beta = np.zeros(pshape, dtype)
        beta.reshape(-1)[rng.integers(0, beta.size)] = np.finfo(dtype).max
        gamma = np.full(pshape, np.finfo(dtype).max / 2, dtype)
    stats_dtype = draw(st.sampled_from([np.float32, np.float64, dtype]))
    running = draw(st.booleans())
    rm = rng.normal(0, 1, pshape).astype(stats_dtype) if running else None
    rv = rng.uniform(0.5, 2, pshape).astype(stats_dtype) if running else None
    out = rng.normal(0, 1, shape).astype(dtype) if draw(st.booleans()) else None
    backend = draw(st.sampled_from(NUMPY_BACKENDS))
    kwargs = dict(mode=mode, channel_axis=channel_axis, running_mean=rm, running_var=rv,
                  out=out, backend=backend, momentum=draw(st.sampled_from([0.1, 1.0])))
    return fault, x, gamma, beta, kwargs


@given(calls())
def test_a_refused_call_leaves_every_array_as_it_was(call):
    fault, x, gamma, beta, kwargs = call
    arrays = dict(x=x, gamma=gamma, beta=beta, running_mean=kwargs["running_mean"],
                  running_var=kwargs["running_var"], out=kwargs["out"])
    before = {k: _bits(v) for k, v in arrays.items()}
    copies = {k: None if v is None else v.copy() for k, v in arrays.items()}
    try:
        y, _ = bn.forward_training(x, gamma, beta, check_finite=True, **kwargs)
    except FloatingPointError:
        for name, bits in before.items():
            assert _bits(arrays[name]) == bits, f"a refused call changed `{name}`"
        assert fault != "none", "finite input with a finite result was refused"
        return
    assert fault == "none", f"a call with {fault} was not refused"
    assert np.isfinite(y).all()
    if kwargs["out"] is not None:
        assert y is kwargs["out"]
    # an accepted call does what the same call without the check does
    y2, _ = bn.forward_training(x, gamma, beta, **dict(
        kwargs, running_mean=copies["running_mean"], running_var=copies["running_var"],
        out=None))
    np.testing.assert_array_equal(y, y2)
    for name in ("running_mean", "running_var"):
        if arrays[name] is not None:
            np.testing.assert_array_equal(arrays[name], copies[name], err_msg=name)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_refused_call_keeps_running_statistics_and_out(backend):
    """The named case of the issue: NaN in x, check_finite=True."""
    x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    x[1, 2, 3] = np.nan
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full(x.shape, 7.0, np.float32)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        bn.forward_training(x, None, None, running_mean=rm, running_var=rv, out=out,
                            check_finite=True, backend=backend)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))
    assert np.all(out == 7.0)
