"""The graph-pattern helpers that model surgery is built on (batchnorm.torch._fx)."""

import operator

import torch
from torch import nn

from batchnorm.torch import BatchNorm2d, _fx


class Block(nn.Module):
    """A torchvision-style block: BN -> ReLU, and BN -> add -> ReLU at its end."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 1), BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn3 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + x)
        skip = self.bn3(x)  # used twice: no chain may take it
        return out + self.relu(skip) + skip


def _is_bn(traced):
    return lambda n: traced.is_call(n, nn.modules.batchnorm._BatchNorm)


def _is_relu(traced):
    return lambda n: traced.is_call(n, nn.ReLU) or n.target in (torch.relu, nn.functional.relu)


def test_trace_keeps_batch_norms_whole_and_records_calls():
    traced = _fx.trace(Block())
    assert traced.error is None
    assert set(traced.calls) == {"conv1", "bn1", "relu", "conv2", "bn2", "bn3"}
    assert len(traced.calls["relu"]) == 2
    assert isinstance(traced.module(traced.calls["bn1"][0]), BatchNorm2d)


def test_chains_find_bn_relu_and_bn_add_relu_where_each_link_is_the_only_use():
    traced = _fx.trace(Block())
    bn_relu = traced.chains(_is_bn(traced), _is_relu(traced))
    assert [tuple(n.target for n in c) for c in bn_relu] == [("bn1", "relu")]
    is_add = lambda n: n.op == "call_function" and n.target in (operator.add, torch.add)  # noqa: E731
    bn_add_relu = traced.chains(_is_bn(traced), is_add, _is_relu(traced))
    assert [c[0].target for c in bn_add_relu] == ["bn2"]
    assert _fx.describe(bn_add_relu[0][1]) == "function `add`"


def test_untraceable_model_says_why():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    traced = _fx.trace(Branchy())
    assert traced.graph is None and traced.error.startswith("TraceError")


def test_paths_shared_parameters_and_replace():
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.Sequential(conv), nn.Conv2d(3, 3, 1))
    assert _fx.paths(model, conv) == ["0", "1.0"]
    model[2].weight = conv.weight
    assert _fx.shared_parameters(model, model[2]) == ["0.weight", "1.0.weight"]
    _fx.replace(model, "1.0", nn.Identity())
    assert isinstance(model[1][0], nn.Identity) and model[0] is conv


def test_models_defined_in_this_package_are_traced_through():
    # The CLI's networks live in batchnorm.cli: only batchnorm.torch's layers are opaque.
    from batchnorm.cli.networks import build_net

    traced = _fx.trace(build_net(width=4, blocks=1))
    assert {"1.0.conv1", "1.0.bn1", "1.0.bn2", "1.0.relu"} <= set(traced.calls)
