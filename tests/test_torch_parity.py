"""batchnorm.torch against torch.nn on a table of inputs: the same outcome for every row.

Each row builds its arguments twice from one seed, once for ``torch.nn.functional.batch_norm``
(or ``torch.nn.BatchNorm*d``) and once for ours. Either both raise, ours an instance of
torch's exception type and with a message that names the fault, or both return the same
output (shape, dtype, device, values within the dtype's tolerance), leave the same running
statistics and ``num_batches_tracked``, and give the same gradients. The deliberate
differences (contract §7) are tested at the end, each against what torch does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchnorm.torch as bnt
from conftest import tolerance

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def tensors(shape, *, dtype=F32, pdtype=None, affine=True, stats=True, device="cpu",
            channels_last=False, seed=0, c=None):
    """(x, running_mean, running_var, weight, bias) for an input of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    pdtype = pdtype or (F32 if dtype in (F16, BF16) else dtype)
    c = (shape[1] if len(shape) > 1 else 0) if c is None else c
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(c, generator=g, dtype=F64) + 0.5).to(pdtype) if affine else None
    b = torch.randn(c, generator=g, dtype=F64).to(pdtype) if affine else None
    rm = torch.randn(c, generator=g, dtype=F64).to(pdtype) if stats else None
    rv = (torch.rand(c, generator=g, dtype=F64) + 0.5).to(pdtype) if stats else None
    return tuple(None if t is None else t.to(device) for t in (x, rm, rv, w, b))


@dataclass
class Row:
    """One call: ``build()`` gives (args, kwargs) for batch_norm; ``match`` is the regex our
    error message must match when torch raises (None: torch must not raise)."""

    id: str
    build: Callable[[], tuple[tuple, dict]]
    match: str | None = None
    grad: bool = True  # also compare the gradients of x, weight and bias
    no_grad: bool = False  # run under torch.no_grad()


def call(shape=(6, 3, 4), training=True, momentum=0.1, eps=1e-5, *, drop=(), replace=None,
         input=None, **kw):
    """A Row builder: tensors(shape, **kw) with the named tensors dropped or replaced (each
    ``replace`` function takes the tensor and x), and x replaced by ``input(x)``."""

    def build():
        x, rm, rv, w, b = tensors(shape, **kw)
        if input is not None:
            x = input(x)
        named = dict(running_mean=rm, running_var=rv, weight=w, bias=b)
        for name in drop:
            named[name] = None
        for name, fn in (replace or {}).items():
            named[name] = fn(named[name], x)
        return (x, named["running_mean"], named["running_var"]), dict(
            weight=named["weight"], bias=named["bias"], training=training, momentum=momentum,
            eps=eps)

    return build


def row(id, match=None, grad=True, no_grad=False, **kw):
    return Row(id, call(**kw), match, grad, no_grad)


