"""The reference against two independent oracles: finite differences and PyTorch autograd."""

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.cli import verify
from conftest import assert_close

CASES = verify.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_gradients_match_finite_differences(case):
    errors = verify.fd_errors(case, seed=1)
    assert set(errors) == ({"dx", "dgamma", "dbeta"} if case.affine else {"dx"})
    for name, err in errors.items():
        assert err < verify.FD_TOLERANCE, f"{case.label()} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_matches_torch_autograd(case, momentum):
    pytest.importorskip("torch")
    errors = verify.torch_errors(case, seed=2, momentum=momentum)
    for name, err in errors.items():
        assert err < verify.TORCH_TOLERANCE, f"{case.label()} {name}: relative error {err:.2e}"


def test_numerical_gradient_detects_a_wrong_formula():
    # Guard against an oracle that cannot fail: a gradient with a flipped sign is caught.
    case = verify.Case("nchw", 4, True)
    inp = verify.make_inputs(case)
    dx, _, _ = verify._analytic(case, inp)

    def loss():
        return float(np.sum(verify._forward(case, inp) * inp["dy"]))

    num = verify.numerical_gradient(loss, inp["x"])
    assert verify._rel_err(dx, num) < verify.FD_TOLERANCE
    assert verify._rel_err(-dx, num) > 1e-2


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cumulative_running_average_matches_torch_momentum_none(layout):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    shape = (4, 3, 5, 2)
    channel_axis = 1
    module = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(1, 6):
        x = rng.normal(step, 1.0 + step, shape)
        module(torch.from_numpy(x))
        xs = np.moveaxis(x, 1, -1) if layout == "nhwc" else x
        ca = -1 if layout == "nhwc" else channel_axis
        # PyTorch's momentum=None is the cumulative average: momentum 1/num_batches
        bn.forward_training(xs, None, None, channel_axis=ca, running_mean=rm, running_var=rv,
                            momentum=1.0 / step, backend="reference")
    assert_close(rm, module.running_mean.numpy(), atol=1e-12, rtol=1e-12, name="running_mean")
    assert_close(rv, module.running_var.numpy(), atol=1e-12, rtol=1e-12, name="running_var")


def test_float32_input_keeps_float32_statistics_and_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.normal(3.0, 2.0, (8, 4, 6, 6)).astype(np.float32)
    g, b = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    y, saved = bn.forward_training(x, g, b, backend="reference")
    assert y.dtype == np.float32
    assert saved.mean.dtype == saved.invstd.dtype == np.float32
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(g),
                                        torch.from_numpy(b), training=True)
    assert_close(y, yt.numpy(), np.float32, name="y")
