"""The fused forms (contract §8) and the phases on the reference: against the unfused
composition, central finite differences, PyTorch autograd, and Chan's merge."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import reference as ref
from batchnorm._shapes import GAMMA_MIN, resolve_layout
from batchnorm.backends.protocol import Backend, merge_moments
from batchnorm.cli.verify import numerical_gradient
from conftest import assert_close

FORMS = [  # (activation, negative_slope, residual)
    ("relu", 0.0, False), ("relu", 0.0, True), ("leaky_relu", 0.1, False),
    ("leaky_relu", 0.2, True), (None, 0.0, True),
]
LAYOUTS = {"nchw": (1, (3, 4, 3, 2)), "nhwc": (-1, (3, 3, 2, 4)), "nc": (1, (6, 5))}


def _act(pre, activation, slope):
    if activation is None:
        return pre
    return np.where(pre > 0, pre, (0.0 if activation == "relu" else slope) * pre)


def _inputs(shape, channel_axis, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[channel_axis]
    return dict(x=rng.normal(1.0, 2.0, shape), z=rng.normal(0.0, 1.0, shape),
                dy=rng.normal(0.0, 1.0, shape), gamma=rng.normal(1.0, 0.5, c),
                beta=rng.normal(0.0, 0.5, c))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("form", FORMS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_fused_forward_is_the_composition(layout, form, training):
    activation, slope, with_z = form
    ca, shape = LAYOUTS[layout]
    inp = _inputs(shape, ca)
    z = inp["z"] if with_z else None
    kw = dict(channel_axis=ca, backend="reference")
    mean, var = np.linspace(-1, 1, shape[ca]), np.linspace(0.5, 2, shape[ca])
    if training:
        plain, _ = bn.forward_training(inp["x"], inp["gamma"], inp["beta"], **kw)
        fused, _ = bn.forward_training(inp["x"], inp["gamma"], inp["beta"], activation=activation,
                                       negative_slope=slope, residual=z, **kw)
    else:
        plain = bn.forward_inference(inp["x"], inp["gamma"], inp["beta"], mean, var, **kw)
        fused = bn.forward_inference(inp["x"], inp["gamma"], inp["beta"], mean, var,
                                     activation=activation, negative_slope=slope, residual=z,
                                     **kw)
    want = _act(plain + (0.0 if z is None else z), activation, slope)
    assert_close(fused, want, atol=1e-12, rtol=1e-12, name="y")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("form", FORMS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_fused_gradients_match_finite_differences(layout, form, training):
    activation, slope, with_z = form
    ca, shape = LAYOUTS[layout]
    inp = _inputs(shape, ca, seed=1)
    c = shape[ca]
    mean, var = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)
    kw = dict(channel_axis=ca, backend="reference", activation=activation,
              negative_slope=slope)
    z = inp["z"] if with_z else None

    def forward():
        if training:
            return bn.forward_training(inp["x"], inp["gamma"], inp["beta"], residual=z,
                                       eps=1e-3, **kw)
        return bn.forward_inference(inp["x"], inp["gamma"], inp["beta"], mean, var,
                                    residual=z, eps=1e-3, **kw), None

    def loss():
        return float(np.sum(forward()[0] * inp["dy"]))

    y, saved = forward()
    if saved is None:
        saved = bn.SavedStats(mean, 1.0 / np.sqrt(var + 1e-3))
    grads = bn.backward(inp["dy"], inp["x"], inp["gamma"], saved, y=y, residual=with_z,
                        training=training, **kw)
    names = ["x", "gamma", "beta"] + (["z"] if with_z else [])
    assert len(grads) == len(names)
    for name, grad in zip(names, grads, strict=True):
        num = numerical_gradient(loss, inp[name] if name != "z" else z)
        assert_close(grad, num, atol=2e-6, rtol=2e-5, name=f"d{name}")


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_fused_gradients_match_torch_autograd(form):
    torch = pytest.importorskip("torch")
    activation, slope, with_z = form
    ca, shape = LAYOUTS["nchw"]
    inp = _inputs(shape, ca, seed=2)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in inp.items() if k != "dy"}
    pre = torch.nn.functional.batch_norm(t["x"], None, None, t["gamma"], t["beta"],
                                         training=True, eps=1e-5)
    if with_z:
        pre = pre + t["z"]
    out = {None: pre, "relu": torch.relu(pre),
           "leaky_relu": torch.nn.functional.leaky_relu(pre, slope)}[activation]
    out.backward(torch.tensor(inp["dy"]))
    y, saved = bn.forward_training(inp["x"], inp["gamma"], inp["beta"], activation=activation,
                                   negative_slope=slope, residual=inp["z"] if with_z else None,
                                   backend="reference")
    assert_close(y, out.detach(), atol=1e-12, rtol=1e-12, name="y")
    grads = bn.backward(inp["dy"], inp["x"], inp["gamma"], saved, activation=activation,
                        negative_slope=slope, y=y, residual=with_z, backend="reference")
    for name, grad in zip(["x", "gamma", "beta", "z"], grads, strict=False):
        assert_close(grad, t[name].grad, atol=1e-10, rtol=1e-10, name=f"d{name}")


@pytest.mark.parametrize("activation,slope", [(None, 0.0), ("leaky_relu", 0.01),
                                              ("leaky_relu", 0.3)])
@pytest.mark.parametrize("training", [True, False])
def test_memory_saving_mode_recovers_xhat_from_y(activation, slope, training):
    ca, shape = LAYOUTS["nhwc"]
    inp = _inputs(shape, ca, seed=3)
    x = inp["x"].astype(np.float32)
    gamma, beta = inp["gamma"].astype(np.float32), inp["beta"].astype(np.float32)
    dy = inp["dy"].astype(np.float32)
    kw = dict(channel_axis=ca, backend="reference", activation=activation,
              negative_slope=slope)
    c = shape[ca]
    mean, var = np.linspace(-1, 1, c).astype(np.float32), np.linspace(0.5, 2, c)
    if training:
        y, saved = bn.forward_training(x, gamma, beta, **kw)
        inplace = x.copy()
        y2, _ = bn.forward_training(inplace, gamma, beta, out=inplace, **kw)
    else:
        y = bn.forward_inference(x, gamma, beta, mean, var.astype(np.float32), **kw)
        saved = bn.SavedStats(mean, (1.0 / np.sqrt(var + 1e-5)).astype(np.float32))
        inplace = x.copy()
        y2 = bn.forward_inference(inplace, gamma, beta, mean, var.astype(np.float32),
                                  out=inplace, **kw)
    assert y2 is inplace
    np.testing.assert_array_equal(y2, y)
    want = bn.backward(dy, x, gamma, saved, y=y, training=training, **kw)
    got = bn.backward(dy, None, gamma, saved, y=y, beta=beta, training=training, **kw)
    for name, a, b in zip(["dx", "dgamma", "dbeta"], got, want, strict=True):
        assert_close(a, b, np.float32, name=name)


def test_memory_saving_mode_refusals():
    x = np.random.default_rng(4).normal(size=(4, 3, 2))
    g = np.ones(3)
    with pytest.raises(ValueError, match="invertible activation"):
        bn.forward_training(x, g, None, out=x, activation="relu", backend="reference")
    with pytest.raises(ValueError, match="residual"):
        bn.forward_training(x, g, None, out=x, residual=x.copy(), backend="reference")
    small = np.array([1.0, GAMMA_MIN / 2, -1.0])
    before = x.copy()
    with pytest.raises(ValueError, match=r"\|gamma\|"):
        bn.forward_training(x, small, None, out=x, backend="reference")
    np.testing.assert_array_equal(x, before)  # refused before anything was written
    y, saved = bn.forward_training(x, g, None, backend="reference")
    with pytest.raises(ValueError, match="recovered"):
        bn.backward(x, None, g, saved, y=y, activation="relu", backend="reference")
    with pytest.raises(ValueError, match=r"`y`"):
        bn.backward(x, x, g, saved, activation="leaky_relu", backend="reference")


@pytest.mark.parametrize("activation,slope,exc", [
    ("tanh", 0.1, ValueError), ("leaky_relu", -0.1, ValueError),
    ("leaky_relu", float("nan"), ValueError), ("leaky_relu", "0.1", TypeError),
    ("leaky_relu", True, TypeError)])
def test_epilogue_refusals(activation, slope, exc):
    x = np.ones((4, 3))
    with pytest.raises(exc, match="activation|negative_slope"):
        bn.forward_training(x, None, None, activation=activation, negative_slope=slope,
                            backend="reference")


def test_residual_must_match_x():
    x = np.random.default_rng(5).normal(size=(4, 3))
    with pytest.raises(ValueError, match="residual"):
        bn.forward_training(x, None, None, residual=np.ones((4, 2)), backend="reference")
    with pytest.raises(TypeError, match="residual"):
        bn.forward_training(x, None, None, residual=x.astype(np.float32), backend="reference")


@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.integers(0, 2**16))
def test_moments_of_parts_merge_to_the_whole(sizes, seed):
    rng = np.random.default_rng(seed)
    shape = (sum(sizes), 3, 4)
    x = rng.normal(rng.normal(0, 50), rng.uniform(0.1, 10), shape)
    lay = resolve_layout(shape)
    parts = np.split(x, np.cumsum(sizes)[:-1])
    stats = [ref.moments(p, resolve_layout(p.shape)) for p in parts]
    counts = np.array([[n] for n, _, _ in stats], dtype=np.float64)
    n, mean, m2 = merge_moments(counts, np.stack([m for _, m, _ in stats]),
                                np.stack([v for _, _, v in stats]))
    n0, mean0, m20 = ref.moments(x, lay)
    assert n == n0
    assert_close(mean, mean0, atol=1e-9, rtol=1e-12, name="mean")
    assert_close(m2, m20, atol=1e-7, rtol=1e-10, name="m2")


def test_the_reference_implements_the_protocol():
    assert isinstance(ref, Backend)
