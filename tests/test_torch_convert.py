"""convert_model on a small ResNet-style network, and fold_batchnorm."""

import copy

import pytest
import torch
from torch import nn

import batchnorm.torch as bnt
from batchnorm.cli.networks import build_net


def assert_close(a, b, what, atol=2e-5, rtol=1e-4):
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max diff {diff:.3g}"


def bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_replaces_every_batchnorm_and_keeps_state():
    theirs = build_net(width=4, blocks=2)
    theirs.get_submodule("1.0.bn2").eval()
    theirs.get_submodule("0.0").weight.requires_grad_(False)
    ours = bnt.convert_model(copy.deepcopy(theirs))
    assert bn_types(ours) == [bnt.BatchNorm2d] * 5 + [bnt.BatchNorm1d]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    flags = [(n, m.training) for n, m in theirs.named_modules()]
    assert [(n, m.training) for n, m in ours.named_modules()] == flags
    grads = [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == grads


def test_convert_shares_parameters_and_handles_containers():
    bn = nn.BatchNorm2d(3, dtype=torch.float64)
    model = nn.ModuleDict({"a": nn.ModuleList([bn, nn.ReLU()]), "b": nn.BatchNorm3d(2)})
    params = list(model.parameters())
    out = bnt.convert_model(model)
    assert out is model
    assert type(model["a"][0]) is bnt.BatchNorm2d and type(model["b"]) is bnt.BatchNorm3d
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    assert model["a"][0].running_mean.dtype == torch.float64
    single = bnt.convert_model(nn.BatchNorm1d(4, momentum=None, affine=False))
    assert type(single) is bnt.BatchNorm1d and single.momentum is None and single.weight is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet_training_matches_torch(channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    theirs = build_net(width=6, blocks=2).to(memory_format=fmt)
    ours = bnt.convert_model(copy.deepcopy(theirs))
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(8, 3, 8, 8, generator=g).to(memory_format=fmt)
        target = torch.randint(0, 10, (8,), generator=g)
        outs = []
        for model, opt in ((theirs, opt_t), (ours, opt_o)):
            opt.zero_grad()
            out = model(x)
            nn.functional.cross_entropy(out, target).backward()
            outs.append(out)
        assert_close(outs[1], outs[0], f"output at step {step}")
        for (name, pt), po in zip(theirs.named_parameters(), ours.parameters(), strict=True):
            assert_close(po.grad, pt.grad, f"{name}.grad at step {step}")
        opt_t.step()
        opt_o.step()
        for (name, bt), bo in zip(theirs.named_buffers(), ours.buffers(), strict=True):
            assert_close(bo.double(), bt.double(), f"{name} at step {step}")
    theirs.eval()
    ours.eval()
    x = torch.randn(5, 3, 8, 8, generator=g).to(memory_format=fmt)
    assert_close(ours(x), theirs(x), "eval output")


def folding_model():
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 1, groups=1), bnt.BatchNorm2d(4),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 3),
    )


def test_fold_batchnorm_equals_unfolded_eval_model():
    torch.manual_seed(0)
    model = folding_model()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                if m.affine:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    folded = fold_and_check(model)
    for key, value in before.items():  # the input model is left untouched
        assert torch.equal(model.state_dict()[key], value), key
    # BN after a ReLU stays; the three after Conv/Linear are gone.
    assert bn_types(folded) == [nn.BatchNorm2d]
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[9], nn.Identity)
    assert folded[0].bias is not None and folded[0].bias.requires_grad


def fold_and_check(model):
    folded = bnt.fold_batchnorm(model)
    x = torch.randn(4, 3, 9, 9)
    assert_close(folded(x), model(x), "folded output", atol=1e-5, rtol=1e-4)
    return folded


def test_fold_refuses_training_mode():
    model = folding_model()
    with pytest.raises(ValueError, match="eval mode"):
        bnt.fold_batchnorm(model)
    model.eval()
    model[4].train()
    with pytest.raises(ValueError, match="4"):
        bnt.fold_batchnorm(model)


def test_fold_skips_bn_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    folded = bnt.fold_batchnorm(model)
    assert isinstance(folded[1], nn.BatchNorm1d)


def test_fold_after_linear_refuses_input_where_the_fold_is_not_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))
    model(torch.randn(8, 5))               # some running statistics
    model.eval()
    folded = bnt.fold_batchnorm(model)
    x2 = torch.randn(4, 5)
    torch.testing.assert_close(folded(x2), model(x2), atol=1e-5, rtol=1e-5)
    # on (N, C, L) the BatchNorm1d normalizes axis 1 but the Linear acts on the last axis
    with pytest.raises(ValueError, match="exact only for \\(N, C\\) input"):
        folded(torch.randn(4, 5, 5))


