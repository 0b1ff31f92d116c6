"""BatchNorm1d/2d/3d: drop-in equality with torch.nn's modules."""

import copy

import pytest
import torch
from torch import nn

import batchnorm.torch as bnt
from conftest import assert_close as close_to
from conftest import tolerance

PAIRS = [
    (bnt.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (bnt.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
    (bnt.BatchNorm2d, nn.BatchNorm2d, (6, 4, 3, 5)),
    (bnt.BatchNorm3d, nn.BatchNorm3d, (3, 4, 2, 3, 2)),
]


def assert_close(a, b, what, atol=1e-5, rtol=1e-4):
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max diff {diff:.3g}"


def run_pair(ours, theirs, shape, steps=3, seed=0):
    """Feed both modules the same batches; compare outputs, gradients and buffers."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(shape, generator=g) * 3 + 1
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        assert_close(yo, yt, f"y at step {step}")
        dy = torch.randn(shape, generator=g)
        yo.backward(dy)
        yt.backward(dy)
        assert_close(xo.grad, xt.grad, f"dx at step {step}")
        for (name, po), pt in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(po.grad, pt.grad, f"{name}.grad at step {step}")
        for (name, bo), bt in zip(ours.named_buffers(), theirs.buffers(), strict=True):
            assert_close(bo.double(), bt.double(), f"{name} at step {step}")


@pytest.mark.parametrize("ours_cls, torch_cls, shape", PAIRS)
@pytest.mark.parametrize("kwargs", [
    {}, {"affine": False}, {"momentum": None}, {"momentum": 1.0, "eps": 1e-3},
    {"track_running_stats": False},
], ids=["default", "no_affine", "cumulative", "momentum1", "no_running"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_torch(ours_cls, torch_cls, shape, kwargs, training):
    torch.manual_seed(1)
    theirs = torch_cls(shape[1], **kwargs)
    ours = ours_cls(shape[1], **kwargs)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 2)
            theirs.bias.uniform_(-1, 1)
    if theirs.track_running_stats:
        with torch.no_grad():
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    theirs.train(training)
    run_pair(ours, theirs, shape)
    if kwargs.get("momentum", 0.1) is None and training:
        assert int(ours.num_batches_tracked) == 3


def test_channels_last_2d_and_3d():
    for ours, theirs, shape, fmt in [
        (bnt.BatchNorm2d(4), nn.BatchNorm2d(4), (5, 4, 3, 6), torch.channels_last),
        (bnt.BatchNorm3d(4), nn.BatchNorm3d(4), (3, 4, 2, 3, 4), torch.channels_last_3d),
    ]:
        x = torch.randn(shape).to(memory_format=fmt)
        y = ours(x)
        assert y.is_contiguous(memory_format=fmt)
        assert_close(y, theirs(x), "y")
        assert_close(ours.running_var, theirs.running_var, "running_var")


def test_state_dict_round_trips():
    for ours_cls, torch_cls, _ in PAIRS[::2]:
        theirs = torch_cls(5, momentum=None)
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.running_mean.normal_()
            theirs.num_batches_tracked.fill_(7)
        ours = ours_cls(5, momentum=None)
        ours.load_state_dict(theirs.state_dict())
        back = torch_cls(5, momentum=None)
        back.load_state_dict(ours.state_dict())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
            assert torch.equal(back.state_dict()[key], value), key


def test_old_checkpoint_without_num_batches_tracked():
    theirs = nn.BatchNorm2d(3)
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # a checkpoint from before the buffer existed
    ours = bnt.BatchNorm2d(3)
    ours.load_state_dict(state)  # torch.nn's loader fills it in; ours inherits that
    assert int(ours.num_batches_tracked) == 0


def test_constructor_repr_and_isinstance():
    ours = bnt.BatchNorm2d(8, eps=1e-3, momentum=0.05, affine=False, dtype=torch.float64)
    theirs = nn.BatchNorm2d(8, eps=1e-3, momentum=0.05, affine=False, dtype=torch.float64)
    assert ours.extra_repr() == theirs.extra_repr()
    assert isinstance(ours, nn.BatchNorm2d)
    assert ours.running_mean.dtype == torch.float64 and ours.weight is None


@pytest.mark.parametrize("ours_cls, torch_cls, bad_shape", [
    (bnt.BatchNorm1d, nn.BatchNorm1d, (2, 3, 4, 5)),
    (bnt.BatchNorm2d, nn.BatchNorm2d, (2, 3)),
    (bnt.BatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 5)),
])
def test_input_dim_errors_match_torch(ours_cls, torch_cls, bad_shape):
    x = torch.randn(bad_shape)
    with pytest.raises(ValueError) as theirs:
        torch_cls(3)(x)
    with pytest.raises(ValueError) as ours:
        ours_cls(3)(x)
    assert str(ours.value) == str(theirs.value)


def test_batch_of_one_error_matches_torch():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError) as theirs:
        nn.BatchNorm1d(3)(x)
    with pytest.raises(ValueError) as ours:
        bnt.BatchNorm1d(3)(x)
    assert str(ours.value) == str(theirs.value)


def test_sync_batchnorm_is_lazy():
    assert "SyncBatchNorm" in bnt.__all__
    with pytest.raises(AttributeError):
        bnt.NotAThing  # noqa: B018


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_low_precision_module_trains_on_cpu(dtype, channels_last):
    """``BatchNorm2d(...).half()`` / ``.bfloat16()`` trains on CPU tensors: outputs, input and
    parameter gradients and the running statistics (kept in the module's dtype) agree with a
    float64 copy of the same module within the dtype's tolerance, and with torch.nn's."""
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(4)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
        theirs.running_mean.uniform_(-1, 1)
        theirs.running_var.uniform_(0.5, 2)
    ours = bnt.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    exact = copy.deepcopy(theirs).double()  # the same rounded parameters, in float64
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = (torch.randn(5, 4, 3, 6, generator=g) * 2 + 1).to(dtype).to(memory_format=fmt)
        dy = torch.randn(x.shape, generator=g).to(dtype)
        xo, xt, xe = (x.clone().requires_grad_(), x.clone().requires_grad_(),
                      x.double().requires_grad_())
        yo, yt, ye = ours(xo), theirs(xt), exact(xe)
        assert yo.dtype == dtype and yo.is_contiguous(memory_format=fmt)
        yo.backward(dy)
        yt.backward(dy)
        ye.backward(dy.double())
        pairs = [("y", yo, ye, yt), ("dx", xo.grad, xe.grad, xt.grad),
                 ("dweight", ours.weight.grad, exact.weight.grad, theirs.weight.grad),
                 ("dbias", ours.bias.grad, exact.bias.grad, theirs.bias.grad),
                 ("running_mean", ours.running_mean, exact.running_mean, theirs.running_mean),
                 ("running_var", ours.running_var, exact.running_var, theirs.running_var)]
        atol, rtol = tolerance(dtype)
        for name, got, want, torch_nn in pairs:
            assert got.dtype == dtype, name
            close_to(got, want, dtype, name=f"{name} vs float64 at step {step}")
            # torch.nn rounds differently: within the sum of both roundings
            close_to(got, torch_nn, atol=2 * atol, rtol=2 * rtol,
                     name=f"{name} vs torch.nn at step {step}")
        for m in (ours, theirs, exact):
            m.zero_grad()
