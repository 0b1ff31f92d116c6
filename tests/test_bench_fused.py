"""The fused forms' benchmarks: ``bench --layers --pair bn_relu / bn_add_relu`` and
``bench --memory`` (tiny runs; the figures themselves are the benchmarks' business)."""

import csv

import pytest
import torch

from batchnorm import cli
from batchnorm.cli import bench_layers, bench_memory


@pytest.mark.parametrize("pair", ["bn_relu", "bn_add_relu"])
def test_fused_pairs_compute_the_same_as_torch(pair):
    """Both providers of a pair compute the same function (else the timing compares
    different work)."""
    p = bench_layers.PAIRS[pair]
    ours, theirs = p.build_ours(4), p.build_theirs(4)
    with torch.no_grad():
        for t in (theirs.bn.weight if pair == "bn_add_relu" else theirs[0].weight,
                  ours.weight):
            t.copy_(torch.linspace(-1.5, 1.5, 4))
    xs = [torch.randn(2, 4, 3, 3) for _ in range(p.inputs)]
    outs = []
    for m in (ours, theirs):
        leaves = [x.clone().requires_grad_() for x in xs]
        y = m(*[x * 1 for x in leaves])
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), *(x.grad for x in leaves)])
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pair", ["bn_relu", "bn_add_relu"])
def test_fused_pair_tiny_run(capsys, tmp_path, pair):
    path = tmp_path / "layers.csv"
    assert cli.main(["bench", "--pair", pair, "--only", "8x2048x4x4", "--layout", "nhwc",
                     "--pass", "train", "--reps", "3", "--budget", "0", "--threads", "1",
                     "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert bench_layers.PAIRS[pair].theirs in out and "network total" in out
    rows = list(csv.DictReader(path.open()))
    p = bench_layers.PAIRS[pair]
    assert {r["provider"] for r in rows} == {p.ours, p.theirs}
    assert all(float(r["median_ms"]) > 0 for r in rows)  # both ran: no provider raised


def test_held_bytes_counts_each_storage_once():
    x = torch.randn(4, 5, requires_grad=True)

    def model(t):
        return (t.exp() * t).sin()  # exp saves its output, mul both inputs, sin its input

    nbytes, count, _ = bench_memory.held_bytes(model, x)
    assert count == 3 and nbytes == 3 * 4 * 5 * 4  # x, exp(x), exp(x) * x


def test_memory_tiny_run(capsys, tmp_path):
    """Activation tensors a block: torch.nn 3, torch.nn with LeakyReLU(inplace) 2, ours out
    of place 2, ours in place 1 (plus the stack's input, which the first block keeps)."""
    path = tmp_path / "memory.csv"
    assert cli.main(["bench", "--memory", "--batch", "4", "--image", "8", "--depth", "4",
                     "--layout", "nchw", "--threads", "1", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "target at least 40% less: met" in out
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    tensor = 4 * 64 * 8 * 8 * 4
    for provider, per_block in (("torch.nn", 3), ("torch.nn inplace", 2), ("ours", 2),
                                ("ours inplace", 1)):
        held = float(rows[provider]["held_mib"]) * 2**20
        assert per_block * 4 * tensor <= held < (per_block * 4 + 1.5) * tensor, provider
        assert rows[provider]["matches_torch_nn"] == "True"


def test_memory_options():
    assert cli.main(["bench", "--memory", "--depth", "0"]) == 2
    assert cli.main(["bench", "--layers", "--depth", "3"]) == 2  # not the layers mode's


def test_memory_check_catches_a_different_computation(monkeypatch):
    real = bench_memory.build

    def wrong_slope(provider, depth, dtype, memory_format):
        model = real(provider, depth, dtype, memory_format)
        if provider == "ours":
            model[1].negative_slope = 0.02
        return model

    monkeypatch.setattr(bench_memory, "build", wrong_slope)
    assert bench_memory.same_function("ours inplace", 2, torch.contiguous_format)
    assert not bench_memory.same_function("ours", 2, torch.contiguous_format)
