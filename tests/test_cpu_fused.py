"""The CPU backend's fused forms, memory-saving mode and phases (contract §8) against the
reference: a grid of forms, layouts, dtypes and kernel families, the phases one by one,
in-place results bit for bit equal to out-of-place ones on every kernel path, and the
protocol's signatures."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import reference as ref
from batchnorm._shapes import Epilogue, resolve_layout
from batchnorm.backends.protocol import Backend, merge_moments
from conftest import assert_close, tolerance

pytest.importorskip("numba")
from batchnorm.backends import cpu  # noqa: E402  (needs numba)

FORMS = {  # name -> (activation, negative_slope, residual)
    "relu": ("relu", 0.0, False),
    "relu+add": ("relu", 0.0, True),
    "leaky": ("leaky_relu", 0.1, False),
    "leaky+add": ("leaky_relu", 0.2, True),
    "add": (None, 0.0, True),
    "plain": (None, 0.0, False),
}
INVERTIBLE = ["leaky", "plain"]  # the memory-saving mode's forms
LAYOUTS = {  # name -> (mode, channel_axis, shape)
    "nchw": ("spatial", 1, (3, 4, 5, 6)),
    "persistent": ("spatial_persistent", 1, (2, 5, 3, 7)),
    "nhwc": ("spatial", -1, (3, 5, 6, 4)),
    "per_activation": ("per_activation", 1, (6, 3, 4)),
    "nc": ("spatial", 1, (9, 5)),
}


@pytest.fixture(params=["serial", "parallel"])
def family(request, monkeypatch):
    """Run the test once with the serial kernels and once with the parallel ones."""
    monkeypatch.setattr(cpu, "_SERIAL_BELOW", 1 << 62 if request.param == "serial" else 0)
    return request.param


def close(got, want, dtype, what):
    atol, rtol = tolerance(dtype)
    assert_close(got, want, atol=atol, rtol=rtol, name=what)


def case(shape, channel_axis, mode, dtype, seed=0, affine=True):
    """x, z, dy, gamma, beta of one call; gamma away from 0 (the memory-saving mode)."""
    rng = np.random.default_rng(seed)
    pshape = resolve_layout(shape, mode, channel_axis).param_shape
    x, z, dy = (rng.normal(loc, 2.0, shape).astype(dtype) for loc in (0.5, 0.0, 0.0))
    if not affine:
        return x, z, dy, None, None
    gamma = (rng.uniform(0.5, 1.5, pshape) * rng.choice([-1, 1], pshape)).astype(dtype)
    return x, z, dy, gamma, rng.normal(0.0, 0.5, pshape).astype(dtype)


def epilogue_kw(form):
    activation, slope, with_z = FORMS[form]
    return dict(activation=activation, negative_slope=slope), with_z


def check_form(x, z, dy, gamma, beta, mode, axis, form, dtype):
    """Training and inference forward, and backward from x and (invertible forms) from y:
    cpu against reference, both given the same inputs."""
    act, with_z = epilogue_kw(form)
    z = z if with_z else None
    kw = dict(mode=mode, channel_axis=axis, **act)
    pshape = resolve_layout(x.shape, mode, axis).param_shape
    rm = {b: np.full(pshape, 0.25, np.float32) for b in ("cpu", "reference")}
    res = {b: bn.forward_training(x, gamma, beta, residual=z, running_mean=rm[b],
                                  momentum=0.3, backend=b, **kw)
           for b in ("cpu", "reference")}
    (y, s), (yr, sr) = res["cpu"], res["reference"]
    close(y, yr, dtype, "y")
    close(s.mean, sr.mean, dtype, "mean")
    close(s.invstd, sr.invstd, dtype, "invstd")
    close(rm["cpu"], rm["reference"], dtype, "running_mean")
    var = np.linspace(0.5, 2.0, int(np.prod(pshape))).reshape(pshape).astype(np.float32)
    yi = {b: bn.forward_inference(x, gamma, beta, sr.mean, var, residual=z, backend=b, **kw)
          for b in ("cpu", "reference")}
    close(yi["cpu"], yi["reference"], dtype, "inference y")
    for training in (True, False):
        for recover in ((False, True) if form in INVERTIBLE else (False,)):
            bkw = dict(training=training, residual=with_z, y=yr, beta=beta, **kw)
            xin = None if recover else x
            got = bn.backward(dy, xin, gamma, sr, backend="cpu", **bkw)
            want = bn.backward(dy, xin, gamma, sr, backend="reference", **bkw)
            names = ("dx", "dgamma", "dbeta", "dz")[:len(want)]
            assert len(got) == len(want)
            for name, g, w in zip(names, got, want, strict=True):
                if w is None:
                    assert g is None
                else:
                    assert g.dtype == w.dtype or name in ("dgamma", "dbeta")
                    close(g, w, dtype, f"{name} (training={training}, x None={recover})")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grid(layout, form, dtype, family):
    mode, axis, shape = LAYOUTS[layout]
    x, z, dy, gamma, beta = case(shape, axis, mode, dtype)
    before = [a.copy() for a in (x, z, dy)]
    check_form(x, z, dy, gamma, beta, mode, axis, form, dtype)
    for a, b in zip((x, z, dy), before, strict=True):
        np.testing.assert_array_equal(a, b)  # inputs are never modified


@pytest.mark.parametrize("form", ["relu+add", "leaky"])
def test_without_affine(form, family):
    mode, axis, shape = LAYOUTS["nchw"]
    x, z, dy, _, _ = case(shape, axis, mode, np.float32, affine=False)
    check_form(x, z, dy, None, None, mode, axis, form, np.float32)


@pytest.mark.parametrize("form", ["relu+add", "leaky", "plain"])
@pytest.mark.parametrize("stored", ["numpy", "torch"])
def test_nchw_stored_channels_last(form, stored, family):
    # an NCHW-shaped array whose channels are contiguous (torch's channels_last seen
    # through NumPy) takes the rows kernels; outputs keep x's strides
    shape = (3, 6, 4, 5)
    x, z, dy, gamma, beta = case(shape, 1, "spatial", np.float32, seed=2)
    if stored == "torch":
        torch = pytest.importorskip("torch")
        x, z, dy = (torch.from_numpy(a).contiguous(memory_format=torch.channels_last).numpy()
                    for a in (x, z, dy))
    else:
        x, z, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
                    for a in (x, z, dy))
    assert cpu.plan(x, resolve_layout(shape)).rows
    act, with_z = epilogue_kw(form)
    y, s = bn.forward_training(x, gamma, beta, residual=z if with_z else None, backend="cpu",
                               **act)
    assert y.strides == x.strides
    grads = bn.backward(dy, x, gamma, s, y=y, residual=with_z, backend="cpu", **act)
    assert all(g.strides == x.strides for g in (grads[0], *grads[3:]))
    check_form(x, z, dy, gamma, beta, "spatial", 1, form, np.float32)


@pytest.mark.parametrize("which", ["z", "dy", "y"])
@pytest.mark.parametrize("x_order", ["channels_last", "nchw"])
def test_operands_in_another_order(which, x_order, family):
    # the residual, dy or y stored in another order than x: copied to x's order first
    shape = (3, 20, 5, 7)
    x, z, dy, gamma, beta = case(shape, 1, "spatial", np.float32, seed=3)
    last = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # noqa: E731
    if x_order == "channels_last":
        x = last(x)
    yr, sr = bn.forward_training(x, gamma, beta, residual=z, activation="leaky_relu",
                                 negative_slope=0.1, backend="reference")
    other = {"z": z, "dy": dy, "y": yr}
    if x_order == "nchw":
        other[which] = last(other[which])
    else:
        other = {k: (v if k == which else last(v)) for k, v in other.items()}
    kw = dict(activation="leaky_relu", negative_slope=0.1)
    y, _ = bn.forward_training(x, gamma, beta, residual=other["z"], backend="cpu", **kw)
    close(y, yr, np.float32, "y")
    for xin in (x, None):
        bkw = dict(y=other["y"], beta=beta, residual=True, **kw)
        got = bn.backward(other["dy"], xin, gamma, sr, backend="cpu", **bkw)
        want = bn.backward(other["dy"], xin, gamma, sr, backend="reference", **bkw)
        for name, g, w in zip(("dx", "dgamma", "dbeta", "dz"), got, want, strict=True):
            close(g, w, np.float32, name)


def test_relu_derivative_at_zero_is_the_slope():
    # a constant channel with beta 0 gives pre = 0 exactly: act'(0) is the slope (0 for
    # relu), as torch takes it
    x = np.random.default_rng(4).normal(size=(4, 3, 5)).astype(np.float32)
    x[:, 1] = 2.5
    beta = np.array([0.1, 0.0, -0.1], np.float32)
    dy = np.ones_like(x)
    for act, slope in (("relu", 0.0), ("leaky_relu", 0.3)):
        y, s = bn.forward_training(x, None, beta, activation=act, negative_slope=slope,
                                   backend="cpu")
        assert (y[:, 1] == 0).all()
        dx, _, db, dz = bn.backward(dy, x, None, s, y=y, activation=act, negative_slope=slope,
                                    residual=True, backend="cpu")
        assert db[1] == np.float32(slope * x[:, 1].size)
        assert (dz[:, 1] == np.float32(slope)).all()


def test_nan_propagates_through_the_activation():
    x = np.random.default_rng(5).normal(size=(5, 4, 6)).astype(np.float32)
    x[2, 1, 3] = np.nan
    y, _ = bn.forward_training(x, None, None, activation="relu", backend="cpu")
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, [0, 2, 3]]).any()
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1$"):
        bn.forward_training(x, None, None, activation="relu", check_finite=True,
                            backend="cpu")
    z = np.zeros_like(x)
    z[0, 2, 0] = np.inf
    clean = np.nan_to_num(x)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        bn.forward_training(clean, None, None, residual=z, activation="leaky_relu",
                            check_finite=True, backend="cpu")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_zero_size(layout):
    mode, axis, _ = LAYOUTS[layout]
    x = np.empty((0, 3, 4), np.float32) if axis == 1 else np.empty((0, 4, 3), np.float32)
    lay = resolve_layout(x.shape, mode, axis)
    y, s = bn.forward_training(x, None, None, residual=x.copy(), activation="relu",
                               mode=mode, channel_axis=axis, backend="cpu")
    assert y.shape == x.shape
    dx, dg, db, dz = bn.backward(x, x, np.ones(3, np.float32), s, y=y, activation="relu",
                                 residual=True, mode=mode, channel_axis=axis, backend="cpu")
    assert dx.shape == dz.shape == x.shape and (dg == 0).all() and (db == 0).all()
    n, mean, m2 = cpu.moments(x, lay)
    assert n == 0 and (mean == 0).all() and (m2 == 0).all()
    sums = cpu.grad_sums(x, x, mean, mean, lay)
    assert all((v == 0).all() and v.shape == (3,) for v in sums)
    dx, dz = cpu.grad_apply(x, x, mean, mean, None, sums, lay, count=0, want_dz=True)
    assert dx.shape == dz.shape == x.shape


# --- the phases --------------------------------------------------------------------------

PHASE_LAYOUTS = ["nchw", "nhwc", "per_activation"]


def _phase_args(layout, form, dtype, seed=0):
    mode, axis, shape = LAYOUTS[layout]
    lay = resolve_layout(shape, mode, axis)
    x, z, dy, gamma, beta = case(shape, axis, mode, dtype, seed)
    activation, slope, with_z = FORMS[form]
    epi = None if activation is None else Epilogue(activation, slope)
    return lay, x, (z if with_z else None), dy, gamma, beta, epi


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", PHASE_LAYOUTS)
def test_moments(layout, dtype, family):
    lay, x, *_ = _phase_args(layout, "plain", dtype)
    n, mean, m2 = cpu.moments(x, lay)
    n0, mean0, m20 = ref.moments(x, lay)
    assert n == n0 and mean.dtype == m2.dtype == np.float64
    assert mean.shape == m2.shape == lay.param_shape
    close(mean, mean0, dtype, "mean")
    close(m2 / n, m20 / n, dtype, "m2 / count")


@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.integers(0, 2**16),
       st.sampled_from(["nchw", "nhwc"]))
@settings(max_examples=25, deadline=None)
def test_moments_of_shards_merge_to_the_whole(sizes, seed, layout):
    # SyncBatchNorm's forward: each rank's moments, Chan's merge, equal to the whole batch's
    rng = np.random.default_rng(seed)
    shape = (sum(sizes), 3, 4) if layout == "nchw" else (sum(sizes), 4, 3)
    axis = 1 if layout == "nchw" else -1
    x = rng.normal(rng.normal(0, 50), rng.uniform(0.1, 10), shape).astype(np.float32)
    parts = np.split(x, np.cumsum(sizes)[:-1])
    stats = [cpu.moments(p, resolve_layout(p.shape, "spatial", axis)) for p in parts]
    counts = np.array([[n] for n, _, _ in stats], dtype=np.float64)
    n, mean, m2 = merge_moments(counts, np.stack([m for _, m, _ in stats]),
                                np.stack([v for _, _, v in stats]))
    n0, mean0, m20 = ref.moments(x, resolve_layout(shape, "spatial", axis))
    assert n == n0
    if n:
        close(mean, mean0, np.float32, "mean")
        close(m2 / n, m20 / n, np.float32, "m2 / count")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("form", ["relu+add", "leaky", "plain"])
@pytest.mark.parametrize("layout", PHASE_LAYOUTS)
def test_apply(layout, form, dtype, family):
    lay, x, z, _, gamma, beta, epi = _phase_args(layout, form, dtype)
    _, mean, m2 = ref.moments(x, lay)
    invstd = ref.inverse_std(m2 / lay.count, 1e-5).astype(np.float32)
    got = cpu.apply(x, mean, invstd, gamma, beta, lay, residual=z, epilogue=epi)
    want = ref.apply(x, mean, invstd, gamma, beta, lay, residual=z, epilogue=epi)
    assert got.dtype == x.dtype and got.strides == x.strides
    close(got, want, dtype, "y")
    out = np.empty_like(x)
    assert cpu.apply(x, mean, invstd, gamma, beta, lay, residual=z, epilogue=epi,
                     out=out) is out
    np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("layout", PHASE_LAYOUTS)
def test_gradient_phases(layout, form, dtype, family):
    lay, x, z, dy, gamma, beta, epi = _phase_args(layout, form, dtype, seed=1)
    y, mean, invstd, _ = ref.forward_training(x, gamma, beta, lay, eps=1e-5, residual=z,
                                              epilogue=epi)
    recovers = (False, True) if form in INVERTIBLE else (False,)
    for recover, training in ((r, t) for r in recovers for t in (True, False)):
        xin = None if recover else x
        kw = dict(y=y, beta=beta, epilogue=epi)
        sums = cpu.grad_sums(dy, xin, mean, invstd, lay, gamma=gamma, **kw)
        want = ref.grad_sums(dy, xin, mean, invstd, lay, gamma=gamma, **kw)
        for name, g, w in zip(("sum g", "sum g xhat"), sums, want, strict=True):
            assert g.dtype == np.float64 and g.shape == lay.param_shape
            close(g, w, dtype, f"{name} (x None={recover})")
        got = cpu.grad_apply(dy, xin, mean, invstd, gamma, want, lay, count=lay.count,
                             training=training, want_dz=True, **kw)
        ref_dx = ref.grad_apply(dy, xin, mean, invstd, gamma, want, lay, count=lay.count,
                                training=training, want_dz=True, **kw)
        for name, g, w in zip(("dx", "dz"), got, ref_dx, strict=True):
            assert g.dtype == dy.dtype and g.strides == dy.strides
            close(g, w, dtype, f"{name} (training={training}, x None={recover})")
        assert cpu.grad_apply(dy, xin, mean, invstd, gamma, want, lay, count=lay.count,
                              **kw)[1] is None


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gradient_phases_of_shards_with_the_global_count(layout, family):
    # SyncBatchNorm's backward: each rank's sums, added, and each rank's dx from them with
    # the global count, equal to the whole batch's backward
    mode, axis, _ = LAYOUTS[layout]
    shape = (7, 3, 4, 5) if axis == 1 else (7, 4, 5, 3)
    x, z, dy, gamma, beta = case(shape, axis, mode, np.float32, seed=6)
    lay = resolve_layout(shape, mode, axis)
    epi = Epilogue("relu", 0.0)
    y, mean, invstd, _ = ref.forward_training(x, gamma, beta, lay, eps=1e-5, residual=z,
                                              epilogue=epi)
    whole = ref.backward(dy, x, gamma, mean, invstd, lay, y=y, epilogue=epi, residual=True)
    cuts = [0, 3, 3, 7]  # an empty shard too
    shards = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    sums = [cpu.grad_sums(dy[s], x[s], mean, invstd, resolve_layout(x[s].shape, mode, axis),
                          y=y[s], gamma=gamma, epilogue=epi) for s in shards]
    total = tuple(sum(s[i] for s in sums) for i in range(2))
    close(total[0], whole[2], np.float32, "dbeta")
    close(total[1], whole[1], np.float32, "dgamma")
    for s in shards:
        dx, dz = cpu.grad_apply(dy[s], x[s], mean, invstd, gamma, total,
                                resolve_layout(x[s].shape, mode, axis), count=lay.count,
                                y=y[s], epilogue=epi, want_dz=True)
        close(dx, whole[0][s], np.float32, "dx")
        close(dz, whole[3][s], np.float32, "dz")


def test_grad_apply_writes_into_out():
    lay, x, z, dy, gamma, beta, epi = _phase_args("nchw", "relu+add", np.float32)
    y, mean, invstd, _ = ref.forward_training(x, gamma, beta, lay, eps=1e-5, residual=z,
                                              epilogue=epi)
    sums = cpu.grad_sums(dy, x, mean, invstd, lay, y=y, gamma=gamma, epilogue=epi)
    out, out_dz = np.empty_like(x), np.empty((3, 4, 5, 12), np.float32)[..., ::2]
    dx, dz = cpu.grad_apply(dy, x, mean, invstd, gamma, sums, lay, count=lay.count, y=y,
                            epilogue=epi, out=out, out_dz=out_dz, want_dz=True)
    assert dx is out and dz is out_dz
    want = ref.grad_apply(dy, x, mean, invstd, gamma, sums, lay, count=lay.count, y=y,
                          epilogue=epi, want_dz=True)
    close(dx, want[0], np.float32, "dx")
    close(dz, want[1], np.float32, "dz")


# --- the memory-saving mode: in place equals out of place, bit for bit -------------------

def _inplace_cases():
    """(name, x maker, mode, axis): inputs that take each kernel path."""
    rng = np.random.default_rng(8)

    def normal(shape, dtype=np.float32):
        return lambda: rng.normal(0.5, 2.0, shape).astype(dtype)

    def outlier(shape):  # an outlying first value: the sums are taken again (refine)
        def make():
            x = rng.normal(0.0, 1.0, shape).astype(np.float32)
            x.reshape(-1)[0] = 300.0
            x[(0,) * (x.ndim - 1) + (slice(None),)] = 300.0  # the rows kernels' first row
            x[(0, slice(None)) + (0,) * (x.ndim - 2)] = 300.0
            return x
        return make

    def huge(shape):  # float32 partial sums overflow: float64 re-sums
        return lambda: (rng.normal(0.3, 1.0, shape) * 1e20).astype(np.float32)

    def strided(shape):  # every other element of the last axis: a copy-back output
        return lambda: rng.normal(0.5, 2.0, shape[:-1] + (2 * shape[-1],)).astype(
            np.float32)[..., ::2]

    return [
        ("cmajor", normal((4, 6, 5, 5)), "spatial", 1),
        ("rows", normal((4, 5, 5, 6)), "spatial", -1),
        ("per_activation", normal((8, 3, 4)), "per_activation", 1),
        ("cmajor-refine", outlier((4, 3, 8, 8)), "spatial", 1),
        ("rows-refine", outlier((8, 8, 8, 3)), "spatial", -1),
        ("cmajor-overflow", huge((4, 3, 8, 8)), "spatial", 1),
        ("rows-overflow", huge((8, 8, 8, 3)), "spatial", -1),
        ("strided", strided((3, 4, 5, 6)), "spatial", 1),
        ("kept-apart", normal((4, 3, 5, 2)), None, None),  # axis=(1, 3): a copy-back
        ("float16", normal((4, 6, 5, 5), np.float16), "spatial", 1),
        ("float16-rows", normal((4, 5, 5, 6), np.float16), "spatial", -1),
        ("float64", normal((4, 6, 5, 5), np.float64), "spatial", 1),
    ]


INPLACE = _inplace_cases()


@pytest.mark.parametrize("form", INVERTIBLE)
@pytest.mark.parametrize("path", INPLACE, ids=[c[0] for c in INPLACE])
def test_in_place_is_out_of_place_bit_for_bit(path, form, family):
    _, make, mode, axis = path
    x = make()
    kw = dict(mode=mode, channel_axis=axis, **epilogue_kw(form)[0])
    if mode is None:
        kw.update(mode=None, channel_axis=None, axis=(1, 3))
    lay = resolve_layout(x.shape, kw["mode"], kw["channel_axis"], kw.get("axis"))
    rng = np.random.default_rng(9)
    gamma = rng.uniform(0.5, 1.5, lay.param_shape).astype(x.dtype)
    beta = rng.normal(0.0, 0.5, lay.param_shape).astype(x.dtype)
    rm = [np.zeros(lay.param_shape, np.float32) for _ in range(2)]
    y, s = bn.forward_training(x, gamma, beta, running_mean=rm[0], backend="cpu", **kw)
    xi = x.copy() if x.flags.c_contiguous else x.base.copy()[..., ::2]  # x's strides
    assert xi.strides == x.strides
    y2, s2 = bn.forward_training(xi, gamma, beta, out=xi, running_mean=rm[1], backend="cpu",
                                 **kw)
    assert y2 is xi
    np.testing.assert_array_equal(y2, y)
    for a, b in zip((*s, rm[0]), (*s2, rm[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    var = np.abs(s.mean).astype(np.float32) + 0.5
    yi = bn.forward_inference(x, gamma, beta, s.mean, var, backend="cpu", **kw)
    xi2 = x.copy()
    yi2 = bn.forward_inference(xi2, gamma, beta, s.mean, var, out=xi2, backend="cpu", **kw)
    assert yi2 is xi2
    np.testing.assert_array_equal(yi2, yi)
    # and backward from y alone agrees with the reference's from y alone
    if x.dtype != np.float16:
        dy = rng.normal(size=x.shape).astype(x.dtype)
        bkw = dict(y=y2, beta=beta, **kw)
        got = bn.backward(dy, None, gamma, s2, backend="cpu", **bkw)
        want = bn.backward(dy, None, gamma, s2, backend="reference", **bkw)
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
            spread = 1e-3 if "overflow" in path[0] else 1.0  # |beta / gamma| vs |xhat|
            atol, rtol = tolerance(x.dtype)
            assert_close(g, w, atol=atol, rtol=rtol / spread if spread < 1 else rtol,
                         name=name)


@pytest.mark.parametrize("layout", PHASE_LAYOUTS)
def test_apply_phase_in_place(layout, family):
    lay, x, _, _, gamma, beta, _ = _phase_args(layout, "plain", np.float32)
    epi = Epilogue("leaky_relu", 0.05)
    _, mean, m2 = cpu.moments(x, lay)
    invstd = 1.0 / np.sqrt(m2 / lay.count + 1e-5)
    y = cpu.apply(x, mean, invstd, gamma, beta, lay, epilogue=epi)
    xi = x.copy()
    assert cpu.apply(xi, mean, invstd, gamma, beta, lay, epilogue=epi, out=xi) is xi
    np.testing.assert_array_equal(xi, y)


# --- the torch layer's direct route: cpu.Plan -------------------------------------------

@pytest.mark.parametrize("form", ["relu+add", "leaky", "plain"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_plan_direct_route(layout, form, family):
    mode, axis, shape = LAYOUTS[layout]
    x, z, dy, gamma, beta = case(shape, axis, mode, np.float32, seed=10)
    lay = resolve_layout(shape, mode, axis)
    activation, slope, with_z = FORMS[form]
    epi = None if activation is None else Epilogue(activation, slope)
    z = z if with_z else None
    pl = cpu.plan(x, lay)
    assert pl.direct and pl.runs(None, z, dy)
    y = np.empty_like(x)
    rm = np.zeros(lay.param_shape, np.float32)
    mean, invstd, bad = pl.train(x, gamma, beta, 1e-5, 0.1, rm, None, y, True, residual=z,
                                 epilogue=epi)
    yr, mr, ir, _ = ref.forward_training(x, gamma, beta, lay, eps=1e-5, residual=z,
                                         epilogue=epi)
    assert not bad.any()
    close(y, yr, np.float32, "y")
    close(mean, mr, np.float32, "mean")
    close(invstd, ir, np.float32, "invstd")
    var = np.full(lay.param_shape, 1.5, np.float32)
    pl.infer(x, gamma, beta, mr, var, 1e-5, y, residual=z, epilogue=epi)
    close(y, ref.forward_inference(x, gamma, beta, mr, var, lay, eps=1e-5, residual=z,
                                   epilogue=epi), np.float32, "inference y")
    for xin in ((x, None) if form in INVERTIBLE else (x,)):
        dx, dz = np.empty_like(x), np.empty_like(x) if with_z else None
        dg, db = pl.grad(dy, xin, gamma, mr, ir, True, dx, y=yr, beta=beta, epilogue=epi,
                         dz=dz)
        want = ref.backward(dy, xin, gamma, mr, ir, lay, y=yr, beta=beta, epilogue=epi,
                            residual=with_z)
        for name, g, w in zip(("dx", "dgamma", "dbeta", "dz"), (dx, dg, db, dz), want,
                              strict=False):
            close(g, w, np.float32, name)


# --- the protocol ------------------------------------------------------------------------

def test_cpu_matches_the_protocol():
    """Every protocol function exists with the protocol's parameters: the same names,
    kinds and defaults in the same order; only keyword-only extras with defaults after."""
    assert isinstance(cpu, Backend)
    members = [n for n, v in vars(Backend).items()
               if inspect.isfunction(v) and not n.startswith("_")]
    assert {"moments", "apply", "grad_sums", "grad_apply", "forward_training",
            "forward_inference", "backward"} <= set(members)
    for name in members:
        want = list(inspect.signature(getattr(Backend, name)).parameters.values())[1:]
        got = list(inspect.signature(getattr(cpu, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got[:len(want)]] == \
            [(p.name, p.kind, p.default) for p in want], name
        for extra in got[len(want):]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY, (name, extra)
            assert extra.default is not inspect.Parameter.empty, (name, extra)


# --- properties --------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    layout=st.sampled_from(["nchw", "nhwc", "per_activation"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    form=st.sampled_from(list(FORMS)),
    step=st.sampled_from([1, -1, 2]),
    seed=st.integers(0, 2**16),
    force_parallel=st.booleans(),
)
def test_property_matches_reference(shape, layout, dtype, form, step, seed, force_parallel):
    mode, axis, _ = LAYOUTS[layout]
    shape[0] = max(shape[0], 2)
    x, z, dy, gamma, beta = case(tuple(n * abs(step) for n in shape), axis, mode, dtype, seed)
    sel = tuple(slice(None, None, step) for _ in shape)
    x, z, dy = x[sel], z[sel], dy[sel]
    gamma, beta = (None if p is None else p[tuple(slice(None, None, abs(step))
                                                  for _ in p.shape)] for p in (gamma, beta))
    with pytest.MonkeyPatch.context() as mp:
        if force_parallel:
            mp.setattr(cpu, "_SERIAL_BELOW", 0)
        check_form(x, z, dy, gamma, beta, mode, axis, form, dtype)


# --- backward's x route: act' from x where pre is surely not 0, y only near 0 -------------

def _near_zero_case(layout, dtype, seed):
    """x, gamma, beta whose pre = gamma * xhat + beta sits exactly at 0 and within a few
    units of 0 for many elements (x takes few values), and dy."""
    mode, axis, shape = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    lay = resolve_layout(shape, mode, axis)
    x = rng.integers(-3, 4, shape).astype(dtype)
    mean, m2 = x.mean(axis=lay.reduce_axes), x.var(axis=lay.reduce_axes)
    gamma = rng.uniform(0.5, 1.5, lay.param_shape).astype(dtype)
    xhat1 = (1.0 - mean) / np.sqrt(m2 + 1e-5)  # x == 1 gives pre == 0 up to rounding
    beta = (-gamma * xhat1).astype(dtype)
    ulp = np.finfo(dtype).eps * np.abs(beta)
    beta = beta + (rng.integers(-2, 3, lay.param_shape) * ulp).astype(dtype)
    return lay, x, gamma, beta, rng.normal(size=shape).astype(dtype), mode, axis


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", [("relu", 0.0), ("leaky_relu", 0.2)], ids=["relu", "leaky"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
def test_x_route_equals_the_y_route(layout, act, dtype, family):
    # with beta, backward takes act' from x; without, off y's sign: the same gradients,
    # also where pre is 0 or within rounding of it (y then decides)
    for seed in range(3):
        lay, x, gamma, beta, dy, mode, axis = _near_zero_case(layout, dtype, seed)
        kw = dict(mode=mode, channel_axis=axis, activation=act[0], negative_slope=act[1])
        y, s = bn.forward_training(x, gamma, beta, backend="cpu", **kw)
        # the case it is about: pre within rounding of 0 (x == 1)
        assert (np.abs(y) <= 64 * np.finfo(dtype).eps * np.abs(y).max()).any()
        for training in (True, False):
            xr = bn.backward(dy, x, gamma, s, y=y, beta=beta, training=training, backend="cpu",
                             **kw)
            yr = bn.backward(dy, x, gamma, s, y=y, training=training, backend="cpu", **kw)
            atol, rtol = tolerance(dtype)
            for name, a, b in zip(("dx", "dgamma", "dbeta"), xr, yr, strict=True):
                assert_close(a, b, atol=atol / 100, rtol=rtol / 100, name=name)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_activation"])
def test_x_route_reads_no_y_clear_of_zero(layout, family):
    # pre clear of 0 everywhere: the x route never reads y (all NaN here)
    mode, axis, shape = LAYOUTS[layout]
    x, _, dy, gamma, beta = case(shape, axis, mode, np.float32, seed=7)
    lay = resolve_layout(shape, mode, axis)
    kw = dict(mode=mode, channel_axis=axis, activation="leaky_relu", negative_slope=0.1)
    y, s = bn.forward_training(x, gamma, beta, backend="cpu", **kw)
    pre = ref.apply(x, s.mean, s.invstd, gamma, beta, lay).astype(np.float64)
    assert np.abs(pre).min() > 1e-4
    got = bn.backward(dy, x, gamma, s, y=np.full_like(y, np.nan), beta=beta, backend="cpu",
                      **kw)
    want = bn.backward(dy, x, gamma, s, y=y, backend="reference", **kw)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
        close(g, w, np.float32, name)