ROWS = [
    # shapes, layouts and modes torch runs
    row("ncl", shape=(6, 3, 4)),
    row("nc", shape=(5, 3)),
    row("nchw", shape=(2, 3, 4, 5)),
    row("nhwc", shape=(2, 3, 4, 5), channels_last=True),
    row("ncdhw", shape=(2, 3, 2, 3, 2)),
    row("rank 6", shape=(2, 3, 2, 1, 2, 2)),
    row("eval", training=False),
    row("eval nhwc", shape=(2, 3, 4, 5), channels_last=True, training=False),
    row("no affine", affine=False),
    row("no running statistics", stats=False),
    row("no affine, no statistics", affine=False, stats=False),
    row("eval batch of one", shape=(1, 3), training=False),
    row("empty batch", shape=(0, 3, 4), grad=False),
    row("empty batch eval", shape=(0, 3), training=False, grad=False),
    row("no channels", shape=(2, 0, 3), affine=False, grad=False),
    row("empty rank 1", shape=(0,), drop=("weight", "bias")),
    row("empty rank 1 with statistics (0,)", shape=(0,), c=0, affine=False),
    row("empty rank 1 eval", shape=(0,), c=0, affine=False, training=False),
    # momentum: torch takes any real number
    row("momentum 0", momentum=0.0),
    row("momentum 1", momentum=1.0),
    row("momentum -0.5", momentum=-0.5),
    row("momentum 1.5", momentum=1.5),
    row("momentum nan", momentum=math.nan),
    row("momentum True", momentum=True),
    row("momentum int", momentum=1),
    row("momentum numpy float32", momentum=np.float32(0.25)),
    row("momentum 0-d tensor", momentum=torch.tensor(0.3)),
    row("momentum None", momentum=None, match="momentum.*real number.*None"),
    row("momentum str", momentum="0.1", match="momentum.*real number.*str"),
    row("momentum 1-d tensor", momentum=torch.tensor([0.1]), match="momentum"),
    row("momentum complex", momentum=1j, match="momentum"),
    # eps: > 0 in training, >= 0 otherwise; NaN and Inf pass
    row("eps 0 training", eps=0.0, match="eps must be positive during training"),
    row("eps 0 eval", eps=0.0, training=False),
    row("eps -1 training", eps=-1.0, match="eps must be positive"),
    row("eps -1 eval", eps=-1.0, training=False, match="eps must be non-negative"),
    row("eps inf", eps=math.inf),
    row("eps nan", eps=math.nan, grad=False),
    row("eps True", eps=True),
    row("eps str", eps="1e-5", match="eps.*real number"),
    row("eps None", eps=None, match="eps.*real number"),
    # training must be a bool
    row("training tensor", training=torch.tensor(True), match="training.*bool.*Tensor"),
    row("training int", training=1, match="training.*bool"),
    row("training numpy bool", training=np.bool_(True), match="training.*bool"),
    # running statistics given one without the other, or missing in eval
    row("mean without var", drop=("running_var",), match="both be None or neither"),
    row("var without mean", drop=("running_mean",), match="both be None or neither"),
    row("eval without statistics", stats=False, training=False,
        match="running_mean must be defined in evaluation mode"),
    row("eval without var", drop=("running_var",), training=False,
        match="running_var must be defined in evaluation mode"),
    # running statistics that require grad
    row("running_mean requires grad", replace={"running_mean": lambda t, x: t.requires_grad_()},
        match="running_mean.*requires grad"),
    row("running_var requires grad eval", training=False,
        replace={"running_var": lambda t, x: t.requires_grad_()},
        match="running_var.*requires grad"),
    row("running_mean requires grad under no_grad", no_grad=True, grad=False,
        replace={"running_mean": lambda t, x: t.requires_grad_()}),
    # ranks below 2
    row("rank 1", shape=(5,), c=5, drop=("weight", "bias", "running_mean", "running_var"),
        match="rank 2 or more"),
    row("rank 1 eval", shape=(5,), c=5, training=False, match="rank 2 or more"),
    row("rank 1 with weight", shape=(5,), c=5, drop=("running_mean", "running_var"),
        match="rank 2 or more"),
    row("rank 1 of one value", shape=(1,), c=1, stats=False, affine=False, match="rank 2"),
    row("rank 0", shape=(), c=1, stats=False, affine=False, match="rank 2 or more"),
    row("rank 0 eval", shape=(), c=1, training=False, match="rank 2 or more"),
    # too few values per channel
    row("batch of one", shape=(1, 3), match="Expected more than 1 value per channel"),
    row("batch of one, length 1", shape=(1, 3, 1), match="Expected more than 1 value"),
    row("batch of one, no channels", shape=(1, 0), c=0, match="Expected more than 1 value"),
    # parameter shapes: torch's forward takes weight and bias of any shape holding C values
    # (its backward does not: see the deliberate differences below)
    row("weight (1, 3)", grad=False, replace={"weight": lambda t, x: t.reshape(1, 3)}),
    row("bias (3, 1)", grad=False, replace={"bias": lambda t, x: t.reshape(3, 1)}),
    row("weight (1, 3) eval", training=False, grad=False,
        replace={"weight": lambda t, x: t.reshape(1, 3)}),
    row("weight of 4", replace={"weight": lambda t, x: torch.ones(4)}, match="`weight`.*\\(3,\\)"),
    row("bias of 2", replace={"bias": lambda t, x: torch.ones(2)}, match="`bias`.*\\(3,\\)"),
    row("running_mean of 2", replace={"running_mean": lambda t, x: torch.zeros(2)},
        match="`running_mean`.*\\(3,\\)"),
    row("running_var (3, 1)", replace={"running_var": lambda t, x: t.reshape(3, 1)},
        match="`running_var`.*shape \\(3,\\).*\\(3, 1\\)"),
    row("strided parameters", replace={
        n: (lambda t, x: torch.stack([t, t], 1)[:, 0]) for n in
        ("weight", "bias", "running_mean", "running_var")}),
    # dtypes: x float32/float64 takes parameters of its own dtype; float16 and bfloat16 take
    # their own dtype or float32, all alike
    row("float64", dtype=F64),
    row("float16, float32 parameters", dtype=F16),
    row("bfloat16, float32 parameters", dtype=BF16),
    row("float16, float16 parameters", dtype=F16, pdtype=F16),
    row("bfloat16, bfloat16 parameters", dtype=BF16, pdtype=BF16),
    row("float16 eval", dtype=F16, training=False),
    row("float32, float64 parameters", pdtype=F64, match="float32 input must be torch.float32"),
    row("float32, float16 parameters", pdtype=F16, match="must be torch.float32"),
    row("float32, bfloat16 parameters", pdtype=BF16, match="must be torch.float32"),
    row("float64, float32 parameters", dtype=F64, pdtype=F32, match="must be torch.float64"),
    row("float32, float64 weight", replace={"weight": lambda t, x: t.double()},
        match="`weight` torch.float64"),
    row("float32, float64 running statistics", match="`running_mean` torch.float64",
        replace={n: (lambda t, x: t.double()) for n in ("running_mean", "running_var")}),
    row("float32, bfloat16 running statistics", match="`running_var` torch.bfloat16",
        replace={n: (lambda t, x: t.bfloat16()) for n in ("running_mean", "running_var")}),
    row("float64 eval, float32 statistics", dtype=F64, training=False, drop=("weight", "bias"),
        replace={n: (lambda t, x: t.float()) for n in ("running_mean", "running_var")},
        match="float64"),
    row("float16, mixed float16 and float32", dtype=F16,
        replace={"weight": lambda t, x: t.half()}, match="all torch.float16 or all"),
    row("bfloat16, float64 parameters", dtype=BF16, pdtype=F64, match="bfloat16"),
    row("integer weight", replace={"weight": lambda t, x: t.long()}, match="`weight`.*int64"),
    row("integer input", dtype=torch.int64, pdtype=F32, grad=False, match="int64"),
    row("complex input", dtype=torch.complex64, pdtype=F32, grad=False, match="complex64"),
    row("float8 input", dtype=torch.float8_e4m3fn, pdtype=F32, grad=False,
        match="float8_e4m3fn"),
    # devices
    row("meta", device="meta"),
    row("meta eval", device="meta", training=False),
    row("meta channels-last", device="meta", shape=(2, 3, 4, 5), channels_last=True),
    row("meta, weight on the CPU", device="meta", replace={"weight": lambda t, x: torch.ones(3)},
        match="`weight` is on cpu but the input is on meta"),
    row("CPU input, meta statistics", match="`running_mean` is on meta",
        replace={n: (lambda t, x: t.to("meta")) for n in ("running_mean", "running_var")}),
    row("input not a tensor", input=lambda x: x.numpy(), grad=False,
        match="`input` must be a torch.Tensor"),
]


