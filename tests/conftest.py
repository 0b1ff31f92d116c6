"""Shared test settings: the dtype -> tolerance table and the comparison helper."""

import os

# The Triton interpreter must be chosen before triton is first imported: GPU kernels then
# run on CPU tensors, which is how CI (no GPU) tests them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("default")

# (atol, rtol) for comparing a backend's result with the float64 reference, by input dtype.
TOLERANCE = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float16): (3e-3, 3e-3),
}


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype)]


def assert_close(actual, expected, dtype=None, *, atol=None, rtol=None, name="value"):
    """allclose with NaN == NaN, reporting the mean and max difference on failure."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if dtype is not None:
        a, r = tolerance(dtype)
        atol = a if atol is None else atol
        rtol = r if rtol is None else rtol
    ok = np.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not ok.all():
        both = np.isfinite(actual) & np.isfinite(expected)
        diff = np.abs(actual - expected)[both]
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {ok.size} values differ "
            f"(atol={atol}, rtol={rtol}); max |diff| {diff.max() if diff.size else 'n/a'}, "
            f"mean |diff| {diff.mean() if diff.size else 'n/a'}; first bad index "
            f"{np.unravel_index(int(np.flatnonzero(~ok)[0]), ok.shape)}"
        )
