"""Every row of contract §5: the exception type and a message that names the problem."""

import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.backends import BackendUnavailable

X = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
G = np.ones(3, np.float32)


def test_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size \(1, 3\)"):
        bn.forward_training(np.ones((1, 3)), None, None)
    # inference with a single value is fine
    y = bn.forward_inference(np.ones((1, 3)), None, None, np.zeros(3), np.ones(3))
    assert y.shape == (1, 3)


@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_wrong_parameter_shape_in_training(name):
    kwargs = {"gamma": None, "beta": None}
    kwargs[name] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=rf"`{name}` must have shape \(3,\).*got shape \(4,\)"):
        bn.forward_training(X, **kwargs)


@pytest.mark.parametrize("name", ["gamma", "beta", "mean", "var"])
def test_wrong_parameter_shape_in_inference(name):
    args = {"gamma": G, "beta": G, "mean": G, "var": G}
    args[name] = np.ones((3, 1), np.float32)
    with pytest.raises(ValueError, match=rf"`{name}` must have shape \(3,\).*\(3, 1\)"):
        bn.forward_inference(X, args["gamma"], args["beta"], args["mean"], args["var"])


def test_per_activation_parameters_have_the_feature_shape():
    with pytest.raises(ValueError, match=r"`gamma` must have shape \(3, 5\)"):
        bn.forward_training(X, G, None, mode="per_activation")


def test_wrong_saved_shape_in_backward():
    _, saved = bn.forward_training(X, G, None)
    with pytest.raises(ValueError, match=r"`saved.mean` must have shape \(3,\)"):
        bn.backward(X, X, G, bn.SavedStats(np.zeros(2, np.float32), saved.invstd))
    with pytest.raises(TypeError, match="SavedStats"):
        bn.backward(X, X, G, saved.mean)


def test_dy_shape_must_match():
    _, saved = bn.forward_training(X, G, None)
    with pytest.raises(ValueError, match=r"`dy` must have the input's shape \(4, 3, 5\)"):
        bn.backward(X[:2], X, G, saved)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint8])
def test_non_float_dtypes_are_refused(dtype):
    x = np.ones((4, 3), dtype=dtype)
    with pytest.raises(TypeError, match=r"`x` must have a floating-point dtype"):
        bn.forward_training(x, None, None)
    with pytest.raises(TypeError, match=r"`x` must have a floating-point dtype"):
        bn.forward_inference(x, None, None, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match=r"`gamma` must have a floating-point dtype"):
        bn.forward_training(np.ones((4, 3)), np.ones(3, dtype=dtype), None)
    with pytest.raises(TypeError, match=r"`dy` must have a floating-point dtype"):
        bn.backward(x, np.ones((4, 3)), None, bn.SavedStats(np.zeros(3), np.ones(3)))


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf"), "abc"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        bn.forward_training(X, None, None, eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        bn.forward_inference(X, None, None, G, G, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), None])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
        bn.forward_training(X, None, None, momentum=momentum)


def test_unknown_mode_lists_the_choices():
    with pytest.raises(ValueError, match="unknown mode 'channel'.*'per_activation', 'spatial', "
                                         "'spatial_persistent'"):
        bn.forward_training(X, None, None, mode="channel")


@pytest.mark.parametrize("axis", [0, 3, -3, 1.0, True])
def test_channel_axis_out_of_range_lists_the_choices(axis):
    with pytest.raises(ValueError, match=r"channel_axis .* out of range.*valid choices are "
                                         r"\[1, 2, -2, -1\]"):
        bn.forward_training(X, None, None, channel_axis=axis)


def test_rank_one_is_refused():
    with pytest.raises(ValueError, match="rank 2 or more"):
        bn.forward_training(np.ones(5), None, None)


def test_axis_conflicts_and_range():
    with pytest.raises(ValueError, match="either `axis` or `mode`/`channel_axis`"):
        bn.forward_training(X, None, None, axis=(0, 2), mode="per_activation")
    # explicit defaults count as given too
    with pytest.raises(ValueError, match="either `axis` or `mode`/`channel_axis`"):
        bn.forward_training(X, None, None, axis=(0,), mode="spatial")
    with pytest.raises(ValueError, match="either `axis` or `mode`/`channel_axis`"):
        bn.forward_inference(X, None, None, G, G, axis=(0, 2), channel_axis=1)
    with pytest.raises(ValueError, match="out of range"):
        bn.forward_training(X, None, None, axis=(0, 5))
    with pytest.raises(ValueError, match="twice"):
        bn.forward_training(X, None, None, axis=(0, -3))


def test_zero_size_input_is_not_an_error():
    x = np.ones((0, 3), np.float32)
    y, saved = bn.forward_training(x, None, None)
    assert y.shape == (0, 3)
    assert saved.mean.tolist() == [0, 0, 0] and saved.invstd.tolist() == [0, 0, 0]


def test_check_finite_names_the_channels():
    x = X.copy()
    x[0, 0, 0] = np.inf
    x[1, 2, 1] = np.nan
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 0, 2$"):
        bn.forward_training(x, None, None, check_finite=True)


def test_per_activation_check_finite_names_multi_index():
    x = X.copy()
    x[0, 1, 4] = np.nan
    with pytest.raises(FloatingPointError, match=r"\(1, 4\)"):
        bn.forward_training(x, None, None, mode="per_activation", check_finite=True)