def _run(fn, r: Row, device: str):
    args, kwargs = r.build()
    if device == "cuda":
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) and a.is_cpu else a for a in args)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) and v.is_cpu and k != "momentum"
                  and k != "training" else v for k, v in kwargs.items()}
    x = args[0]
    diff = [t for t in (x, kwargs["weight"], kwargs["bias"])
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0
            and t.device.type != "meta"]
    want_grad = r.grad and not r.no_grad and all(t.dtype in (F32, F64, F16, BF16)
                                                 for t in diff)
    if want_grad:
        diff = [t.requires_grad_() if t.is_leaf else t for t in diff]
    with torch.no_grad() if r.no_grad else torch.enable_grad():
        y = fn(*args, **kwargs)
    grads = None
    if want_grad and y.requires_grad and y.device.type != "meta":
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y)
        grads = torch.autograd.grad(y, diff, dy, allow_unused=True)
    return y, args[1:], grads


def _same(what, ours, theirs, dtype):
    assert type(ours) is type(theirs), what
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.device == theirs.device, what
    if ours.device.type == "meta":
        return
    if not ours.is_floating_point():
        assert torch.equal(ours, theirs), f"{what}: {ours} != {theirs}"
        return
    atol, rtol = tolerance(dtype if dtype in (F16, BF16) else ours.dtype)
    torch.testing.assert_close(ours.cpu().double(), theirs.cpu().double(), atol=atol,
                               rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _outcome(fn, r, device):
    try:
        return _run(fn, r, device), None
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return None, exc


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "meta"])
@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_functional_matches_torch(r: Row, device):
    theirs, their_exc = _outcome(F.batch_norm, r, device)
    ours, our_exc = _outcome(bnt.batch_norm, r, device)
    if their_exc is not None:
        assert r.match is not None, f"torch raised {their_exc!r}; the table says it does not"
        assert our_exc is not None, f"torch raises {their_exc!r}; ours returned"
        assert isinstance(our_exc, type(their_exc)), (
            f"ours raised {type(our_exc).__mro__}, torch {type(their_exc).__name__}")
        assert re.search(r.match, str(our_exc)), f"{our_exc} does not match {r.match!r}"
        return
    assert r.match is None, f"the table expects an error ({r.match!r}); torch returned"
    if our_exc is not None:
        raise AssertionError(f"torch returns; ours raised {our_exc!r}") from our_exc
    (y, stats, grads), (ty, tstats, tgrads) = ours, theirs
    dtype = y.dtype
    _same("y", y, ty, dtype)
    if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) != \
            ty.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("memory format differs from torch's")
    for name, a, e in zip(("running_mean", "running_var"), stats, tstats, strict=True):
        if isinstance(a, torch.Tensor):
            _same(name, a.detach(), e.detach(), dtype)
    assert (grads is None) == (tgrads is None)
    if grads is not None:
        for i, (a, e) in enumerate(zip(grads, tgrads, strict=True)):
            _same(f"gradient {i}", a, e, dtype)


