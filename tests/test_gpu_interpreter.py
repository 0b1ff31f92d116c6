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
from batchnorm._shapes import Epilogue, resolve_layout  # noqa: E402
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


# ----------------------------------------------------------------------------- fused forms

# name -> (Epilogue or None, with a residual): every forward form of contract §8
FORMS = {
    "relu": (Epilogue("relu", 0.0), False),
    "leaky_relu": (Epilogue("leaky_relu", 0.2), False),
    "add": (None, True),
    "add_relu": (Epilogue("relu", 0.0), True),
    "add_leaky_relu": (Epilogue("leaky_relu", 0.05), True),
}
# (layout, dtype) pairs: every layout and both dtypes, not every product (the interpreter is
# slow; the plain kernels' grid above covers the product)
FUSED_CASES = [("nchw", torch.float32), ("nchw", torch.float16), ("nhwc", torch.float32),
               ("nchw_channels_last", torch.float16), ("per_activation", torch.float32),
               ("axis_not_adjacent", torch.float16)]
FUSED_IDS = [f"{n}-{str(d)[6:]}" for n, d in FUSED_CASES]


def make_z(x, seed=7):
    """A residual like x (values of both signs, so the activation cuts some outputs)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(x.shape, generator=gen) * 2).to(x.dtype).to(DEVICE)


@pytest.mark.parametrize(("name", "dtype"), FUSED_CASES, ids=FUSED_IDS)
def test_fused_forward_against_the_reference(name, dtype, path):
    """y = act(bn(x) + z) in training (every form) and inference (two), against the
    reference's fused forms; the residual and x are left as they were."""
    x, layout = make_x(name, dtype)
    gamma, beta = params(layout)
    z = make_z(x)
    before = x.clone(), z.clone()
    var = torch.linspace(0.5, 2, layout.channels).reshape(layout.param_shape).to(DEVICE)
    for form, (epilogue, with_z) in FORMS.items():
        res = z if with_z else None
        y, mean, invstd, bad = gpu.forward_training(x, gamma, beta, layout, eps=1e-5,
                                                    residual=res, epilogue=epilogue,
                                                    check_finite=True)
        y_r, mean_r, invstd_r, _ = ref.forward_training(
            npy(x), npy(gamma), npy(beta), layout, eps=1e-5, residual=npy(res),
            epilogue=epilogue)
        assert y.dtype == dtype and not bad.any()
        close(y, y_r, tolerance(dtype), f"{form} y")
        close(invstd, invstd_r, STAT_TOL, f"{form} invstd")
        if epilogue is not None:
            assert (y_r < 0).any() or epilogue.activation == "relu"  # the form is exercised
            assert (y_r == 0).any() or epilogue.activation != "relu"
        if form not in ("leaky_relu", "add_relu"):
            continue
        y_i = gpu.forward_inference(x, gamma, beta, mean, var, layout, eps=1e-3, residual=res,
                                    epilogue=epilogue)
        y_ir = ref.forward_inference(npy(x), npy(gamma), npy(beta), npy(mean), npy(var),
                                     layout, eps=1e-3, residual=npy(res), epilogue=epilogue)
        close(y_i, y_ir, tolerance(dtype), f"{form} inference y")
    assert torch.equal(x, before[0]) and torch.equal(z, before[1])


def test_residual_with_other_strides_than_x(path):
    """The residual is streamed with its own strides: NCHW z added to a channels-last x,
    and a z that has no (A, C, B) view (copied)."""
    x, layout = make_x("nchw_channels_last", torch.float32)
    gamma, beta = params(layout)
    for z in (make_z(x).contiguous(), make_z(x).transpose(2, 3).contiguous().transpose(2, 3)):
        y, *_ = gpu.forward_training(x, gamma, beta, layout, eps=1e-5, residual=z,
                                     epilogue=FORMS["add_relu"][0])
        want = ref.forward_training(npy(x), npy(gamma), npy(beta), layout, eps=1e-5,
                                    residual=npy(z), epilogue=FORMS["add_relu"][0])[0]
        close(y, want, tolerance(torch.float32), "y")


