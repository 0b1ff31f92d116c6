"""fuse(model): batch norm -> activation and batch norm -> add -> activation chains found by
torch.fx and replaced by BatchNormAct layers; everything else left as it was, and said why."""

import copy
import logging
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm.torch as bnt
from batchnorm.cli.networks import build_net, resnet50
from batchnorm.torch.fuse import FuseReport, fuse, fused_residual
from conftest import assert_close

FUSED = (bnt.BatchNormAct1d, bnt.BatchNormAct2d, bnt.BatchNormAct3d)
F64 = torch.float64


# ---------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock form: one in-place ReLU module called twice, and
    ``out += identity`` at the end."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's Bottleneck form (expansion 4)."""

    def __init__(self, c_in, width, stride=1):
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def small_resnet():
    """A torchvision-style ResNet: stem, two BasicBlocks (one downsampling), a Bottleneck,
    pooling and a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        BasicBlock(8, 8), BasicBlock(8, 12, stride=2), Bottleneck(12, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


class Functional(nn.Module):
    """Every way of writing the activation and the add that fuse() reads."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(9))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(9))

    def forward(self, x):
        c, b = self.convs, self.bns
        x = F.relu(b[0](c[0](x)))
        x = torch.relu(b[1](c[1](x)))
        x = b[2](c[2](x)).relu()
        x = F.leaky_relu(b[3](c[3](x)), 0.2)
        x = F.leaky_relu(b[4](c[4](x)), negative_slope=0.05, inplace=True)
        x = F.relu(torch.add(b[5](c[5](x)), x), inplace=True)
        x = torch.relu_(b[6](c[6](x)).add(x))
        y = b[7](c[7](x))
        y += x
        x = y.relu_()
        return F.leaky_relu(x + b[8](c[8](x)), 0.1)


def init(model, seed=0):
    """Weights, biases and running statistics away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def fused_types(model):
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)})


# ---------------------------------------------------------------- training alike


def train_alike(original, fused, shape, steps=3, fmt=torch.contiguous_format, classes=None):
    """A few SGD steps (momentum) of both models, each on its own parameters, from the same
    state: outputs, every gradient, every parameter and buffer after each step agree within
    the dtype's tolerance; then the same in eval mode."""
    dtype = next(original.parameters()).dtype
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (original, fused)]
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        x = torch.randn(shape, generator=g, dtype=dtype).to(memory_format=fmt)
        outs = []
        for model, opt in zip((original, fused), opts, strict=True):
            opt.zero_grad()
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            if classes is None:
                loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype)
                        .view(out.shape)).sum()
            else:
                loss = F.cross_entropy(out, torch.arange(out.shape[0]) % classes)
            loss.backward()
            outs.append((out, xi.grad))
        assert_close(outs[1][0], outs[0][0], dtype, name=f"output at step {step}")
        assert_close(outs[1][1], outs[0][1], dtype, name=f"input gradient at step {step}")
        for (name, p), q in zip(original.named_parameters(), fused.parameters(), strict=True):
            assert_close(q.grad, p.grad, dtype, name=f"{name}.grad at step {step}")
        for opt in opts:
            opt.step()
        for (name, b), c in zip(original.named_buffers(), fused.buffers(), strict=True):
            assert_close(c, b, dtype, name=f"{name} after step {step}")
    original.eval()
    fused.eval()
    x = torch.randn(shape, generator=g, dtype=dtype).to(memory_format=fmt)
    assert_close(fused(x), original(x), dtype, name="eval output")
    original.train()
    fused.train()


def fused_copy(model, **kwargs):
    """(an independent copy of model, fuse of another copy, the report)."""
    twin = copy.deepcopy(model)
    result, report = fuse(copy.deepcopy(model), report=True, **kwargs)
    return twin, result, report


# ---------------------------------------------------------------- what is fused