@pytest.mark.parametrize("r", [r for r in ROWS if r.match], ids=lambda r: r.id)
def test_refused_calls_change_nothing(r: Row):
    """Every tensor of a refused call is left bit-identical (rebuilt from the same seed to
    compare with)."""
    args, kwargs = r.build()
    with pytest.raises(Exception, match=r.match):  # noqa: B017 - the type is tested above
        bnt.batch_norm(*args, **kwargs)
    again, kwargs_again = r.build()
    for name, a, b in [("input", args[0], again[0]), ("running_mean", args[1], again[1]),
                       ("running_var", args[2], again[2])] + [
            (k, kwargs[k], kwargs_again[k]) for k in ("weight", "bias")]:
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            assert a.dtype == b.dtype and torch.equal(a.detach(), b.detach()), name


# ---------------------------------------------------------------- modules


MODULES = [(bnt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
           (bnt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 4)),
           (bnt.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 4, 5)),
           (bnt.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 2))]
SETTINGS = [
    dict(), dict(momentum=None), dict(momentum=1.5), dict(momentum=-0.5), dict(momentum=0.0),
    dict(affine=False), dict(track_running_stats=False), dict(eps=0.0), dict(eps=1e-3),
    dict(momentum=None, track_running_stats=False), dict(dtype=F64), dict(momentum="0.1"),
]


@dataclass
class Steps:
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    grads: list = field(default_factory=list)


def _module_steps(cls, shape, settings, device):
    """Two training steps, then eval, on a fresh module; every output, error and state."""
    torch.manual_seed(0)
    m = cls(3, device=device, **settings)
    if m.affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    out = Steps()
    dtype = settings.get("dtype", F32)
    for step, training in enumerate((True, True, False)):
        m.train(training)
        x = (torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=F64) * 2
             + 1).to(dtype).to(device).requires_grad_()
        try:
            y = m(x)
        except Exception as exc:  # noqa: BLE001 - compared with torch's
            out.errors.append(exc)
            out.outputs.append(None)
            continue
        out.errors.append(None)
        out.outputs.append(y)
        if device != "meta":
            y.backward(torch.ones_like(y) + x.detach())
            out.grads.append(x.grad)
    out.state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    if m.affine and m.weight.grad is not None:
        out.grads += [m.weight.grad, m.bias.grad]
    return out


def _module_cases():
    """Every setting on every module on the CPU; dtype and device rows on BatchNorm2d only.
    momentum=None on meta is a deliberate difference (tested below)."""
    for ours_cls, torch_cls, shape in MODULES:
        for settings in SETTINGS:
            for device in DEVICES:
                if ours_cls is not bnt.BatchNorm2d and (settings.get("dtype") or device != "cpu"):
                    continue
                if device == "meta" and "momentum" in settings and settings["momentum"] is None:
                    continue
                yield pytest.param(ours_cls, torch_cls, shape, settings, device,
                                   id=f"{ours_cls.__name__}-{shape}-{settings or 'defaults'}-"
                                      f"{device}")


@pytest.mark.parametrize("ours_cls, torch_cls, shape, settings, device", list(_module_cases()))
def test_modules_match_torch(ours_cls, torch_cls, shape, settings, device):
    ours = _module_steps(ours_cls, shape, settings, device)
    theirs = _module_steps(torch_cls, shape, settings, device)
    dtype = settings.get("dtype", F32)
    for i, (a, e) in enumerate(zip(ours.errors, theirs.errors, strict=True)):
        assert (a is None) == (e is None), f"step {i}: ours {a!r}, torch {e!r}"
        if e is not None:
            assert isinstance(a, type(e)), f"step {i}: ours {a!r}, torch {e!r}"
    for i, (a, e) in enumerate(zip(ours.outputs, theirs.outputs, strict=True)):
        if a is not None:
            _same(f"y of step {i}", a.detach(), e.detach(), dtype)
    assert ours.state.keys() == theirs.state.keys()
    for k in ours.state:
        _same(k, ours.state[k], theirs.state[k], dtype)
    assert len(ours.grads) == len(theirs.grads)
    for i, (a, e) in enumerate(zip(ours.grads, theirs.grads, strict=True)):
        _same(f"gradient {i}", a, e, dtype)