# name -> (Epilogue or None, residual, x kept): every backward form; without x the input
# is recovered from y (the memory-saving mode: invertible activations, no residual)
BACKWARD_FORMS = {
    "relu": (Epilogue("relu", 0.0), False, True),
    "leaky_relu": (Epilogue("leaky_relu", 0.2), False, True),
    "add": (None, True, True),
    "add_relu": (Epilogue("relu", 0.0), True, True),
    "identity_from_y": (None, False, False),
    "leaky_relu_from_y": (Epilogue("leaky_relu", 0.1), False, False),
}


@pytest.mark.parametrize(("name", "dtype"), FUSED_CASES, ids=FUSED_IDS)
def test_fused_backward_against_the_reference(name, dtype, path):
    """dx, dgamma, dbeta and dz of every backward form in training (two in inference, where
    the partial-sums kernel writes dx and dz), against the reference given the same forward
    output and statistics."""
    x, layout = make_x(name, dtype)
    dy, _ = make_x(name, dtype, seed=5, loc=0.0)
    gamma, beta = params(layout)
    z = make_z(x)
    for form, (epilogue, with_z, keep_x) in BACKWARD_FORMS.items():
        res = z if with_z else None
        # the forward's output and statistics, from the reference (the gpu forward is
        # tested above): y in x's dtype, mean and invstd in float32, as saved
        y, mean, invstd, _ = ref.forward_training(npy(x), npy(gamma), npy(beta), layout,
                                                  eps=1e-5, residual=npy(res),
                                                  epilogue=epilogue)
        y = torch.from_numpy(y).to(DEVICE)
        mean, invstd = (torch.from_numpy(a).float().to(DEVICE) for a in (mean, invstd))
        xin = x if keep_x else None
        for training in (True, False) if form in ("add_relu", "leaky_relu_from_y") else (True,):
            got = gpu.backward(dy, xin, gamma, mean, invstd, layout, training=training, y=y,
                               beta=beta, epilogue=epilogue, residual=with_z)
            want = ref.backward(npy(dy), npy(xin), npy(gamma), npy(mean), npy(invstd), layout,
                                training=training, y=npy(y), beta=npy(beta),
                                epilogue=epilogue, residual=with_z)
            assert len(got) == len(want) == 3 + with_z
            what = f"{form} training={training}"
            close(got[0], want[0], tolerance(dtype), f"{what} dx")
            close(got[1], want[1], (1e-4, 1e-4), f"{what} dgamma")
            close(got[2], want[2], (1e-4, 1e-4), f"{what} dbeta")
            if with_z:
                assert got[3].dtype == dtype
                close(got[3], want[3], tolerance(dtype), f"{what} dz")


def test_backward_outputs_and_empty_input(path):
    """dx and dz land in the given tensors (one through a buffer); a zero-size call returns
    empty gradients, dz included."""
    x, layout = make_x("nchw", torch.float32)
    dy, _ = make_x("nchw", torch.float32, seed=5, loc=0.0)
    epilogue = FORMS["add_relu"][0]
    y, mean, invstd, _ = gpu.forward_training(x, None, None, layout, eps=1e-5,
                                              residual=make_z(x), epilogue=epilogue)
    out = torch.empty_like(x)
    out_dz = torch.zeros(5, 3, 6, 4, device=DEVICE).transpose(2, 3)  # no (A, C, B) view
    dx, dgamma, dbeta, dz = gpu.backward(dy, x, None, mean, invstd, layout, y=y,
                                         epilogue=epilogue, residual=True, out=out,
                                         out_dz=out_dz)
    assert dx is out and dz is out_dz and dgamma is None
    want = ref.backward(npy(dy), npy(x), None, npy(mean), npy(invstd), layout, y=npy(y),
                        epilogue=epilogue, residual=True)
    close(dx, want[0], tolerance(torch.float32), "dx")
    close(dz, want[3], tolerance(torch.float32), "dz")

    e = torch.empty((0, 3, 4), device=DEVICE)
    el = resolve_layout(e.shape)
    stat = torch.zeros(3, device=DEVICE)
    dx, dgamma, dbeta, dz = gpu.backward(e, e, stat, stat, stat, el, y=e, epilogue=epilogue,
                                         residual=True)
    assert dx.shape == dz.shape == e.shape and torch.all(dbeta == 0)
    assert gpu.forward_training(e, None, None, el, eps=1e-5, residual=e,
                                epilogue=epilogue)[0].shape == e.shape


