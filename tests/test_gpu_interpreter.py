"""The gpu backend's Triton kernels against the reference, run on CPU through the interpreter.

``TRITON_INTERPRET=1`` makes Triton execute kernels in Python on CPU tensors; the launchers
accept CPU tensors in that mode. The interpreter runs programs one after another, so shapes
are small; the split path is forced with tiny tiles so that it still has many programs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from batchnorm import reference as ref  # noqa: E402
from batchnorm._shapes import resolve_layout  # noqa: E402
from batchnorm.backends import gpu, select  # noqa: E402
from conftest import assert_close, tolerance  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

STAT_TOL = tolerance(torch.float32)   # statistics are float32 throughout

# name -> (shape, make-x-from-contiguous, resolve_layout kwargs)
LAYOUTS = {
    "nchw": ((5, 3, 4, 6), None, dict(mode="spatial", channel_axis=1)),
    "nchw_channels_last": ((5, 3, 4, 6), "channels_last", dict(mode="spatial", channel_axis=1)),
    "nhwc": ((5, 4, 6, 3), None, dict(mode="spatial", channel_axis=-1)),
    "per_activation": ((6, 3, 4), None, dict(mode="per_activation", channel_axis=1)),
    "ncl_prime": ((3, 2, 37), None, dict(mode="spatial", channel_axis=1)),
    "nc_2d": ((9, 7), None, dict(mode="spatial", channel_axis=1)),
    "axis_not_adjacent": ((4, 3, 5, 2), None, dict(axis=(0, 2))),
    "sliced": ((5, 3, 4, 12), "sliced", dict(mode="spatial", channel_axis=1)),
    "hw_transposed": ((5, 3, 6, 4), "hw_transposed", dict(mode="spatial", channel_axis=1)),
}


@pytest.fixture(params=["persistent", "split"])
def path(request, monkeypatch):
    """Run each test once on the persistent kernels and once on the split kernels."""
    if request.param == "split":
        monkeypatch.setattr(gpu, "PERSISTENT_MAX_ELEMS", 0)
        monkeypatch.setattr(gpu, "PERSISTENT_MAX_ELEMS_CL", 0)
        monkeypatch.setattr(gpu, "TILE_ELEMS", 16)  # many tiles even on tiny inputs
        monkeypatch.setattr(gpu, "CL_BLOCK_C", 4)
        monkeypatch.setattr(gpu, "PROGRAMS_PER_SM", 3)
        monkeypatch.setattr(gpu, "FINALIZE_BLOCK_S", 2)  # several merge steps
        monkeypatch.setattr(gpu, "FINALIZE_BLOCK_C", 2)  # several finalize programs
    return request.param


def make_x(name, dtype, seed=0, loc=3.0):
    shape, kind, kwargs = LAYOUTS[name]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + loc).to(dtype)
    if kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif kind == "sliced":
        x = x[..., ::2]  # non-contiguous but viewable: B-stride 2
    elif kind == "hw_transposed":
        x = x.transpose(2, 3)  # H and W cannot merge into one axis: the launcher copies
    x = x.to(DEVICE)
    return x, resolve_layout(tuple(x.shape), **kwargs)


def params(layout, seed=1):
    gen = torch.Generator().manual_seed(seed)
    p = layout.param_shape
    return (torch.randn(p, generator=gen).to(DEVICE),
            torch.randn(p, generator=gen).to(DEVICE))


def npy(t):
    return None if t is None else t.detach().cpu().numpy()


def close(got, want, tol, what):
    assert_close(got, want, atol=tol[0], rtol=tol[1], name=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_training_and_inference(name, dtype, path):
    x, layout = make_x(name, dtype)
    gamma, beta = params(layout)
    rm = torch.linspace(-1, 1, layout.channels).reshape(layout.param_shape).to(DEVICE)
    rv = torch.linspace(0.5, 2, layout.channels).reshape(layout.param_shape).to(DEVICE)
    rm_ref, rv_ref = npy(rm).copy(), npy(rv).copy()
    x_before = x.clone()

    y, mean, invstd, bad = gpu.forward_training(
        x, gamma, beta, layout, eps=1e-5, momentum=0.3, running_mean=rm, running_var=rv,
        check_finite=True)
    y_r, mean_r, invstd_r, _ = ref.forward_training(
        npy(x), npy(gamma), npy(beta), layout, eps=1e-5, momentum=0.3, running_mean=rm_ref,
        running_var=rv_ref)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == torch.float32 and invstd.dtype == torch.float32
    close(y, y_r, tolerance(dtype), "y")
    close(mean, mean_r, STAT_TOL, "mean")
    close(invstd, invstd_r, STAT_TOL, "invstd")
    close(rm, rm_ref, STAT_TOL, "running_mean")
    close(rv, rv_ref, STAT_TOL, "running_var")
    assert not bad.any()
    assert torch.equal(x, x_before)

    y_i = gpu.forward_inference(x, gamma, beta, rm, rv, layout, eps=1e-3)
    close(y_i, ref.forward_inference(npy(x), npy(gamma), npy(beta), npy(rm), npy(rv), layout,
                                     eps=1e-3), tolerance(dtype), "inference y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backward(name, dtype, path):
    x, layout = make_x(name, dtype)
    dy, _ = make_x(name, dtype, seed=5, loc=0.0)
    gamma, _ = params(layout)
    _, mean, invstd, _ = gpu.forward_training(x, gamma, None, layout, eps=1e-5)
    for training in (True, False):
        dx, dgamma, dbeta = gpu.backward(dy, x, gamma, mean, invstd, layout, training=training)
        dx_r, dgamma_r, dbeta_r = ref.backward(npy(dy), npy(x), npy(gamma), npy(mean),
                                               npy(invstd), layout, training=training)
        assert dx.dtype == dtype and dx.shape == x.shape
        close(dx, dx_r, tolerance(dtype), f"dx (training={training})")
        close(dgamma, dgamma_r, (1e-4, 1e-4), "dgamma")
        close(dbeta, dbeta_r, (1e-4, 1e-4), "dbeta")


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_no_affine_and_out(name, path):
    x, layout = make_x(name, torch.float32)
    out = torch.full_like(x, 7.0)
    y, mean, invstd, bad = gpu.forward_training(x, None, None, layout, eps=1e-5, out=out)
    assert y is out and bad is None
    want = ref.forward_training(npy(x), None, None, layout, eps=1e-5)[0]
    close(y, want, tolerance(torch.float32), "y")
    dy = torch.ones_like(x)
    dx_out = torch.empty_like(x)
    dx, dgamma, dbeta = gpu.backward(dy, x, None, mean, invstd, layout, out=dx_out)
    assert dx is dx_out and dgamma is None
    dx_r, _, dbeta_r = ref.backward(npy(dy), npy(x), None, npy(mean), npy(invstd), layout)
    close(dx, dx_r, tolerance(torch.float32), "dx")
    close(dbeta, dbeta_r, (1e-5, 1e-5), "dbeta")


def test_out_not_viewable(path):
    """An ``out`` that cannot be viewed as (A, C, B) is filled through a buffer."""
    x, layout = make_x("nchw", torch.float32)
    out = torch.zeros(5, 3, 6, 4, device=DEVICE).transpose(2, 3)
    y, *_ = gpu.forward_training(x, None, None, layout, eps=1e-5, out=out)
    assert y is out
    want = ref.forward_training(npy(x), None, None, layout, eps=1e-5)[0]
    close(out, want, tolerance(torch.float32), "y")


def test_zero_size(path):
    x = torch.empty((0, 3, 4), device=DEVICE)
    layout = resolve_layout(x.shape)
    gamma, beta = params(layout)
    rm, rv = torch.ones(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y, mean, invstd, bad = gpu.forward_training(x, gamma, beta, layout, eps=1e-5,
                                                running_mean=rm, running_var=rv,
                                                check_finite=True)
    assert y.shape == x.shape
    assert torch.all(mean == 0) and torch.all(invstd == 0) and not bad.any()
    assert torch.all(rm == 1) and torch.all(rv == 1)
    assert gpu.forward_inference(x, gamma, beta, rm, rv, layout, eps=1e-5).shape == x.shape
    dx, dgamma, dbeta = gpu.backward(x, x, gamma, mean, invstd, layout)
    assert dx.shape == x.shape and torch.all(dgamma == 0) and torch.all(dbeta == 0)


def test_constant_channel_eps_zero(path):
    x, layout = make_x("nchw", torch.float32)
    x[:, 1] = 1.5
    gamma, beta = params(layout)
    y, mean, invstd, bad = gpu.forward_training(x, gamma, beta, layout, eps=0.0,
                                                check_finite=True)
    assert invstd[1] == 0 and mean[1] == 1.5 and not bad.any()
    assert torch.all(y[:, 1] == beta[1])
    y_r, mean_r, invstd_r, _ = ref.forward_training(npy(x), npy(gamma), npy(beta), layout,
                                                    eps=0.0)
    close(y, y_r, tolerance(torch.float32), "y")
    dy, _ = make_x("nchw", torch.float32, seed=3)
    dx, _, _ = gpu.backward(dy, x, gamma, mean, invstd, layout)
    assert torch.all(dx[:, 1] == 0)


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_nan_channel_is_flagged_and_contained(name, path):
    x, layout = make_x(name, torch.float32)
    chan = (slice(None), 2) if name == "nchw" else (..., 2)
    x[chan] = x[chan].clone()
    flat = x[chan].reshape(-1)
    flat[3] = float("nan")
    x[chan] = flat.reshape(x[chan].shape)
    y, mean, invstd, bad = gpu.forward_training(x, None, None, layout, eps=1e-5,
                                                check_finite=True)
    assert bad.tolist() == [False, False, True]
    assert torch.isnan(mean[2])
    y_r, mean_r, _, _ = ref.forward_training(npy(x), None, None, layout, eps=1e-5)
    keep = (slice(None), slice(0, 2)) if name == "nchw" else (..., slice(0, 2))
    close(y[keep], y_r[keep], tolerance(torch.float32), "y of the finite channels")
    assert torch.isnan(y[chan]).all()


def test_fp16_overflow_is_reported(path):
    """A float16 output that overflows is flagged, not silently Inf."""
    x, layout = make_x("nchw", torch.float16)
    gamma = torch.tensor([1.0, 1e6, 1.0], device=DEVICE)
    _, _, _, bad = gpu.forward_training(x, gamma, None, layout, eps=1e-5, check_finite=True)
    assert bad.tolist() == [False, True, False]


def test_deterministic(path):
    x, layout = make_x("ncl_prime", torch.float32)
    dy, _ = make_x("ncl_prime", torch.float32, seed=9)
    first = gpu.forward_training(x, None, None, layout, eps=1e-5)
    second = gpu.forward_training(x, None, None, layout, eps=1e-5)
    for a, b in zip(first[:3], second[:3], strict=True):
        assert torch.equal(a, b)
    g1 = gpu.backward(dy, x, None, first[1], first[2], layout)
    g2 = gpu.backward(dy, x, None, first[1], first[2], layout)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[2], g2[2])


def test_large_offset_is_cancellation_free(path):
    """Mean 1e4, std 1: a sum of squares would lose every digit in float32."""
    x, layout = make_x("ncl_prime", torch.float32, loc=1e4)
    _, mean, invstd, _ = gpu.forward_training(x, None, None, layout, eps=0.0)
    _, mean_r, invstd_r, _ = ref.forward_training(npy(x), None, None, layout, eps=0.0)
    close(invstd, invstd_r, (1e-4, 1e-4), "invstd")


def test_unavailable_reason():
    assert gpu.unavailable_reason(np.zeros((2, 3), np.float32)) == (
        "the gpu backend works on CUDA torch tensors; use batchnorm.torch")
    assert "CUDA" in gpu.unavailable_reason(torch.zeros(2, 3))
    assert "float64" in gpu.unavailable_reason(torch.zeros(2, 3, dtype=torch.float64))
    assert select("auto", np.zeros((2, 3), np.float32)).NAME != "gpu"


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_bfloat16(name, path):
    """bfloat16 is only loaded and stored (math is float32), which the interpreter supports."""
    x, layout = make_x(name, torch.bfloat16)
    dy, _ = make_x(name, torch.bfloat16, seed=5, loc=0.0)
    gamma, beta = params(layout)
    x32, dy32 = npy(x.float()), npy(dy.float())
    y, mean, invstd, _ = gpu.forward_training(x, gamma, beta, layout, eps=1e-5)
    y_r, mean_r, invstd_r, _ = ref.forward_training(x32, npy(gamma), npy(beta), layout, eps=1e-5)
    assert y.dtype == torch.bfloat16
    close(y.float(), y_r, tolerance(torch.bfloat16), "y")
    close(mean, mean_r, STAT_TOL, "mean")
    close(invstd, invstd_r, STAT_TOL, "invstd")
    dx, dgamma, dbeta = gpu.backward(dy, x, gamma, mean, invstd, layout)
    dx_r, dgamma_r, dbeta_r = ref.backward(dy32, x32, npy(gamma), npy(mean), npy(invstd), layout)
    close(dx.float(), dx_r, tolerance(torch.bfloat16), "dx")
    close(dgamma, dgamma_r, (1e-4, 1e-4), "dgamma")
    close(dbeta, dbeta_r, (1e-4, 1e-4), "dbeta")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_path_fixture_reaches_its_algorithm(name, path):
    """The split fixture really drives the split kernels (and the default the persistent
    ones) on every layout above, as the launch plan reports."""
    x, layout = make_x(name, torch.float32)
    for pass_ in ("forward", "backward"):
        assert gpu.launch_plan(pass_, x, layout).algorithm == path


@pytest.mark.parametrize("given", ["mean", "var"])
def test_each_running_statistic_is_updated_on_its_own(given, path):
    """running_var without running_mean (and the reverse) is updated, as the reference does."""
    x, layout = make_x("nchw", torch.float32)
    start = torch.linspace(0.5, 2, layout.channels).to(DEVICE)
    rm = start.clone() if given == "mean" else None
    rv = start.clone() if given == "var" else None
    want_m, want_v = npy(rm), npy(rv)
    want_m, want_v = (None if a is None else a.copy() for a in (want_m, want_v))
    gpu.forward_training(x, None, None, layout, eps=1e-5, momentum=0.4, running_mean=rm,
                         running_var=rv)
    ref.forward_training(npy(x), None, None, layout, eps=1e-5, momentum=0.4,
                         running_mean=want_m, running_var=want_v)
    got, want = (rm, want_m) if given == "mean" else (rv, want_v)
    assert not torch.equal(got, start)
    close(got, want, STAT_TOL, f"running_{given}")


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_flagged_call_leaves_running_statistics_as_they_were(name, path):
    """check_finite: a call that reports a non-finite channel changes no running statistic
    (the caller refuses it); a clean call updates them. Non-contiguous statistics too."""
    x, layout = make_x(name, torch.float32)
    rm = torch.linspace(-1, 1, 2 * layout.channels).to(DEVICE)[::2]  # not contiguous
    rv = torch.linspace(0.5, 2, layout.channels).to(DEVICE)
    rm0, rv0 = rm.clone(), rv.clone()
    _, _, _, bad = gpu.forward_training(x, None, None, layout, eps=1e-5, running_mean=rm,
                                        running_var=rv, check_finite=True)
    assert not bad.any() and not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    want_m, want_v = npy(rm0).copy(), npy(rv0).copy()
    ref.forward_training(npy(x), None, None, layout, eps=1e-5, running_mean=want_m,
                         running_var=want_v)
    close(rm, want_m, STAT_TOL, "running_mean")
    close(rv, want_v, STAT_TOL, "running_var")

    chan = (slice(None), 1) if name == "nchw" else (..., 1)
    x[chan] = float("inf")
    rm1, rv1 = rm.clone(), rv.clone()
    _, _, _, bad = gpu.forward_training(x, None, None, layout, eps=1e-5, running_mean=rm,
                                        running_var=rv, check_finite=True)
    assert bad.tolist() == [False, True, False]
    assert torch.equal(rm, rm1) and torch.equal(rv, rv1)


def test_spatial_persistent_is_spatial(path):
    """The mode picks no algorithm on the GPU (contract §2): same plan, identical results."""
    x, _ = make_x("nchw", torch.float32)
    dy, _ = make_x("nchw", torch.float32, seed=4)
    runs = []
    for mode in ("spatial", "spatial_persistent"):
        layout = resolve_layout(tuple(x.shape), mode=mode)
        plans = [gpu.launch_plan(p, x, layout) for p in gpu.PASSES]
        y, mean, invstd, _ = gpu.forward_training(x, None, None, layout, eps=1e-5)
        grads = gpu.backward(dy, x, None, mean, invstd, layout)
        runs.append((plans, [y, mean, invstd, grads[0], grads[2]]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


_HUGE_STRIDE_SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np, torch
from batchnorm import reference as ref
from batchnorm._shapes import resolve_layout
from batchnorm.backends import gpu
if sys.argv[1] == "split":
    gpu.PERSISTENT_MAX_ELEMS = 0
sxc = 2**30 + 64  # channel 2 starts 2**31 + 128 elements in: c * sxc passes 2**31
try:
    base = torch.empty(2 * sxc + 128, dtype=torch.float16)  # reserved: few pages are touched
except RuntimeError as exc:
    print("NOMEM", exc)
    sys.exit(0)
x = base.as_strided((2, 3, 32), (64, sxc, 1))  # 32-long runs: one channel per program
x.copy_(torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0)) * 2 + 1)
layout = resolve_layout(tuple(x.shape))
plan = gpu.launch_plan("forward", x, layout)
assert plan.i64 == 1 and plan.blocks[1] == 1 and plan.algorithm == sys.argv[1], plan
y, mean, invstd, _ = gpu.forward_training(x, None, None, layout, eps=1e-5)
dx, _, dbeta = gpu.backward(x, x, None, mean, invstd, layout)
x64 = x.double().numpy()
y_r, mean_r, invstd_r, _ = ref.forward_training(x64, None, None, layout, eps=1e-5)
dx_r, _, dbeta_r = ref.backward(x64, x64, None, mean_r, invstd_r, layout)
for got, want, tol in ((y, y_r, 4e-3), (mean, mean_r, 1e-4), (dx, dx_r, 4e-3),
                      (dbeta, dbeta_r, 1e-4)):
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)
print("OK")
"""