# ---------------------------------------------------------------- deliberate differences


def test_empty_batch_with_wrong_parameters_is_refused_where_torch_returns():
    """contract §7: torch's CPU kernel returns early on an empty batch without looking at the
    parameters; ours checks them on every call, so a wrong model fails on its first batch."""
    x = torch.randn(0, 3, 4)
    w = torch.ones(5)
    assert F.batch_norm(x, None, None, w, None, True).shape == x.shape
    with pytest.raises(ValueError, match="`weight` must have shape"):
        bnt.batch_norm(x, None, None, w, None, True)
    w64 = torch.ones(3, dtype=F64)
    assert F.batch_norm(x, None, None, w64, None, True).shape == x.shape
    with pytest.raises(TypeError, match="float64"):
        bnt.batch_norm(x, None, None, w64, None, True)


@pytest.mark.parametrize("shape", [(1, 3), (3, 1)])
def test_weight_of_another_shape_has_gradients_where_torch_backward_fails(shape):
    """contract §7: torch's forward takes a weight of C values in another shape, its backward
    then fails; ours takes it in both, the gradient having the weight's shape."""
    x, rm, rv, w, b = tensors((6, 3, 4))
    w = w.reshape(shape)
    wt, wo = w.clone().requires_grad_(), w.clone().requires_grad_()
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt = F.batch_norm(xt, rm.clone(), rv.clone(), wt, b, True)
    with pytest.raises(RuntimeError, match="TensorAccessor expected 1 dims"):
        yt.sum().backward()
    yo = bnt.batch_norm(xo, rm.clone(), rv.clone(), wo, b, True)
    _same("y", yo, yt, F32)
    (yo * yo).sum().backward()
    w1 = w.reshape(3).clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    y1 = F.batch_norm(x1, rm.clone(), rv.clone(), w1, b, True)
    (y1 * y1).sum().backward()
    assert wo.grad.shape == shape
    _same("dweight", wo.grad.reshape(3), w1.grad, F32)
    _same("dx", xo.grad, x1.grad, F32)


def test_zero_channels_with_parameters_return_empty_where_torch_fails():
    """contract §7: with C = 0 torch's CPU kernel indexes an empty weight and raises an
    IndexError; ours returns the empty output, as without parameters."""
    x, w, b = torch.randn(2, 0, 3), torch.ones(0), torch.zeros(0)
    with pytest.raises(IndexError):
        F.batch_norm(x, None, None, w, b, True)
    assert bnt.batch_norm(x, None, None, w, b, True).shape == x.shape


def test_cumulative_momentum_runs_on_meta_where_torch_reads_the_count():
    """contract §7: torch.nn's momentum=None reads num_batches_tracked into Python, which a
    meta tensor cannot give; ours hands the count to the op as a tensor, so it runs."""
    x = torch.empty(2, 3, 4, 5, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        torch.nn.BatchNorm2d(3, momentum=None, device="meta")(x)
    m = bnt.BatchNorm2d(3, momentum=None, device="meta")
    y = m(x)
    assert y.device.type == "meta" and y.shape == x.shape
    assert m.num_batches_tracked.device.type == "meta"


@pytest.mark.parametrize("layer", ["act", "act_inplace", "sync"])
def test_a_refused_fused_module_call_does_not_count_the_batch(layer):
    """The fused layers' own arguments (a residual, the memory-saving mode) are checked before
    num_batches_tracked counts the batch: with momentum=None that count is the next step's
    factor."""
    from batchnorm.torch.sync import SyncBatchNorm

    m = {"act": lambda: bnt.BatchNormAct2d(3, momentum=None),
         "act_inplace": lambda: bnt.BatchNormAct2d(3, momentum=None, activation="leaky_relu",
                                                   inplace=True),
         "sync": lambda: SyncBatchNorm(3, momentum=None, activation="relu")}[layer]()
    x = torch.randn(2, 3, 4, 4)
    if layer == "act_inplace":  # a leaf that requires grad cannot be written in place
        x.requires_grad_()
        bad = dict()
    else:
        bad = dict(residual=torch.randn(2, 3, 4, 5))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        m(x, **bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
