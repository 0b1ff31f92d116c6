"""The CPU backend against the float64 reference: a grid, named edge cases, properties,
accuracy against PyTorch's own CPU error, and concurrent calls."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm._shapes import as_3d, resolve_layout
from batchnorm.backends import BackendUnavailable, select
from conftest import assert_close, tolerance

pytest.importorskip("numba")
from batchnorm.backends import cpu  # noqa: E402  (needs numba)

SHAPES = {2: (7, 5), 3: (4, 3, 9), 4: (3, 4, 5, 6), 5: (2, 3, 4, 2, 3)}
LAYOUTS = {  # name -> (mode, channel_axis)
    "nchw": ("spatial", 1),
    "persistent": ("spatial_persistent", 1),
    "nhwc": ("spatial", -1),
    "per_activation": ("per_activation", 1),
}


@pytest.fixture(params=["serial", "parallel"])
def either_family(request, monkeypatch):
    """Run the test once with the serial kernels and once with the parallel ones."""
    monkeypatch.setattr(cpu, "_SERIAL_BELOW", 1 << 62 if request.param == "serial" else 0)
    return request.param


@pytest.fixture
def parallel(monkeypatch):
    """Make every size take the parallel kernels (small inputs use the serial ones)."""
    monkeypatch.setattr(cpu, "_SERIAL_BELOW", 0)


def close(got, want, dtype, what, spread=1.0):
    """assert_close; ``spread`` scales atol for inputs whose offset dwarfs their spread."""
    atol, rtol = tolerance(dtype)
    assert_close(got, want, atol=atol * spread, rtol=rtol, name=what)


def data(shape, dtype, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def params(x, mode, channel_axis, affine, seed=1):
    pshape = resolve_layout(x.shape, mode, channel_axis).param_shape
    if not affine:
        return None, None, pshape
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, pshape).astype(x.dtype),
            rng.standard_normal(pshape).astype(x.dtype), pshape)


def check_all(x, mode, channel_axis, affine, *, dy=None, out=None, dtype=None):
    """Forward training (with running stats), inference and backward: cpu vs reference."""
    dtype = dtype or x.dtype.type
    gamma, beta, pshape = params(x, mode, channel_axis, affine)
    kw = dict(mode=mode, channel_axis=channel_axis)
    rm = {b: np.full(pshape, 0.25, np.float32) for b in ("cpu", "reference")}
    rv = {b: np.full(pshape, 2.0, np.float32) for b in ("cpu", "reference")}
    res = {}
    for b in ("cpu", "reference"):
        o = out if b == "cpu" else None
        res[b] = bn.forward_training(x, gamma, beta, running_mean=rm[b], running_var=rv[b],
                                     momentum=0.3, out=o, backend=b, **kw)
    (y, s), (yr, sr) = res["cpu"], res["reference"]
    if out is not None:
        assert y is out
    close(y, yr, dtype, "y")
    close(s.mean, sr.mean, dtype, "mean")
    close(s.invstd, sr.invstd, dtype, "invstd")
    assert s.mean.dtype == sr.mean.dtype and y.dtype == x.dtype
    close(rm["cpu"], rm["reference"], dtype, "running_mean")
    close(rv["cpu"], rv["reference"], dtype, "running_var")

    var = np.abs(data(pshape, np.float32, 5)) + 0.1
    yi = bn.forward_inference(x, gamma, beta, sr.mean, var, backend="cpu", **kw)
    close(yi, bn.forward_inference(x, gamma, beta, sr.mean, var, backend="reference", **kw),
          dtype, "inference y")

    dy = data(x.shape, x.dtype, 3) if dy is None else dy
    for training in (True, False):
        got = bn.backward(dy, x, gamma, sr, training=training, backend="cpu", **kw)
        want = bn.backward(dy, x, gamma, sr, training=training, backend="reference", **kw)
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
            if w is None:
                assert g is None
            else:
                close(g, w, dtype, f"{name} (training={training})")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grid(layout, rank, dtype, affine, monkeypatch):
    if (rank + affine) % 2:  # half the grid (every layout x dtype) on the parallel kernels
        monkeypatch.setattr(cpu, "_SERIAL_BELOW", 0)
    mode, axis = LAYOUTS[layout]
    x = data(SHAPES[rank], dtype)
    x0 = x.copy()
    check_all(x, mode, axis, affine)
    np.testing.assert_array_equal(x, x0)  # inputs are never modified


def _strided(kind, shape, dtype):
    big = data(tuple(2 * n for n in shape), dtype, 7)
    if kind == "step2":
        return big[tuple(slice(None, None, 2) for _ in shape)]
    if kind == "negative":
        return big[tuple(slice(None, None, -2) for _ in shape)]
    if kind == "transposed":  # Fortran order: no axis is contiguous in the canonical view
        return np.asfortranarray(data(shape, dtype, 7))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["step2", "negative", "transposed"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
@pytest.mark.parametrize("rank", [3, 4])
def test_strided_inputs(kind, layout, rank):
    mode, axis = LAYOUTS[layout]
    x = _strided(kind, SHAPES[rank], np.float32)
    dy = _strided(kind, SHAPES[rank], np.float32)[..., ::-1].copy()[..., ::-1]
    x0 = x.copy()
    check_all(x, mode, axis, True, dy=dy)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("out_kind", ["contiguous", "strided"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_out(out_kind, layout):
    mode, axis = LAYOUTS[layout]
    x = data((4, 6, 5, 3), np.float32)
    out = np.full(x.shape, 7.0, np.float32)
    if out_kind == "strided":
        out = np.full((8, 6, 5, 3), 7.0, np.float32)[::2]
    check_all(x, mode, axis, True, out=out)
    dy = data(x.shape, np.float32, 2)
    gamma, _, _ = params(x, mode, axis, True)
    _, s = bn.forward_training(x, gamma, None, mode=mode, channel_axis=axis)
    dx = bn.backward(dy, x, gamma, s, mode=mode, channel_axis=axis, out=out, backend="cpu")[0]
    want = bn.backward(dy, x, gamma, s, mode=mode, channel_axis=axis, backend="reference")[0]
    assert dx is out
    close(out, want, np.float32, "dx into out")


@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (1, 1, 1023), (7, 11, 13), (2, 3, 1),
                                   (1, 5, 2), (13, 1), (3, 37, 5), (6, 5, 7, 7),
                                   (2, 3, 3, 1030)],
                         ids=["size1", "near-pow2", "primes", "B1", "N1", "C1", "blocks",
                              "short-runs", "wide-rows"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
def test_named_shapes(shape, layout, parallel):
    mode, axis = LAYOUTS[layout]
    if resolve_layout(shape, mode, axis).count < 2:
        check_one_value_per_channel(data(shape, np.float32), mode, axis)
    else:
        check_all(data(shape, np.float32), mode, axis, True)


def check_one_value_per_channel(x, mode, axis):
    """Training is refused (contract §5); inference and the eval backward still run."""
    kw = dict(mode=mode, channel_axis=axis)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.forward_training(x, None, None, backend="cpu", **kw)
    gamma, beta, pshape = params(x, mode, axis, True)
    mean = data(pshape, np.float32, 4)
    var = np.abs(data(pshape, np.float32, 5)) + 0.1
    y = bn.forward_inference(x, gamma, beta, mean, var, backend="cpu", **kw)
    close(y, bn.forward_inference(x, gamma, beta, mean, var, backend="reference", **kw),
          np.float32, "inference y")
    saved = bn.SavedStats(mean=mean, invstd=(1.0 / np.sqrt(var + 1e-5)).astype(np.float32))
    dy = data(x.shape, np.float32, 3)
    got = bn.backward(dy, x, gamma, saved, training=False, backend="cpu", **kw)
    want = bn.backward(dy, x, gamma, saved, training=False, backend="reference", **kw)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        close(g, w, np.float32, f"{name} (eval backward)")


@pytest.mark.parametrize("family", ["serial", "parallel"])
def test_nchw_stored_channels_last(family, monkeypatch):
    # an (N, C, H, W) array whose channel stride is one element (torch's channels_last seen
    # through NumPy) takes the rows kernels, and a fresh output keeps x's strides
    if family == "parallel":
        monkeypatch.setattr(cpu, "_SERIAL_BELOW", 0)
    x = np.ascontiguousarray(data((3, 5, 4, 6), np.float32).transpose(0, 2, 3, 1))
    x = x.transpose(0, 3, 1, 2)
    assert cpu._rows(as_3d(x, resolve_layout(x.shape, "spatial", 1))) is not None
    y, _ = bn.forward_training(x, None, None, backend="cpu")
    assert y.strides == x.strides
    dx = bn.backward(x, x, None, bn.forward_training(x, None, None)[1], backend="cpu")[0]
    assert dx.strides == x.strides
    check_all(x, "spatial", 1, True)


def test_torch_channels_last_view():
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(data((2, 6, 5, 5), np.float32)).contiguous(
        memory_format=torch.channels_last)
    x = t.numpy()
    assert cpu._rows(as_3d(x, resolve_layout(x.shape, "spatial", 1))) is not None
    check_all(x, "spatial", 1, True)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
def test_sizes_that_run_in_parallel(layout):
    # above the serial cut-off without monkeypatching; C not a multiple of the block
    mode, axis = LAYOUTS[layout]
    shape = (16, 67, 9, 9) if axis == 1 else (16, 9, 9, 67)
    x = data(shape, np.float32)
    assert x.size >= cpu._SERIAL_BELOW
    check_all(x, mode, axis, True)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_zero_size(layout):
    mode, axis = LAYOUTS[layout]
    x = np.empty((0, 3, 4), np.float32) if axis == 1 else np.empty((0, 4, 3), np.float32)
    rm = np.full(3, 0.5, np.float32)
    y, s = bn.forward_training(x, None, None, mode=mode, channel_axis=axis, running_mean=rm,
                               backend="cpu")
    assert y.shape == x.shape and (s.mean == 0).all() and (s.invstd == 0).all()
    assert (rm == 0.5).all()
    dx, dg, db = bn.backward(x, x, np.ones(3, np.float32), s, mode=mode, channel_axis=axis,
                             backend="cpu")
    assert dx.shape == x.shape and (dg == 0).all() and (db == 0).all()


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_constant_channel(eps, layout):
    mode, axis = LAYOUTS[layout]
    x = data((4, 3, 10), np.float32) if axis == 1 else data((4, 10, 3), np.float32)
    sel = (slice(None), 1) if axis == 1 else (..., 1)
    x[sel] = 3.25
    beta = np.array([0.0, -2.0, 1.0], np.float32)
    y, s = bn.forward_training(x, None, beta, eps=eps, mode=mode, channel_axis=axis,
                               backend="cpu")
    assert s.mean[1] == 3.25
    assert s.invstd[1] == (0.0 if eps == 0 else np.float32(1 / np.sqrt(eps)))
    assert (y[sel] == -2.0).all()
    check_all(x, mode, axis, True)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
def test_nan_stays_in_its_channel(layout):
    mode, axis = LAYOUTS[layout]
    x = data((5, 4, 6), np.float32)
    x[2, 1, 3] = np.nan
    y, s = bn.forward_training(x, None, None, mode=mode, channel_axis=axis, backend="cpu")
    yr, _ = bn.forward_training(x, None, None, mode=mode, channel_axis=axis,
                                backend="reference")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yr))
    assert np.isnan(y).any() and not np.isnan(y).all()
    with pytest.raises(FloatingPointError, match="channel"):
        bn.forward_training(x, None, None, mode=mode, channel_axis=axis, check_finite=True,
                            backend="cpu")
    clean = data((5, 4, 6), np.float32)
    bn.forward_training(clean, None, None, mode=mode, channel_axis=axis, check_finite=True,
                        backend="cpu")


def test_check_finite_catches_output_overflow():
    # finite statistics, but gamma overflows float32 in the output of channel 2 only
    x = data((6, 4, 5), np.float32)
    gamma = np.array([1, 1, 3e38, 1], np.float32)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        bn.forward_training(x, gamma, None, check_finite=True, backend="cpu")
    # channels-last with every mean exactly 0 (small integers and their negatives): the
    # rows apply takes its folded form, y = x * scale + shift, and must flag it there too
    half = np.arange(1, 25, dtype=np.float32).reshape(3, 2, 4) % 5 + 1
    xl = np.concatenate([half, -half])
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        bn.forward_training(xl, gamma, None, channel_axis=-1, check_finite=True,
                            backend="cpu")
    x16 = data((6, 4, 5), np.float16)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        bn.forward_training(x16, np.array([1, 1, 6e4, 1], np.float16), None,
                            check_finite=True, backend="cpu")


def test_explicit_cpu_refuses_what_it_cannot_run():
    # float32 in the other byte order is a valid input that Numba cannot read: the cpu
    # backend asked by name says so, "auto" runs it on the reference
    x = data((4, 3, 5), np.float32)
    swapped = x.astype(x.dtype.newbyteorder())
    with pytest.raises(BackendUnavailable, match="byte order"):
        bn.forward_training(swapped, None, None, backend="cpu")
    y, _ = bn.forward_training(swapped, None, None)
    close(y, bn.forward_training(x, None, None, backend="reference")[0], np.float32, "y")


def test_auto_picks_cpu_for_numpy():
    mod = select("auto", np.zeros((2, 3), np.float32))
    assert mod.NAME in ("cpu", "gpu")


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    layout=st.sampled_from(["nchw", "nhwc", "per_activation"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    step=st.sampled_from([1, 2, -1]),
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
    force_parallel=st.booleans(),
)
def test_property_matches_reference(shape, layout, dtype, step, loc, scale, seed,
                                    force_parallel):
    mode, axis = LAYOUTS[layout]
    with pytest.MonkeyPatch.context() as mp:
        if force_parallel:
            mp.setattr(cpu, "_SERIAL_BELOW", 0)
        _property_case(shape, mode, axis, dtype, step, loc, scale, seed)


def _property_case(shape, mode, axis, dtype, step, loc, scale, seed):
    shape[0] = max(shape[0], 2)
    big = data(tuple(n * abs(step) for n in shape), dtype, seed, loc, scale)
    x = big[tuple(slice(None, None, step) for _ in shape)]
    x0 = x.copy()
    gamma, beta, _ = params(x, mode, axis, seed % 2 == 0, seed)
    kw = dict(mode=mode, channel_axis=axis)
    y, s = bn.forward_training(x, gamma, beta, backend="cpu", **kw)
    yr, sr = bn.forward_training(x, gamma, beta, backend="reference", **kw)
    # relative to the channel's spread: x - mu loses the digits of the offset |loc| / scale
    spread = 1.0 + abs(loc) / scale
    close(y, yr, dtype, "y", spread)
    close(s.mean, sr.mean, dtype, "mean", spread)
    dy = data(x.shape, dtype, seed + 1)
    for g, w in zip(bn.backward(dy, x, gamma, sr, backend="cpu", **kw),
                    bn.backward(dy, x, gamma, sr, backend="reference", **kw), strict=True):
        if w is not None:
            close(g, w, dtype, "grad", spread)
    np.testing.assert_array_equal(x, x0)


# --- accuracy: no worse than PyTorch's CPU kernels against a float64 oracle --------------

def _oracle(x64):
    mu = x64.mean(axis=(0, 2, 3))
    var = ((x64 - mu[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    return mu, var


@pytest.mark.parametrize("case", ["offset1e3", "offset1e5", "offset1e6", "tiny_std",
                                  "constant", "centered"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(8, 4, 16, 16), (2, 4, 40, 40), (9, 4, 7, 7)],
                         ids=["hw256", "hw1600", "hw49"])
def test_accuracy_vs_torch(case, layout, shape):
    # NCHW runs: hw1600 longer than RUN_CHUNK, summed in float32 pieces folded in float64;
    # hw49 short runs. "centered" keeps |mean / sigma| < 1, where the channels-last apply
    # folds the mean into its shift: the ulp bound below covers that form too
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    loc, std = {"offset1e3": (1e3, 1.0), "offset1e5": (1e5, 1.0), "offset1e6": (1e6, 1.0),
                "tiny_std": (1.0, 1e-3), "constant": (7.3, 0.0), "centered": (0.5, 2.0)}[case]
    x = (rng.standard_normal(shape) * std + loc).astype(np.float32)
    eps = 1e-5
    x64 = x.astype(np.float64)
    mu, var = _oracle(x64)
    y_true = (x64 - mu[None, :, None, None]) / np.sqrt(var + eps)[None, :, None, None]

    xt = torch.from_numpy(x)
    rm, rv = torch.zeros(4), torch.ones(4)
    # momentum 1: the running statistics become the batch mean and the unbiased variance,
    # stored in float32 on both sides, the like-for-like view of each side's statistics
    our_rm, our_rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    kw = dict(eps=eps, running_mean=our_rm, running_var=our_rv, momentum=1.0, backend="cpu")
    if layout == "nhwc":
        xt = xt.contiguous(memory_format=torch.channels_last)
        xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        y, s = bn.forward_training(xn, None, None, channel_axis=-1, **kw)
        y = y.transpose(0, 3, 1, 2)
    else:
        y, s = bn.forward_training(x, None, None, **kw)
    yt = torch.nn.functional.batch_norm(xt, rm, rv, training=True, momentum=1.0,
                                        eps=eps).numpy()
    err_ours = np.abs(y.astype(np.float64) - y_true).max()
    err_torch = np.abs(yt.astype(np.float64) - y_true).max()
    assert err_ours <= err_torch + 1e-6, (err_ours, err_torch)
    # and a large mean costs no output digits: a few float32 ulps of |y| (a kernel that
    # folds mu into its shift, as torch does, errs by about |mu / sigma| * 2^-24)
    assert err_ours <= 4 * 2.0**-24 * max(1.0, np.abs(y_true).max()), err_ours
    assert np.abs(s.mean - mu).max() <= np.abs(rm.numpy() - mu).max() + 1e-7 * abs(loc)
    m = x.size // 4
    unbiased = var * m / (m - 1)
    err_var_ours = np.abs(our_rv.astype(np.float64) - unbiased).max()
    err_var_torch = np.abs(rv.numpy().astype(np.float64) - unbiased).max()
    # one float32 rounding of the stored value on top of torch's error
    assert err_var_ours <= err_var_torch + 2.0**-24 * unbiased.max(), (err_var_ours,
                                                                       err_var_torch)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
@pytest.mark.parametrize("hw", [32, 7])
def test_outlying_first_value(layout, hw, either_family):
    # the kernels shift each channel by a value near its start; one far off (300 sigma)
    # must not cost the float32 partial sums their bits (they are taken again around the
    # mean): statistics to a few float32 ulps of the float64 reference
    mode, axis = LAYOUTS[layout]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 4, hw, hw)).astype(np.float32)
    x[0, :, 0, 0] = 300.0
    if axis == -1:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y, s = bn.forward_training(x, None, None, mode=mode, channel_axis=axis, backend="cpu")
    yr, sr = bn.forward_training(x.astype(np.float64), None, None, mode=mode,
                                 channel_axis=axis, backend="reference")
    ulp = 2.0**-24
    assert np.abs(s.invstd / sr.invstd - 1).max() <= 8 * ulp
    assert np.abs(s.mean - sr.mean).max() <= 8 * ulp * np.abs(sr.mean).max() + 1e-7
    assert np.abs(y - yr).max() <= 8 * ulp * np.abs(yr).max()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
@pytest.mark.parametrize("spread", [1e18, 1e20, 1e30])
@pytest.mark.parametrize("outlier", [False, True])
def test_huge_float32_spread(layout, spread, outlier, either_family):
    # (x - k)^2 passes float32's range from |x - k| ~ 1e19: the float32 partial sums of
    # squares overflow, and y came back all zeros with check_finite silent. The statistics
    # are finite in float64, so the result must be the reference's.
    mode, axis = LAYOUTS[layout]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 4, 16, 16)) * spread + 0.3 * spread).astype(np.float32)
    if outlier:  # and the refinement around the mean takes float64 sums as well
        x[0, :, 0, 0] = 50 * spread
    if axis == -1:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    pshape = x.shape[1:] if mode == "per_activation" else 4
    rm, rv = np.zeros(pshape), np.zeros(pshape)  # float64: var ~ 1e60 is beyond float32
    y, s = bn.forward_training(x, None, None, mode=mode, channel_axis=axis, backend="cpu",
                               running_mean=rm, running_var=rv, momentum=1.0,
                               check_finite=True)
    yr, sr = bn.forward_training(x.astype(np.float64), None, None, mode=mode,
                                 channel_axis=axis, backend="reference")
    ulp = 2.0**-24
    assert np.abs(s.invstd / sr.invstd - 1).max() <= 8 * ulp
    assert np.abs(s.mean - sr.mean).max() <= 8 * ulp * np.abs(sr.mean).max()
    assert np.abs(y - yr).max() <= 16 * ulp * np.abs(yr).max()
    assert np.abs(rm - sr.mean).max() <= 8 * ulp * np.abs(sr.mean).max()
    m = x.size // rm.size
    var = (1 / sr.invstd.astype(np.float64) ** 2 - 1e-5) * m / (m - 1)
    assert np.abs(rv / var - 1).max() <= 16 * ulp
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dg, db = bn.backward(dy, x, None, s, mode=mode, channel_axis=axis, backend="cpu")
    want = bn.backward(dy, x, None, sr, mode=mode, channel_axis=axis, backend="reference")
    close(dx, want[0], np.float32, "dx")
    close(db, want[2], np.float32, "dbeta")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("hw", [300, 20])
def test_backward_dbeta_with_infinite_mean(layout, hw):
    # dbeta = sum(dy) does not depend on the saved mean: an infinite one must not poison it
    mode, axis = LAYOUTS[layout]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 2, hw)).astype(np.float32)
    x[1, 0, 7] = np.inf
    dy = rng.standard_normal(x.shape).astype(np.float32)
    if axis == -1:
        x, dy = (np.ascontiguousarray(a.transpose(0, 2, 1)) for a in (x, dy))
    _, s = bn.forward_training(x, None, None, mode=mode, channel_axis=axis,
                               backend="reference")
    assert np.isinf(s.mean[0])
    db = bn.backward(dy, x, None, s, mode=mode, channel_axis=axis, backend="cpu")[2]
    want = bn.backward(dy, x, None, s, mode=mode, channel_axis=axis, backend="reference")[2]
    close(db, want, np.float32, "dbeta")


@pytest.mark.parametrize("x_order", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_backward_dy_in_another_order(x_order, dtype, either_family):
    # NCHW-shaped arrays, one stored channels-last and the other not (a channels-last
    # network's gradient after an average pool): dy is reordered to x's order first.
    # 20 channels and 35 positions: more than one 16 x 16 tile each way, with remainders
    shape = (3, 20, 5, 7)
    nchw = data(shape, np.float32, 1).astype(dtype)
    last = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    g_nchw = data(shape, np.float32, 2).astype(dtype)
    g_last = np.ascontiguousarray(g_nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    x, dy = (last, g_nchw) if x_order == "channels_last" else (nchw, g_last)
    gamma = data((20,), np.float32, 3).astype(dtype)
    _, s = bn.forward_training(x, gamma, None, backend="reference")
    got = bn.backward(dy, x, gamma, s, backend="cpu")
    want = bn.backward(dy, x, gamma, s, backend="reference")
    for g, w, name in zip(got, want, ("dx", "dgamma", "dbeta"), strict=True):
        close(g, w, dtype, name)
    assert got[0].strides == x.strides  # dx keeps x's order


# --- concurrency -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["serial", "parallel"])
def test_four_threads_at_once(family, monkeypatch):
    if family == "parallel":  # Numba's thread pool entered from 4 Python threads at once
        monkeypatch.setattr(cpu, "_SERIAL_BELOW", 0)
    inputs = [data((6, 5, 40), np.float32, seed) for seed in range(4)]
    inputs += [data((30, 7), np.float32, seed) for seed in range(4)]
    expected = []
    for x in inputs:
        y, s = bn.forward_training(x, None, None, backend="reference")
        expected.append((y, bn.backward(x, x, None, s, backend="reference")[0]))
    errors = []
    barrier = threading.Barrier(4)

    def work(tid):
        try:
            barrier.wait()
            for _ in range(10):
                for i in range(tid, len(inputs), 4):
                    y, s = bn.forward_training(inputs[i], None, None, backend="cpu")
                    dx = bn.backward(inputs[i], inputs[i], None, s, backend="cpu")[0]
                    close(y, expected[i][0], np.float32, f"thread {tid} y")
                    close(dx, expected[i][1], np.float32, f"thread {tid} dx")
        except Exception as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_stats_strided_and_dtypes(dtype):
    # running statistics that cannot be viewed as 1-d (every other element) and float64 ones
    x = data((6, 3, 5), np.float32)
    got = {}
    for b in ("cpu", "reference"):
        rm = np.full(6, 0.5, dtype)[::2]
        rv = np.full(3, 2.0, dtype)
        bn.forward_training(x, None, None, running_mean=rm, running_var=rv, momentum=0.3,
                            backend=b)
        got[b] = (rm, rv)
    close(got["cpu"][0], got["reference"][0], np.float32, "running_mean")
    close(got["cpu"][1], got["reference"][1], np.float32, "running_var")


# --- plans: the decisions made once per (shape, strides, dtype, layout) -------------------

def test_plan_per_strides_and_dtype():
    x = data((3, 4, 5, 6), np.float32)
    lay = resolve_layout(x.shape, "spatial", 1)
    last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    wide = data((3, 4, 5, 12), np.float32)[..., ::2]  # same shape, strided
    plans = [cpu.plan(a, lay) for a in (x, last, x.astype(np.float64), wide)]
    assert cpu.plan(x.copy(), lay) is plans[0]
    assert len({id(p) for p in plans}) == 4
    assert plans[0].direct and not plans[0].rows and plans[1].direct and plans[1].rows
    assert np.shares_memory(plans[1].view(last), last)
    assert not plans[3].fresh  # a fresh output of a strided x has other strides
    # arrays of each kind alternately, each through its own plan, against the reference
    for a in (x, last, x.astype(np.float64), wide, x, last):
        check_all(a, "spatial", 1, True)


@pytest.mark.parametrize("mode, axis, shape", [("spatial", 1, (3, 4, 5, 6)),
                                               ("spatial", -1, (3, 5, 6, 4)),
                                               ("per_activation", 1, (6, 2, 3))])
def test_out_in_another_order_than_x(mode, axis, shape):
    # x contiguous, out transposed (or the reverse): the plan takes one and not the other,
    # so the call takes the general path
    x = data(shape, np.float32)
    perm = tuple(reversed(range(len(shape))))
    other = np.empty(tuple(shape[a] for a in perm), np.float32).transpose(perm)
    check_all(x, mode, axis, True, out=other)
    x_t = np.ascontiguousarray(x.transpose(perm)).transpose(perm)
    check_all(x_t, mode, axis, True, out=np.empty(shape, np.float32))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rdtype", ["<f2", ">f2", ">f4", ">f8", "<f4", "<f8"])
def test_running_statistics_in_every_accepted_dtype(backend, rdtype):
    # updated in their own dtype and byte order (Numba writes only native float32/64: the
    # rest are updated by NumPy); per-channel parameters may have them too
    x = data((6, 3, 5), np.float32)
    rm, rv = np.full(3, 0.5, rdtype), np.full(3, 2.0, rdtype)
    gamma, beta = np.full(3, 1.5, rdtype), np.full(3, -0.5, rdtype)
    y, s = bn.forward_training(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.3,
                               backend=backend)
    assert rm.dtype == np.dtype(rdtype) and rv.dtype == np.dtype(rdtype)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2), ddof=1)
    tol = np.float16 if rdtype.endswith("2") else np.float32
    close(rm, 0.7 * 0.5 + 0.3 * mean, tol, "running_mean")
    close(rv, 0.7 * 2.0 + 0.3 * var, tol, "running_var")
    want = 1.5 * (x64 - mean[:, None]) / np.sqrt(x64.var(axis=(0, 2))[:, None] + 1e-5) - 0.5
    close(y, want, np.float32 if rdtype.endswith(("4", "8")) else np.float16, "y")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("where", ["x", "gamma", "running_mean"])
def test_longdouble_is_refused_before_any_kernel(backend, where):
    x = data((6, 3, 5), np.float32)
    kw = {"gamma": None, "running_mean": np.zeros(3, np.float32)}
    if where == "x":
        x = x.astype(np.longdouble)
    else:
        kw[where] = np.zeros(3, np.longdouble)
    before = kw["running_mean"].copy()
    with pytest.raises(TypeError, match=f"`{where}` must have a floating-point dtype "
                                        r"\(float16, float32, float64\)"):
        bn.forward_training(x, kw["gamma"], None, running_mean=kw["running_mean"],
                            backend=backend)
    assert np.array_equal(kw["running_mean"], before)