@pytest.mark.parametrize("algorithm", ["persistent", "split"])
def test_channel_offsets_past_2_31_elements(algorithm, tmp_path):
    """An NCHW view whose channel offset ``c * sxc`` passes 2**31 elements (a few elements
    spread over a 4 GiB buffer that is reserved, not touched). Run in a subprocess: a 32-bit
    channel offset reads far outside the buffer and can crash the interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "huge_stride.py"
    script.write_text(_HUGE_STRIDE_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent / "src"),
                      env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, str(script), algorithm], capture_output=True,
                       text=True, env=env, timeout=600)
    if r.stdout.startswith("NOMEM"):
        pytest.skip(f"cannot reserve 4 GiB of address space here: {r.stdout.strip()}")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), \
        f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.fixture
def torch_layer_on_gpu_backend(monkeypatch):
    """batchnorm.torch routing its calls to the gpu backend, as it does CUDA tensors (under
    the interpreter the tensors are CPU ones, which it would otherwise send to the CPU)."""
    from batchnorm.torch import _ops

    monkeypatch.setattr(_ops, "_PLANS", {})
    monkeypatch.setattr(_ops, "_needs_host", lambda x: False)
    monkeypatch.setattr(_ops, "select", lambda name, x: gpu)


@pytest.mark.usefixtures("torch_layer_on_gpu_backend")
def test_check_finite_through_batchnorm_torch():
    from batchnorm.torch import _ops, batch_norm

    x, layout = make_x("nchw_channels_last", torch.float32)
    gamma, beta = params(layout)
    assert _ops.plan(x, "spatial", "training", gamma, beta, None, None).backend is gpu
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = batch_norm(x, rm, rv, gamma, beta, True, 0.3, 1e-5, check_finite=True)
    rm_r, rv_r = np.zeros(3, np.float32), np.ones(3, np.float32)
    y_r = ref.forward_training(npy(x), npy(gamma), npy(beta), layout, eps=1e-5, momentum=0.3,
                               running_mean=rm_r, running_var=rv_r)[0]
    close(y, y_r, tolerance(torch.float32), "y")
    close(rm, rm_r, STAT_TOL, "running_mean")
    bad = x.clone()
    bad[1, 2, 0, 0] = float("nan")
    before = rm.clone(), rv.clone()
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        batch_norm(bad, rm, rv, gamma, beta, True, 0.3, 1e-5, check_finite=True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 2$"):
        batch_norm(bad, rm, rv, gamma, beta, False, 0.3, 1e-5, check_finite=True)