def test_running_stats_must_be_writable_arrays():
    with pytest.raises(TypeError, match="`running_mean` is updated in place"):
        bn.forward_training(X, None, None, running_mean=[0.0, 0.0, 0.0])
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="`running_var` is updated in place but is read-only"):
        bn.forward_training(X, None, None, running_var=ro)


def test_out_is_checked():
    with pytest.raises(ValueError, match="`out` must have the input's shape"):
        bn.forward_training(X, None, None, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="`out` must have the input's dtype float32"):
        bn.forward_training(X, None, None, out=np.empty(X.shape, np.float64))
    buf = np.concatenate([X.reshape(-1), X.reshape(-1)[:5]])
    x, shifted = buf[:-5].reshape(X.shape), buf[5:].reshape(X.shape)
    with pytest.raises(ValueError, match="`out` overlaps an input"):
        bn.forward_training(x, None, None, out=shifted)  # overlaps x, but is not x itself
    with pytest.raises(ValueError, match="`out` overlaps an input"):
        z = X.copy()
        bn.forward_training(X, G, None, out=z, residual=z, backend="reference")
    # out=x is the memory-saving mode (contract §8), not an overlap
    x = X.copy()
    assert bn.forward_training(x, None, None, out=x[...])[0].base is x


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown backend 'tpu'; valid choices are 'auto'"):
        bn.forward_training(X, None, None, backend="tpu")
    # the GPU backend never runs NumPy arrays: asked for by name, it says why
    with pytest.raises(BackendUnavailable, match="gpu"):
        bn.forward_training(X, None, None, backend="gpu")


def test_auto_says_why_no_backend_can_run():
    from batchnorm.backends import select

    with pytest.raises(BackendUnavailable, match=r"no backend can run an input of type list "
                                                 r"\(cpu: .*; reference: .*\)"):
        select("auto", [1.0, 2.0])


def test_numpy_calls_import_neither_torch_nor_triton():
    """The NumPy API chooses among the backends that run NumPy arrays only."""
    code = (
        "import sys, numpy as np, batchnorm as bn\n"
        "x = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)\n"
        "y, s = bn.forward_training(x, None, None)\n"
        "bn.backward(np.ones_like(x), x, None, s)\n"
        "bn.forward_inference(x, None, None, s.mean, s.invstd, backend='reference')\n"
        "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_axis_with_a_float_entry_is_refused_after_a_cached_call_too():
    """The layout cache compares keys with ==, under which (0.0, 2) == (0, 2)."""
    x = np.ones((4, 3, 5), np.float32)
    bn.forward_training(x, None, None, axis=(0, 2))  # fills the cache
    with pytest.raises(ValueError, match=r"`axis` entry 0\.0 is out of range"):
        bn.forward_training(x, None, None, axis=(0.0, 2))
    with pytest.raises(ValueError, match="`axis` entry True"):
        bn.forward_training(x, None, None, axis=(True, 2))
    with pytest.raises(ValueError, match="`axis` entry 0.0"):
        bn.forward_training(x, None, None, axis=0.0)
    y, _ = bn.forward_training(x, None, None, axis=(np.int64(0), 2))  # NumPy integers are fine
    assert y.shape == x.shape


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_np_matrix_out_is_refused():
    x = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(TypeError, match=r"`out` is an np.matrix.*np.asarray\(out\)"):
        bn.forward_training(x, None, None, out=np.asmatrix(np.empty((4, 3))))
    out = np.empty((4, 3))
    y, _ = bn.forward_training(np.asmatrix(x), None, None, out=out)  # matrix input: its values
    assert y is out and type(y) is np.ndarray
    with pytest.raises(TypeError, match="`running_mean` is an np.matrix"):
        bn.forward_training(np.ones((4, 2, 3)), None, None, mode="per_activation",
                            running_mean=np.asmatrix(np.zeros((2, 3))))


@pytest.mark.parametrize("name", ["x", "gamma", "running_mean", "out"])
def test_masked_arrays_are_refused(name):
    args = dict(x=X.copy(), gamma=G.copy(), running_mean=np.zeros(3, np.float32),
                out=np.empty_like(X))
    args[name] = np.ma.masked_array(args[name], mask=np.zeros(args[name].shape, bool))
    with pytest.raises(TypeError, match=f"`{name}` is a masked array"):
        bn.forward_training(args["x"], args["gamma"], None, running_mean=args["running_mean"],
                            running_var=np.ones(3, np.float32), out=args["out"])


@pytest.mark.parametrize("alias", ["x", "gamma", "running_var"])
def test_running_statistics_sharing_memory_with_an_input_are_refused(alias):
    x = np.random.default_rng(0).normal(size=(4, 3))
    gamma = np.ones(3)
    running_var = np.ones(3)
    view = {"x": x[0], "gamma": gamma, "running_var": running_var[:]}[alias]
    before = x.copy(), gamma.copy()
    with pytest.raises(ValueError, match=f"`running_mean` shares memory with `{alias}`"):
        bn.forward_training(x, gamma, None, running_mean=view, running_var=running_var)
    assert np.array_equal(x, before[0]) and np.array_equal(gamma, before[1])


def test_interleaved_running_statistics_in_one_buffer_are_fine():
    buf = np.zeros(6)
    buf[1::2] = 1.0
    x = np.random.default_rng(0).normal(size=(4, 3))
    bn.forward_training(x, None, None, running_mean=buf[0::2], running_var=buf[1::2],
                        momentum=1.0)
    assert np.allclose(buf[0::2], x.mean(0)) and np.allclose(buf[1::2], x.var(0, ddof=1))