def test_basic_block_and_bottleneck_are_fused_where_torchvision_writes_them():
    model = init(nn.Sequential(BasicBlock(4, 6, 2), Bottleneck(6, 2)))
    fused, report = fuse(model, report=True)
    assert isinstance(fused, fx.GraphModule) and type(fused).__name__ == "Sequential"
    assert dict(report.fused) == {
        "0.bn1": "relu (module `0.relu`)",
        "0.bn2": "add (function `add`, residual module `0.downsample.1`) + relu "
                 "(module `0.relu`)",
        "1.bn1": "relu (module `1.relu`)",
        "1.bn2": "relu (module `1.relu`)",
        "1.bn3": "add (function `add`, residual module `1.downsample.1`) + relu "
                 "(module `1.relu`)",
    }
    assert dict(report.left) == {
        "0.downsample.1": "its output meets that of `0.bn2` in function `add`, which "
                          "`0.bn2`'s fused layer takes (this output becomes its residual)",
        "1.downsample.1": "its output meets that of `1.bn3` in function `add`, which "
                          "`1.bn3`'s fused layer takes (this output becomes its residual)",
    }
    assert report.traced and report.trace_error is None
    layer = fused.get_submodule("1.bn3")
    assert type(layer) is bnt.BatchNormAct2d and layer.training
    # torch.nn's batch norms that were not fused keep their class
    assert type(fused.get_submodule("0.downsample.1")) is nn.BatchNorm2d
    assert "fused 0.bn1 with relu" in str(report) and "left 0.downsample.1" in str(report)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_small_resnet_trains_to_the_same_values_and_gradients(layout):
    torch.manual_seed(0)
    model = init(small_resnet().to(F64, memory_format=layout))
    original, fused, report = fused_copy(model)
    assert len(report.fused) == 8 and len(report.left) == 2
    train_alike(original, fused, (6, 3, 8, 8), fmt=layout, classes=5)


def test_fuse_of_converted_model_trains_like_the_converted_model():
    torch.manual_seed(0)
    model = bnt.convert_model(init(build_net(width=6, blocks=2).to(F64)))
    original, fused, report = fused_copy(model)
    assert [bn for bn, _ in report.fused] == ["0.1", "1.0.bn1", "1.0.bn2", "1.1.bn1",
                                              "1.1.bn2", "4.1"]
    assert report.left == ()
    assert fused_types(fused) == ["BatchNormAct1d", "BatchNormAct2d"]
    train_alike(original, fused, (4, 3, 6, 6), classes=10)


def test_every_functional_form_is_fused():
    torch.manual_seed(0)
    model = init(Functional().to(F64))
    original, fused, report = fused_copy(model)
    assert report.left == ()
    what = dict(report.fused)
    assert what["bns.0"] == "relu (function `relu`)"
    assert what["bns.2"] == "relu (method `relu`)"
    assert what["bns.3"] == "leaky_relu(0.2) (function `leaky_relu`)"
    assert what["bns.4"] == "leaky_relu(0.05) (function `leaky_relu`)"
    assert what["bns.5"].startswith("add (function `add`, residual function `leaky_relu`)")
    assert what["bns.6"].startswith("add (method `add`")
    assert what["bns.7"] == ("add (function `add`, residual function `relu_`) + relu "
                             "(method `relu_`)")
    assert what["bns.8"].endswith("+ leaky_relu(0.1) (function `leaky_relu`)")
    layers = [fused.get_submodule(f"bns.{i}") for i in range(9)]
    assert [(m.activation, m.negative_slope) for m in layers[3:5]] == [("leaky_relu", 0.2),
                                                                    ("leaky_relu", 0.05)]
    train_alike(original, fused, (3, 4, 5, 5))


def test_state_dict_keys_are_unchanged_and_load_both_ways():
    model = init(small_resnet())
    fused = fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    other = init(small_resnet(), seed=5)
    fused.load_state_dict(other.state_dict())
    assert torch.equal(fused.get_submodule("3.bn1").weight, other.get_submodule("3.bn1").weight)
    back = small_resnet()
    back.load_state_dict(fused.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_parameters_are_shared_and_the_original_left_untouched():
    model = init(small_resnet())
    before = {n: type(m) for n, m in model.named_modules()}
    fused = fuse(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p is q for p, q in zip(model.parameters(), fused.parameters(), strict=True))
    assert all(p is q for p, q in zip(model.buffers(), fused.buffers(), strict=True))
    fused.eval()
    assert model.training and not fused.get_submodule("1").training


def test_module_flags_and_mode_changes_follow_the_original():
    torch.manual_seed(0)
    model = init(small_resnet().to(F64))
    model.get_submodule("3.bn2").eval()  # one BN in eval mode inside a training model
    original, fused, _ = fused_copy(model)
    assert not fused.get_submodule("3.bn2").training and fused.get_submodule("3.bn1").training
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    assert_close(fused(x), original(x), F64, name="mixed modes")
    for mode in (False, True, False):
        original.train(mode)
        fused.train(mode)
        assert_close(fused(x), original(x), F64, name=f"training={mode}")
    with torch.no_grad():
        assert_close(fused(x), original(x), F64, name="no_grad")


def test_public_attributes_and_unused_modules_are_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.spare = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Linear(2, 2)
            self.num_classes = 3

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    fused, report = fuse(Net(), report=True)
    assert fused.num_classes == 3 and isinstance(fused.spare, nn.Linear)
    assert dict(report.left) == {}


def test_report_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="batchnorm.torch"):
        fuse(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))
    assert "fuse: 1 fused, 0 left" in caplog.text