@pytest.mark.parametrize(("form", "name"), [("identity", "nchw"), ("leaky_relu", "nhwc"),
                                           ("leaky_relu", "axis_not_adjacent")])
def test_in_place_is_out_of_place(form, name, path):
    """The memory-saving mode: ``out=x`` writes the very bits the out-of-place call returns
    (training, with the running statistics, and inference), and backward from that y
    (x=None) agrees with backward from x."""
    epilogue = None if form == "identity" else Epilogue("leaky_relu", 0.1)
    x, layout = make_x(name, torch.float32)
    dy, _ = make_x(name, torch.float32, seed=5, loc=0.0)
    gamma, beta = params(layout)
    rm, rv = torch.zeros(layout.param_shape), torch.ones(layout.param_shape)
    rm_in, rv_in = rm.clone(), rv.clone()
    y, mean, invstd, _ = gpu.forward_training(x, gamma, beta, layout, eps=1e-5,
                                              running_mean=rm, running_var=rv,
                                              epilogue=epilogue)
    x_in = x.clone()
    y_in, mean_in, invstd_in, _ = gpu.forward_training(
        x_in, gamma, beta, layout, eps=1e-5, running_mean=rm_in, running_var=rv_in,
        epilogue=epilogue, out=x_in)
    assert y_in is x_in
    for a, b in ((y, y_in), (mean, mean_in), (invstd, invstd_in), (rm, rm_in), (rv, rv_in)):
        assert torch.equal(a, b)
    x_inf = x.clone()
    y_i = gpu.forward_inference(x, gamma, beta, rm, rv, layout, eps=1e-3, epilogue=epilogue)
    assert gpu.forward_inference(x_inf, gamma, beta, rm, rv, layout, eps=1e-3,
                                 epilogue=epilogue, out=x_inf) is x_inf
    assert torch.equal(x_inf, y_i)

    from_x = gpu.backward(dy, x, gamma, mean, invstd, layout, y=y, epilogue=epilogue)
    from_y = gpu.backward(dy, None, gamma, mean, invstd, layout, y=y_in, beta=beta,
                          epilogue=epilogue)
    for what, a, b in zip(("dx", "dgamma", "dbeta"), from_x, from_y, strict=True):
        close(a, b, (1e-4, 1e-4), what)


# ----------------------------------------------------------------------------- phases


