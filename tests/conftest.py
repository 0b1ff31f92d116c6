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

# (atol, rtol) for comparing a backend's result with the float64 reference, by input dtype
# (NumPy or torch); the one table every test file uses. Statistics are float32 or wider.
TOLERANCE = {
    "float64": (1e-11, 1e-11),
    "float32": (2e-5, 2e-5),
    "bfloat16": (3e-2, 3e-2),   # 8 significant bits: rounding y alone costs ~4e-3 relative
    "float16": (4e-3, 4e-3),
}


def tolerance(dtype):
    """(atol, rtol) for a NumPy dtype, scalar type, or torch dtype."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCE[name if name in TOLERANCE else np.dtype(dtype).name]


def _float64(a):
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def assert_close(actual, expected, dtype=None, *, atol=None, rtol=None, name="value"):
    """allclose with NaN == NaN, reporting the mean and max difference on failure.

    Takes arrays or torch tensors; ``dtype`` picks (atol, rtol) from :data:`TOLERANCE`.
    """
    actual, expected = _float64(actual), _float64(expected)
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