# ---------------------------------------------------------------- what is left, and why


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()
        self.other = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.relu(self.conv(x))  # a ReLU after something else
        return self.relu(y) + y + self.other(x) + z  # `other` goes to an add, then no activation


def test_a_batch_norm_whose_output_is_used_twice_is_left():
    model = init(UsedTwice())
    fused, report = fuse(model, report=True)
    assert fused is model  # nothing fused: the model itself
    assert dict(report.left) == {
        "bn": "its output is used by 2 operations (module `relu`, function `add`)",
        "other": "its output goes to function `add`, and that to function `add`, not to a "
                 "ReLU or a LeakyReLU",
    }


def _left(model, *example):
    """The reasons fuse() gives for what it leaves, checking the result equals the model."""
    init(model)
    original, fused, report = fused_copy(model, example_inputs=example or None)
    x = example[0] if example else torch.randn(2, 3, 4, 4)
    assert_close(fused(x), original(x), x.dtype, name="output")
    return dict(report.left)


class Adds(nn.Module):
    """Adds whose other operand cannot be a residual of the batch norm's shape."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(5))
        self.shift = nn.Parameter(torch.full((3, 1, 1), 0.5))

    def forward(self, x):
        a = F.relu(self.bns[0](x) + 1.0)
        b = F.relu(self.bns[1](x) + self.shift)
        c = F.relu(self.bns[2](x) + x.mean((2, 3), keepdim=True))  # broadcast
        d = F.relu(self.bns[3](x) + x.double())  # another dtype
        e = F.relu(self.bns[4](x).add(x, alpha=2))
        return a + b + c + d + e


def test_adds_of_constants_attributes_other_shapes_or_scaled_are_left():
    left = _left(Adds(), torch.randn(2, 3, 4, 4))
    assert left == {
        "bns.0": "its output is added to the constant 1.0, not to a tensor of its shape",
        "bns.1": "its output is added to the attribute `shift`, not to a tensor of its shape",
        "bns.2": "its output goes to function `add` with (2, 3, 1, 1) torch.float32, not with "
                 "a tensor of its input's shape and dtype ((2, 3, 4, 4) torch.float32)",
        "bns.3": "its output goes to function `add` with (2, 3, 4, 4) torch.float64, not with "
                 "a tensor of its input's shape and dtype ((2, 3, 4, 4) torch.float32)",
        "bns.4": "its output goes to method `add`, not to a ReLU, a LeakyReLU or an add",
    }


def test_without_example_inputs_an_add_of_another_shape_is_computed_unfused():
    model = init(Adds())
    original, fused, report = fused_copy(model)
    assert {bn for bn, _ in report.fused} == {"bns.2", "bns.3"}  # shapes unknown: checked
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = original(x), fused(x2)
    assert y2.dtype == torch.float64
    assert_close(y2, y, torch.float32, name="output")
    y.sum().backward()
    y2.sum().backward()
    assert_close(x2.grad, x.grad, torch.float32, name="input gradient")
    for (name, b), c in zip(original.named_buffers(), fused.buffers(), strict=True):
        assert_close(c, b, torch.float32, name=name)


def test_fused_residual_checks_its_operand():
    bn = bnt.BatchNormAct2d(3, dtype=F64).eval()
    init(bn)
    plain = nn.BatchNorm2d(3, dtype=F64).eval()
    plain.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    for z in (torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(3, 1, 1, dtype=F64), 2.0,
              torch.randn(2, 3, 4, 4)):
        assert_close(fused_residual(bn, x, z, "relu", 0.0), F.relu(plain(x) + z), F64,
                     name=f"residual {getattr(z, 'shape', z)}")


def test_activations_it_cannot_compute_and_other_uses_are_left():
    class Others(nn.Module):
        def __init__(self):
            super().__init__()
            self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(6))
            self.act = nn.LeakyReLU(-0.5)

        def forward(self, x):
            a = self.act(self.bns[0](x))
            b = F.relu6(self.bns[1](x))
            c = F.leaky_relu(self.bns[2](x), x.shape[2] * 0.01)
            d = self.bns[3](x) + x
            e = F.relu(d) + d
            f = F.relu(x + self.bns[4](x))
            f += x
            g = self.bns[5](x) + self.bns[5](x)
            return a + b + c + e + f + F.relu(g)

    left = _left(Others())
    assert left["bns.0"].startswith("module `act` cannot be fused: negative_slope must be")
    assert left["bns.1"] == ("its output goes to function `relu6`, not to a ReLU, a LeakyReLU "
                             "or an add")
    assert left["bns.3"] == ("its output goes to function `add`, whose result is used by 2 "
                             "operations")
    assert left["bns.2"] == "the slope of function `leaky_relu` is computed in forward"
    assert left["bns.5"] == "two of its calls meet in function `add`"
    assert "bns.4" not in left  # f += x adds to the fused result, not into the BN's output
    assert len(left) == 5


def test_classes_that_are_not_plain_batch_norms_are_left():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), MyBN(3), nn.ReLU(),
        nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3), nn.ReLU(),
        nn.Conv2d(3, 3, 1), bnt.BatchNormAct2d(3, activation=None), nn.ReLU(),
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 3, 1), bnt.SyncBatchNorm(3, activation="relu"), nn.ReLU())
    model[10].register_forward_hook(lambda *a: None)
    model.eval()  # torch.nn.SyncBatchNorm runs on CPU tensors in eval mode only
    left = _left(model)
    assert left["1"].startswith("its class test_torch_fuse.test_classes_that_are_not_plain_"
                                "batch_norms_are_left.<locals>.MyBN is not one that fuse "
                                "replaces")
    assert left["4"].startswith("its class torch.nn.modules.batchnorm.SyncBatchNorm is not")
    assert left["7"] == left["13"] == "it is already a fused layer"
    assert left["10"].startswith("it has hooks")


def test_sync_batch_norms_are_fused_into_synchronized_layers_with_the_activation():
    torch.manual_seed(0)
    model = bnt.convert_model(init(small_resnet().to(F64)), sync=True)
    original, fused, report = fused_copy(model, inplace=True)
    assert len(report.fused) == 8
    layers = [m for m in fused.modules() if isinstance(m, bnt.SyncBatchNorm)]
    assert len(layers) == 10 and {m.activation for m in layers} == {None, "relu"}
    assert all(not isinstance(m, FUSED) for m in fused.modules())
    # without an initialized process group the layers normalize the local batch
    train_alike(original, fused, (4, 3, 8, 8), classes=5)
    # a LeakyReLU chain of a SyncBatchNorm: fused, not in place
    leaky = nn.Sequential(nn.Conv2d(3, 3, 1), bnt.SyncBatchNorm(3), nn.LeakyReLU(0.1))
    _, report = fuse(leaky, inplace=True, report=True)
    assert dict(report.not_in_place) == {"1": "SyncBatchNorm has no memory-saving mode"}


def test_convert_model_sync_keeps_the_fused_layers_activation():
    torch.manual_seed(0)
    model = init(small_resnet().to(F64))
    fused = fuse(bnt.convert_model(model), inplace=True)
    synced = bnt.convert_model(copy.deepcopy(fused), sync=True)
    acts = [(n, m.activation) for n, m in fused.named_modules() if isinstance(m, FUSED)]
    assert len(acts) == 8
    assert [(n, synced.get_submodule(n).activation) for n, _ in acts] == acts
    assert all(type(synced.get_submodule(n)) is bnt.SyncBatchNorm for n, _ in acts)
    train_alike(fused, synced, (4, 3, 8, 8), classes=5)


def test_a_batch_norm_called_twice_is_fused_only_when_every_call_chains_alike():
    class Twice(nn.Module):
        def __init__(self, second):
            super().__init__()
            self.conv, self.bn, self.second = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), second

        def forward(self, x):
            return self.second(self.bn(self.conv(F.relu(self.bn(x)))))

    model = init(Twice(nn.ReLU()).double())
    original, fused, report = fused_copy(model)
    assert dict(report.fused) == {"bn": "relu (function `relu`), at each of its 2 calls"}
    train_alike(original, fused, (3, 3, 4, 4))
    assert int(fused.bn.num_batches_tracked) == int(original.bn.num_batches_tracked) == 6
    left = _left(Twice(nn.LeakyReLU(0.1)))
    assert left == {"bn": "its 2 calls are followed by different activations "
                          "(leaky_relu(0.1), relu)"}


def test_an_untraceable_model_is_returned_whole_with_the_reason(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = F.relu(self.bn(x))
            return y if y.sum() > 0 else -y

    model = Branchy()
    with caplog.at_level(logging.WARNING, logger="batchnorm.torch"):
        fused, report = fuse(model, report=True)
    assert fused is model and not report.traced and report.fused == ()
    assert report.trace_error.startswith("TraceError")
    assert "could not be traced" in str(report) and "returned whole" in caplog.text


def test_a_forward_that_depends_on_the_training_flag_is_returned_whole():
    class AuxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.aux = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            y = F.relu(self.bn(x))
            return y + F.relu(self.aux(x)) if self.training else y

    model = AuxHead()
    for mode in (True, False):
        fused, report = fuse(model.train(mode), report=True)
        assert fused is model and not report.traced
        assert "different paths in training and in eval mode" in report.trace_error
        assert model.training is mode


def test_example_inputs_change_no_state():
    model = init(small_resnet())
    before = copy.deepcopy(model.state_dict())
    fuse(model, (torch.randn(2, 3, 8, 8),))
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not run on example_inputs"):
        fuse(model, torch.randn(2, 5, 8, 8))


# ---------------------------------------------------------------- the memory-saving mode


class LeakyStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)
        self.bn4 = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))  # conv output read by nothing else: in place
        c = self.conv2(y)
        z = self.act(self.bn2(c)) + c          # conv output also added: not in place
        z = self.act(self.bn3(z))              # after an add: in place
        return F.relu(self.bn4(torch.sigmoid(z)))  # relu; and sigmoid keeps its output


def test_inplace_overwrites_only_where_the_input_is_free():
    torch.manual_seed(0)
    model = init(LeakyStack().double())
    original, fused, report = fused_copy(model, inplace=True)
    assert dict(report.fused) == {
        "bn1": "leaky_relu(0.1) (module `act`), in place",
        "bn2": "leaky_relu(0.1) (module `act`)",
        "bn3": "leaky_relu(0.1) (module `act`), in place",
        "bn4": "relu (function `relu`)"}
    assert dict(report.not_in_place) == {"bn2": "its input is also read by function `add`"}
    assert [fused.get_submodule(f"bn{i}").inplace for i in (1, 2, 3, 4)] == [True, False,
                                                                            True, False]
    train_alike(original, fused, (4, 3, 5, 5))
    default = fuse(model)
    assert not any(m.inplace for m in default.modules() if isinstance(m, FUSED))


def test_inplace_is_refused_after_a_layer_that_keeps_its_output():
    class AfterSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return F.leaky_relu(self.bn(torch.sigmoid(x)), 0.2)

    _, report = fuse(AfterSigmoid(), inplace=True, report=True)
    assert dict(report.not_in_place) == {
        "bn": "its input comes from function `sigmoid`, which may keep it (for its backward, "
              "or as a view of another tensor)"}
    _, report = fuse(nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU()), inplace=True,
                     report=True)
    assert dict(report.not_in_place) == {
        "0": "its input comes from the model's input `input`, which may keep it (for its "
             "backward, or as a view of another tensor)"}


def test_functional_adds_in_the_graph_are_what_fuse_reads():
    # fx records `y += x` on a traced value as operator.add: the rewrite reads either
    traced = fx.symbolic_trace(Bottleneck(8, 2))
    assert operator.add in {n.target for n in traced.graph.nodes}


def test_fuse_report_defaults():
    assert str(FuseReport()) == "fuse: 0 fused, 0 left"


def test_resnet50_is_fused_in_every_block():
    _, report = fuse(bnt.convert_model(resnet50(10)), report=True)
    assert len(report.fused) == 49
    assert [bn for bn, _ in report.left] == [f"{i}.downsample.1" for i in (4, 7, 11, 17)]


def test_the_fused_model_compiles_whole():
    torch.manual_seed(0)
    model = init(nn.Sequential(BasicBlock(4, 4), nn.Flatten()))
    fused = fuse(model)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 5, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = compiled(x1), fused(x2)
    assert_close(y1, y2, torch.float32, name="compiled output")
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert_close(x1.grad, x2.grad, torch.float32, name="compiled input gradient")


def test_activation_subclasses_and_backward_pre_hooks_are_left():
    class MyReLU(nn.ReLU):
        def forward(self, x):  # not what a ReLU computes
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), MyReLU(),
                          nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    model[4].register_full_backward_pre_hook(lambda *a: None)
    left = _left(model)
    assert left == {"4": "it has hooks, which would see the fused layer's output instead "
                         "of its own"}
    # the subclass is traced through (its F.relu is fused, its * 2 kept), not taken as a ReLU
    model.eval()
    fused = bnt.fuse(model)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused(x), model(x))


def test_a_checked_sync_batch_norm_fuses_and_keeps_check_finite():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bnt.SyncBatchNorm(3, check_finite=True),
                          nn.ReLU())
    fused, report = bnt.fuse(model, report=True)
    assert len(report.fused) == 1
    layer = next(m for m in fused.modules() if isinstance(m, bnt.SyncBatchNorm))
    assert layer.check_finite and layer.activation == "relu"