def test_gpu_module_matches_the_backend_protocol():
    """Every function of protocol.Backend exists in the gpu module with the same parameter
    names, kinds and defaults (callers pass them by keyword)."""
    import inspect

    from batchnorm.backends import protocol

    assert isinstance(gpu, protocol.Backend) and gpu.NAME == "gpu"
    names = [n for n, f in vars(protocol.Backend).items()
             if inspect.isfunction(f) and not n.startswith("_")]
    assert {"moments", "apply", "grad_sums", "grad_apply", "forward_training",
            "forward_inference", "backward", "unavailable_reason"} <= set(names)
    for n in names:
        want = list(inspect.signature(getattr(protocol.Backend, n)).parameters.values())[1:]
        got = list(inspect.signature(getattr(gpu, n)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got] == \
            [(p.name, p.kind, p.default) for p in want], n


@pytest.mark.parametrize("name", ["nchw", "nhwc", "per_activation"])
def test_phases_against_the_reference(name, path):
    """Each phase alone, with every epilogue argument, against the reference's phase."""
    x, layout = make_x(name, torch.float16)
    dy, _ = make_x(name, torch.float16, seed=5, loc=0.0)
    gamma, beta = params(layout)
    count, mean, m2 = gpu.moments(x, layout)
    count_r, mean_r, m2_r = ref.moments(npy(x), layout)
    assert count == count_r and mean.dtype == m2.dtype == torch.float64
    close(mean, mean_r, STAT_TOL, "mean")
    close(m2, m2_r, STAT_TOL, "m2")
    invstd = 1.0 / torch.sqrt(m2 / count + 1e-5)  # float64, as a merged statistic is
    z = make_z(x)
    epilogue = Epilogue("leaky_relu", 0.2)
    y = gpu.apply(x, mean, invstd, gamma, beta, layout, residual=z, epilogue=epilogue)
    y_r = ref.apply(npy(x), npy(mean), npy(invstd), npy(gamma), npy(beta), layout,
                    residual=npy(z), epilogue=epilogue)
    close(y, y_r, tolerance(torch.float16), "apply y")
    for x_in in (x, None):  # x kept, and recovered from y
        kw = dict(y=y, gamma=gamma, beta=beta, epilogue=epilogue)
        sums = gpu.grad_sums(dy, x_in, mean, invstd, layout, **kw)
        sums_r = ref.grad_sums(npy(dy), npy(x_in), npy(mean), npy(invstd), layout,
                               **{k: npy(v) if k != "epilogue" else v for k, v in kw.items()})
        for what, a, b in zip(("sum g", "sum g xhat"), sums, sums_r, strict=True):
            assert a.dtype == torch.float32
            close(a, b, (1e-4, 1e-4), what)
        for training in (True, False):
            dx, dz = gpu.grad_apply(dy, x_in, mean, invstd, gamma, sums, layout, count=count,
                                    training=training, y=y, beta=beta, epilogue=epilogue,
                                    want_dz=True)
            dx_r, dz_r = ref.grad_apply(npy(dy), npy(x_in), npy(mean), npy(invstd),
                                        npy(gamma), sums_r, layout, count=count,
                                        training=training, y=npy(y), beta=npy(beta),
                                        epilogue=epilogue, want_dz=True)
            close(dx, dx_r, tolerance(torch.float16), f"dx training={training}")
            close(dz, dz_r, tolerance(torch.float16), "dz")
        assert gpu.grad_apply(dy, x_in, mean, invstd, gamma, sums, layout,
                              count=count, y=y, beta=beta, epilogue=epilogue)[1] is None


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
@pytest.mark.parametrize("shards", [[4, 4], [5, 1, 3], [4, 0, 2]], ids=str)
def test_shards_merged_by_chan_are_the_whole(shards, name):
    """SyncBatchNorm's route on one process: moments of batch shards (uneven, one empty)
    merged by Chan's formula, apply with the merged statistics, the gradient sums added over
    shards and grad_apply with the global count: the whole batch's forward and backward."""
    from batchnorm.backends.protocol import merge_moments

    n = sum(shards)
    gen = torch.Generator().manual_seed(3)
    shape = (n, 3, 4, 6) if name == "nchw" else (n, 4, 6, 3)
    axis = 1 if name == "nchw" else -1
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(DEVICE)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    z = torch.randn(shape, generator=gen).to(DEVICE)
    layout = resolve_layout(shape, channel_axis=axis)
    gamma, beta = params(layout)
    epilogue = Epilogue("relu", 0.0)
    cuts = np.cumsum([0, *shards])
    parts = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    lay = [resolve_layout(tuple(x[s].shape), channel_axis=axis) for s in parts]

    mom = [gpu.moments(x[s], ly) for s, ly in zip(parts, lay, strict=True)]
    count, mean, m2 = merge_moments(torch.tensor([[float(m[0])] for m in mom],
                                                 dtype=torch.float64),
                                    torch.stack([m[1] for m in mom]),
                                    torch.stack([m[2] for m in mom]))
    assert count == n * layout.count // n * 1 == layout.count
    whole = gpu.moments(x, layout)
    close(mean, whole[1], STAT_TOL, "merged mean")
    close(m2, whole[2], STAT_TOL, "merged m2")
    invstd = 1.0 / torch.sqrt(m2 / count + 1e-5)
    y = torch.cat([gpu.apply(x[s], mean, invstd, gamma, beta, ly, residual=z[s],
                             epilogue=epilogue) for s, ly in zip(parts, lay, strict=True)])
    y_r, mean_r, invstd_r, _ = ref.forward_training(npy(x), npy(gamma), npy(beta), layout,
                                                    eps=1e-5, residual=npy(z),
                                                    epilogue=epilogue)
    close(y, y_r, tolerance(torch.float32), "y")

    kw = dict(y=None, gamma=gamma, beta=beta, epilogue=epilogue)
    local = [gpu.grad_sums(dy[s], x[s], mean, invstd, ly, **{**kw, "y": y[s]})
             for s, ly in zip(parts, lay, strict=True)]
    sums = tuple(sum(p[i] for p in local) for i in range(2))  # the all_reduce
    grads = [gpu.grad_apply(dy[s], x[s], mean, invstd, gamma, sums, ly, count=int(count),
                            y=y[s], beta=beta, epilogue=epilogue, want_dz=True)
             for s, ly in zip(parts, lay, strict=True)]
    dx_r, dgamma_r, dbeta_r, dz_r = ref.backward(npy(dy), npy(x), npy(gamma), mean_r,
                                                 invstd_r, layout, y=npy(y), beta=npy(beta),
                                                 epilogue=epilogue, residual=True)
    close(sums[1], dgamma_r, (1e-4, 1e-4), "dgamma")
    close(sums[0], dbeta_r, (1e-4, 1e-4), "dbeta")
    close(torch.cat([g[0] for g in grads]), dx_r, tolerance(torch.float32), "dx")
    close(torch.cat([g[1] for g in grads]), dz_r, tolerance(torch.float32), "dz")


# ----------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
@pytest.mark.parametrize("spread", [1e20, 1e30])
def test_spread_past_float32_squares(spread, name, path):
    """A channel with standard deviation 1e20 or 1e30: its squares (1e40, 1e60) overflow
    float32, its invstd (1e-20, 1e-30) does not. The answer is right and not flagged; the
    other channels of a channels-last block are untouched; moments' m2 (float64) is right;
    the float32 running variance holds the true value's float32, Inf."""
    x, layout = make_x(name, torch.float32)
    chan = (slice(None), 1) if name == "nchw" else (..., 1)
    x[chan] = x[chan] * spread
    gamma, beta = params(layout)
    rv, rv_r = torch.ones(3), np.ones(3, np.float32)
    y, mean, invstd, bad = gpu.forward_training(x, gamma, beta, layout, eps=1e-5,
                                                running_var=rv, check_finite=True)
    y_r, mean_r, invstd_r, _ = ref.forward_training(npy(x), npy(gamma), npy(beta), layout,
                                                    eps=1e-5, running_var=rv_r)
    assert not bad.any()
    assert 0 < invstd[1] < 1e-19
    close(invstd, invstd_r, STAT_TOL, "invstd")
    close(mean, mean_r, (0, 1e-5), "mean")
    close(y, y_r, tolerance(torch.float32), "y")
    assert torch.isinf(rv[1]) and np.isinf(rv_r[1]) and torch.isfinite(rv[[0, 2]]).all()
    _, m, m2 = gpu.moments(x, layout)
    close(m2, ref.moments(npy(x), layout)[2], STAT_TOL, "moments m2")


def test_sum_past_float32(path):
    """Values near 4e36 in one channel: their sum passes float32's range, their mean does
    not."""
    x, layout = make_x("ncl_prime", torch.float32, loc=4.0)
    x[:, 1] = x[:, 1] * 1e36
    y, mean, invstd, bad = gpu.forward_training(x, None, None, layout, eps=1e-5,
                                                check_finite=True)
    y_r, mean_r, invstd_r, _ = ref.forward_training(npy(x), None, None, layout, eps=1e-5)
    assert not bad.any()
    close(mean, mean_r, STAT_TOL, "mean")
    close(invstd, invstd_r, STAT_TOL, "invstd")
    close(y, y_r, tolerance(torch.float32), "y")


def test_spread_past_float32_itself_is_flagged(path):
    """Values of +-3e38: the standard deviation itself passes float32 (sqrt(M2) overflows),
    so invstd cannot be computed from float32 sums: the channel is reported, never a silent
    invstd of 0."""
    x, layout = make_x("nchw", torch.float32)
    x[:, 2] = torch.where(torch.arange(x[:, 2].numel()).reshape(x[:, 2].shape) % 2 == 0,
                          3e38, -3e38)
    _, _, invstd, bad = gpu.forward_training(x, None, None, layout, eps=1e-5,
                                             check_finite=True)
    assert bad.tolist() == [False, False, True]