def _randomize(model):
    """Running statistics and affine parameters away from their initial values."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                if m.affine:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)
    return model.eval()


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv and BN attributes called in forward."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                        nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _fold_report(model, x):
    folded, report = bnt.fold_batchnorm(model, report=True)
    assert_close(folded(x), model(x), "folded output", atol=1e-5, rtol=1e-4)
    return folded, report


def test_fold_finds_pairs_called_in_forward():
    model = _randomize(nn.Sequential(BasicBlock(3, 4, 2), BasicBlock(4, 4)))
    x = torch.randn(2, 3, 8, 8)
    folded = bnt.fold_batchnorm(model)
    assert bn_types(folded) == []  # before: none of the six was folded
    assert_close(folded(x), model(x), "folded output", atol=1e-5, rtol=1e-4)
    folded, report = _fold_report(model, x)
    assert report.traced and report.left == ()
    assert dict(report.folded) == {
        f"{b}.{bn}": f"{b}.{conv}" for b in ("0", "1")
        for bn, conv in (("bn1", "conv1"), ("bn2", "conv2"), ("downsample.1", "downsample.0"))}
    assert bn_types(folded) == []
    assert type(folded[0]) is BasicBlock  # the model keeps its classes and forward
    assert "folded 0.bn1 into 0.conv1" in str(report)


class SharedLinear(nn.Module):
    """One Linear used twice, each use with its own batch norm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn_a = nn.BatchNorm1d(4)
        self.bn_b = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn_a(self.lin(x)) + self.bn_b(self.lin(x * 2))


class Recurrent(nn.Module):
    """One conv and one batch norm applied twice: every use of the conv feeds that BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.bn(self.conv(x)))))


def test_fold_leaves_a_layer_used_twice_with_different_batch_norms():
    # before: both batch norms were folded into the one Linear, a silently wrong model
    lin = nn.Linear(4, 4)
    model = _randomize(nn.Sequential(lin, nn.BatchNorm1d(4), lin, nn.BatchNorm1d(4)))
    x = torch.randn(6, 4)
    assert_close(bnt.fold_batchnorm(model)(x), model(x), "folded output", atol=1e-5, rtol=1e-4)
    model = _randomize(SharedLinear())
    folded, report = _fold_report(model, torch.randn(6, 4))
    assert report.folded == ()
    assert {bn for bn, _ in report.left} == {"bn_a", "bn_b"}
    assert all("`lin` is called 2 times" in why for _, why in report.left)


def test_fold_handles_a_layer_and_batch_norm_used_together_twice():
    model = _randomize(Recurrent())
    folded, report = _fold_report(model, torch.randn(2, 3, 6, 6))
    assert report.folded == (("bn", "conv"),)


def test_fold_leaves_pairs_whose_layer_output_or_parameters_are_used_elsewhere():
    class PreActivation(nn.Module):  # the conv's output is also added to the result
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Tied(nn.Module):  # the conv's weight is shared with another conv
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.other = nn.Conv2d(3, 3, 1)
            self.other.weight = self.conv.weight
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.other(x)

    class ReadsWeight(nn.Module):  # forward reads the conv's weight itself
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) * self.conv.weight.sum()

    x = torch.randn(2, 3, 4, 4)
    for cls, reason in ((PreActivation, "also goes to function `add`"),
                        (Tied, "shares its parameters with other.weight"),
                        (ReadsWeight, "forward reads conv.weight directly")):
        _, report = _fold_report(_randomize(cls()), x)
        assert report.folded == () and len(report.left) == 1, cls.__name__
        assert reason in report.left[0][1], report.left[0][1]


def test_fold_reports_batch_norms_it_leaves_and_why():
    class Holder(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.unused = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.net(x)

    model = _randomize(Holder(nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4),   # after a ReLU
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
        nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6))))
    _, report = _fold_report(model, torch.randn(3, 3, 4, 4))
    assert report.folded == (("net.7", "net.6"),)
    left = dict(report.left)
    assert "its input comes from a ReLU" in left["net.2"]
    assert "no running statistics" in left["net.4"]
    assert left["unused"] == "forward never calls it"


def test_fold_falls_back_to_sequential_pairs_when_tracing_fails():
    class Branchy(nn.Module):  # control flow on a value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.shared = nn.Conv2d(3, 3, 1)
            self.tail = nn.Sequential(self.shared, nn.BatchNorm2d(3))
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.body(x)
            if y.sum() > 0:
                y = y + self.shared(x)
            return self.bn(self.tail(y))

    model = _randomize(Branchy())
    x = torch.randn(2, 3, 4, 4).abs()
    folded, report = _fold_report(model, x)
    assert not report.traced and "TraceError" in report.trace_error
    assert report.folded == (("body.1", "body.0"),)
    left = dict(report.left)
    assert "`shared` is registered 2 times (shared, tail.0)" in left["tail.1"]
    assert "does not follow a layer inside an nn.Sequential" in left["bn"]
    assert "could not be traced" in str(report)


def test_fold_without_report_returns_the_model():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    folded = bnt.fold_batchnorm(model)
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.Identity)
