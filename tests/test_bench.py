"""``batchnorm bench``: the judging of figures (fed impossible timings), the modes' plumbing,
the ResNet-50 it steps, the hook timer, and a tiny run of each mode.

Nothing here asserts a speed: the timings of the tiny runs are whatever the machine gives,
and the judging is tested on numbers made up to be impossible.
"""

import collections
import csv
import math

import pytest
import torch

from batchnorm import cli
from batchnorm.cli import _measure as M
from batchnorm.cli import bench, bench_layers
from batchnorm.cli.networks import RESNET50, resnet50, resnet50_shapes

RES = 1e-7  # a timer resolution for the pure checks


# ---- summaries and verdicts


def test_summary_order_statistics_and_spread():
    s = M.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.n, s.min, s.median, s.max) == (5, 1.0, 3.0, 5.0)
    assert s.spread == pytest.approx((4.0 - 2.0) / 3.0)
    assert math.isnan(M.summarize([1.0, 2.0]).spread)  # too few values to have one


def test_f_above_the_copy_limit_is_invalid():
    v = M.judge_f(46.0)
    assert v.status == "invalid" and "f = 46.00" in v.reasons[0]
    assert M.judge_f(1.1) == M.OK            # a little above 1 is cache effects
    for f in (0.0, -1.0, math.nan, math.inf):
        assert M.judge_f(f).status == "invalid"


def test_time_under_the_timer_resolution_is_invalid():
    s = M.summarize([2e-8] * 10)
    v = M.judge_times(s, interval=2e-8, resolution=1e-8)
    assert v.status == "invalid" and "timer ticks" in v.reasons[0]
    # the same per-call time averaged over a long enough batch is a measurement
    assert M.judge_times(s, interval=2e-8 * 10_000, resolution=1e-8) == M.OK


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.inf, math.nan])
def test_non_positive_or_non_finite_time_is_invalid(bad):
    s = M.summarize([1e-3, 1e-3, bad])
    assert M.judge_times(s, interval=1e-3, resolution=RES).status == "invalid"


def test_spread_sorts_figures_into_ok_noisy_invalid():
    tight = M.summarize([1.00, 1.01, 0.99, 1.00, 1.02])
    wobbly = M.summarize([1.0, 1.2, 0.9, 1.1, 1.0])
    wild = M.summarize([1.0, 5.0, 0.1, 3.0, 0.5])
    assert M.judge_times(tight, interval=1, resolution=RES) == M.OK
    v = M.judge_times(wobbly, interval=0.9, resolution=RES)
    assert v.status == "noisy" and "target" in v.reasons[0]
    v = M.judge_times(wild, interval=0.1, resolution=RES)
    assert v.status == "invalid" and "spread" in v.reasons[0]
    assert M.judge_times(M.summarize([1.0, 1.0]), interval=1, resolution=RES).status == "noisy"


def test_ratios_spanning_orders_of_magnitude_are_invalid():
    # what a busy machine once made of the kernels bench: 0.00x to 565x
    v = M.judge_ratios(M.summarize([0.001, 1.2, 565.0, 1.3, 1.1]))
    assert v.status == "invalid" and "span" in v.reasons[0]
    assert M.judge_ratios(M.summarize([1.5, 1.52, 1.49, 1.51])) == M.OK
    # over many rounds, one stall each way does not void the rest
    assert M.judge_ratios(M.summarize([1.2] * 98 + [0.001, 565.0])) == M.OK
    assert M.judge_ratios(M.summarize([1.0, math.inf, 1.0])).status == "invalid"


def test_combine_keeps_the_worst_status_and_its_reasons():
    noisy, bad = M.Verdict("noisy", ("a",)), M.Verdict("invalid", ("b",))
    assert M.combine([M.OK, noisy, bad]) == M.Verdict("invalid", ("b",))
    assert M.combine([M.OK, noisy]) == noisy
    assert M.combine([]) == M.OK
    assert str(bad) == "INVALID: b" and bad.brief() == "INVALID: b" and noisy.brief() == "noisy"
    assert M.Verdict("invalid", ("b", "c")).brief() == "INVALID: b (+1 more)"


def test_a_total_with_an_invalid_part_is_invalid():
    v = M.total_verdict([M.OK, M.Verdict("noisy", ("x",)), M.Verdict("invalid", ("y",))])
    assert v == M.Verdict("invalid", ("1 of 3 layers invalid",))
    assert M.total_verdict([M.OK, M.Verdict("noisy", ("x",))]).status == "noisy"
    assert M.total_verdict([M.OK, M.OK]) == M.OK


def test_verdict_survives_a_csv_row():
    v = M.Verdict("invalid", ("f = 46.00 > 1.2", "ratio spread 90% > 50%"))
    assert M.from_fields(M.as_fields(v)) == v
    assert M.from_fields(M.as_fields(M.OK)) == M.OK


# ---- the interleaving loop, with steps that return made-up seconds


def test_interleave_alternates_and_stops_once_stable():
    order = []

    def step(name, value):
        def f():
            order.append(name)
            return value
        return f

    out = M.interleave({"a": step("a", 1.0), "b": step("b", 2.0)}, min_rounds=4,
                       max_rounds=50, budget_s=60, pairs=[("a", "b")])
    assert out == {"a": [1.0] * 4, "b": [2.0] * 4}
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_interleave_goes_on_while_noisy_until_the_round_limit():
    values = iter([1.0, 3.0] * 100)
    out = M.interleave({"a": lambda: next(values)}, min_rounds=3, max_rounds=12,
                       budget_s=60)
    assert len(out["a"]) == 12
    # an unwatched series does not hold the loop up
    values = iter([1.0, 3.0] * 100)
    out = M.interleave({"a": lambda: 1.0, "copy": lambda: next(values)}, min_rounds=3,
                       max_rounds=12, budget_s=60, watch=["a"])
    assert len(out["a"]) == 3


def test_batched_sizes_the_batch_from_the_step():
    calls = []

    def step():
        calls.append(1)
        return 1e-3

    mean, n = M.batched(step, min_s=5e-3)
    assert n == 5 and len(calls) == 2         # two warm-up calls size it
    assert mean() == pytest.approx(1e-3) and len(calls) == 7


def test_budget_shares_what_is_left_among_the_parts_to_come():
    shares = M.Budget(100.0, 4)
    assert 24.0 < shares.share() <= 25.0     # nothing spent yet: a quarter
    assert M.Budget(0.0, 3).share() == 0.0


# ---- impossible timings through the modes' reporting


def test_layers_mode_reports_impossible_timings_as_invalid(monkeypatch, capsys, tmp_path):
    pair = bench_layers.PAIRS["bn"]

    def fake_interleave(steps, **kw):
        # ours at 1 ns a call against a 1 ms copy: f in the millions; torch swinging 500x
        return {"copy": [1e-3] * 5, pair.ours: [1e-9] * 5,
                pair.theirs: [1e-4, 5e-2, 1e-4, 1e-4, 1e-4]}

    monkeypatch.setattr(M, "interleave", fake_interleave)
    path = tmp_path / "layers.csv"
    assert cli.main(["bench", "--only", "8x2048x4x4", "--layout", "nchw", "--pass", "train",
                     "--reps", "3", "--budget", "0", "--threads", "1",
                     "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "INVALID" in out  # table cells may wrap: the reasons are checked in the CSV
    rows = list(csv.DictReader(path.open()))
    layer = [r for r in rows if r["shape"] == "8x2048x4x4"]
    ours = next(r for r in layer if r["provider"] == pair.ours)
    for reason in ("timer ticks", "faster than a copy", "ratios span"):
        assert reason in ours["reason"]
    total = [r for r in rows if r["shape"] == "total"]
    assert {r["status"] for r in layer} == {"invalid"} and len(layer) == 2
    assert len({r["reason"] for r in layer}) == 1   # both rows carry the pair's verdict
    assert {r["status"] for r in total} == {"invalid"}
    assert all(r["speedup"] == "nan" for r in total)   # no speed-up from invalid layers


def test_layers_rows_and_total_from_plausible_timings():
    pair = bench_layers.PAIRS["bn"]
    shapes = resnet50_shapes(8, 128)[:2]
    results = [bench_layers._Result(8, 128, "nchw", "train", shape, n,
                                    {pair.ours: [k * 1e-3, k * 1.01e-3, k * 0.99e-3],
                                     pair.theirs: [2e-3, 2.02e-3, 1.98e-3]}, 0.2e-3,
                                    4 * math.prod(shape), {})
               for (shape, n), k in zip(shapes, (1.0, 1.6), strict=True)]

    class Args:
        dtype, threads, after_conv = "float32", 2, False

    rows = bench_layers._rows(results, pair, Args, resolution=RES)
    layer = next(r for r in rows if r["provider"] == pair.ours and r["shape"] != "total")
    assert layer["f"] == pytest.approx(0.5)          # 5 bytes(x) / (t B_copy), 2 t_copy = t
    assert layer["speedup"] == pytest.approx(2.0) and layer["status"] == "ok"
    assert layer["copy_gbs"] == pytest.approx(8 * math.prod(shapes[0][0]) / 0.2e-3 / 1e9)
    total = next(r for r in rows if r["shape"] == "total" and r["provider"] == pair.ours)
    (_, n0), (shape1, n1) = shapes
    assert total["count"] == n0 + n1 == RESNET50[0][1] + RESNET50[1][1]
    assert total["speedup"] == pytest.approx(2e-3 * (n0 + n1) / (1e-3 * n0 + 1.6e-3 * n1))
    assert total["worst_shape"] == f"{'x'.join(map(str, shape1))} (1.25x)"
    assert total["status"] == "ok"


def test_kernels_mode_reports_impossible_timings_as_invalid(monkeypatch, capsys, tmp_path):
    def fake_interleave(steps, **kw):
        # a copy stalled 1000x (f = 46 style) and a reference that is fine
        out = {k: [1e-5, 1.01e-5, 0.99e-5] for k in steps}
        out["copy"] = [1e-2] * 3
        return out

    monkeypatch.setattr(M, "interleave", fake_interleave)
    path = tmp_path / "kernels.csv"
    assert cli.main(["bench", "--kernels", "--group", "tiny", "--layout", "nchw", "--pass",
                     "fwd", "--reps", "3", "--budget", "0", "--no-cold-start",
                     "--threads", "1", "--csv", str(path)]) == 0
    assert "INVALID" in capsys.readouterr().out
    rows = {r["provider"] + " " + r["alloc"]: r for r in csv.DictReader(path.open())}
    assert rows["reference fresh"]["status"] != "invalid"   # no f judged for the reference
    for key in ("batchnorm-cpu prealloc", "batchnorm-cpu fresh", "torch fresh"):
        assert rows[key]["status"] == "invalid"
        assert rows[key]["reason"] == "f = 1000.00 > 1.2: faster than a copy of its bytes"


def test_train_rows_judge_the_bn_time_and_the_ratios():
    from batchnorm.cli import bench_train

    class Timer:
        modules = 53

    class Args:
        threads = 2

    ours, theirs = ("batchnorm.torch", "nchw"), ("torch.nn", "nchw")
    bn = {ours: [0.01, 0.0101, 0.0099, 0.01], theirs: [0.02, 0.0202, 0.0198, 0.02]}
    rec = {k: {"step": [0.2, 0.2, 0.2, 0.2], "fwd": [v[0] / 2] * 4, "bwd": [v[0] / 2] * 4}
           for k, v in bn.items()}
    rows = bench_train._rows(bn, rec, {ours: Timer, theirs: Timer}, [(theirs, ours)], 8, 128,
                             Args)
    assert rows[0]["bn_time_ratio"] == pytest.approx(0.5) and rows[0]["status"] == "ok"
    bn[ours] = [0.001, 0.01, 0.5, 0.01]   # the step's noise inside the BN time: no ratio
    rows = bench_train._rows(bn, rec, {ours: Timer, theirs: Timer}, [(theirs, ours)], 8, 128,
                             Args)
    assert rows[0]["status"] == "invalid" and "BN ratio" in rows[0]["reason"]
    assert rows[1]["status"] == "invalid"   # the pair's verdict: torch.nn's row too


# ---- the network and the hook timer


def test_resnet50_is_the_standard_one():
    model = resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    seen = collections.Counter()
    bns = M.bn_modules(model)
    for m in bns:
        m.register_forward_pre_hook(lambda _m, inputs: seen.update([tuple(inputs[0].shape)]))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert len(bns) == 53
    assert sorted(seen.items()) == sorted(resnet50_shapes(1, 64))


def test_module_timer_brackets_forward_and_backward(monkeypatch):
    events = []

    class Traced(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            events.append("forward")
            return x * 2

        @staticmethod
        def backward(ctx, g):
            events.append("backward")
            return g * 2

    class Layer(torch.nn.BatchNorm2d):
        def forward(self, x):
            return Traced.apply(x)

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), Layer(2), torch.nn.Conv2d(2, 1, 1))
    timer = M.ModuleTimer(M.bn_modules(net))
    for name in ("_start_backward", "_end_backward"):
        original = getattr(timer, name)
        monkeypatch.setattr(timer, name,
                            lambda key, n=name, f=original: (events.append(n), f(key)))
    net(torch.randn(2, 1, 3, 3)).sum().backward()
    assert events == ["forward", "_start_backward", "backward", "_end_backward"]
    assert timer.modules == 1 and timer.forward > 0 and timer.backward > 0
    timer.reset()
    assert timer.forward == timer.backward == 0
    timer.remove()
    net(torch.randn(2, 1, 3, 3)).sum().backward()
    assert timer.forward == 0


# ---- the command line


def test_bench_help_lists_modes_and_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--layers", "--kernels", "--train", "--compile", "--sync", "--quick",
                 "--threads", "--after-conv", "--pair", "--budget", "--only",
                 "--compile-backend", "--fused", "--processes"):
        assert flag in out


def test_an_option_the_mode_does_not_read_is_a_usage_error(capsys):
    assert cli.main(["bench", "--train", "--only", "x64x"]) == 2
    assert "does not read --only" in capsys.readouterr().out
    assert cli.main(["bench", "--kernels", "--after-conv"]) == 2
    assert cli.main(["bench", "--pass", "bwd", "--only", "x2048x"]) == 2  # layers: no bwd
    assert cli.main(["bench", "--reps", "2", "--only", "x2048x"]) == 2    # no spread
    assert cli.main(["bench", "--threads", "0", "--only", "x2048x"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--train", "--kernels"])  # one mode at a time


def test_every_mode_is_registered_with_a_runner():
    import importlib

    for mode in bench.MODES.values():
        assert callable(getattr(importlib.import_module(mode.module), mode.function))


def test_layers_tiny_run(capsys, tmp_path):
    path = tmp_path / "layers.csv"
    assert cli.main(["bench", "--only", "8x2048x4x4", "--layout", "nhwc", "--reps", "3",
                     "--budget", "0", "--threads", "1", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "batch 8, 128x128, nhwc, train" in out and "network total" in out
    rows = list(csv.DictReader(path.open()))
    assert {(r["provider"], r["pass_"], r["shape"]) for r in rows} == {
        (p, q, s) for p in ("batchnorm.torch.BatchNorm2d", "torch.nn.BatchNorm2d")
        for q in ("train", "inf") for s in ("8x2048x4x4", "total")}
    assert all(r["device"] and "torch" in r["versions"] for r in rows if r["shape"] != "total")


def test_layers_after_conv_tiny_run(capsys):
    assert cli.main(["bench", "--only", "8x2048x4x4", "--layout", "nchw", "--pass", "fwd",
                     "--reps", "3", "--budget", "0", "--threads", "1", "--after-conv"]) == 0
    assert "after a depthwise convolution" in capsys.readouterr().out


def test_kernels_tiny_run(capsys, tmp_path):
    path = tmp_path / "kernels.csv"
    assert cli.main(["bench", "--kernels", "--group", "tiny", "--layout", "nchw", "--pass",
                     "inf", "--reps", "3", "--budget", "0", "--no-cold-start", "--threads", "1",
                     "--csv", str(path)]) == 0
    assert "per shape" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert {r["provider"] for r in rows} == {"batchnorm-cpu", "torch", "reference"}
    assert all(r["status"] in ("ok", "noisy", "invalid") for r in rows)


def test_train_tiny_run(capsys, tmp_path):
    path = tmp_path / "train.csv"
    assert cli.main(["bench", "--train", "--batch", "2", "--image", "32", "--layout", "nchw",
                     "--reps", "3", "--budget", "0", "--warmup", "1", "--threads", "1",
                     "--csv", str(path)]) == 0
    assert "batchnorm bench --train: ResNet-50, batch 2, 32x32" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert [r["provider"] for r in rows] == ["batchnorm.torch", "torch.nn"]
    assert all(int(r["bn_modules"]) == 53 and float(r["bn_ms"]) > 0 for r in rows)


def test_train_fused_times_the_same_chains_in_both_models(capsys, tmp_path):
    from batchnorm.cli import bench_train

    base = resnet50(classes=10)
    models = bench_train._models(base, fused=True)
    theirs, ours = models["torch.nn"], models["batchnorm.torch fused"]
    # 49 chains (BN + ReLU, BN + add + ReLU) and the 4 downsampling BNs, in both models
    unfused = [m for m in bench_train.timed_modules(theirs) if hasattr(m, "activation")]
    assert len(unfused) == 49 and len(bench_train.timed_modules(theirs)) == 53
    assert all(type(m.bn) is torch.nn.BatchNorm2d for m in unfused)
    assert len(bench_train.timed_modules(ours)) == 53
    assert {type(m).__name__ for m in bench_train.timed_modules(ours)} == {"BatchNormAct2d",
                                                                          "BatchNorm2d"}
    # torch.nn's grouped model computes what the network computes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(x), base.eval()(x))

    path = tmp_path / "fused.csv"
    assert cli.main(["bench", "--train", "--fused", "--batch", "2", "--image", "32",
                     "--layout", "nhwc", "--reps", "3", "--budget", "0", "--warmup", "1",
                     "--threads", "1", "--csv", str(path)]) == 0
    assert "time inside BN, the residual add and ReLU" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert [r["provider"] for r in rows] == ["batchnorm.torch fused", "torch.nn"]
    assert all(r["timed"] == "bn+add+relu" and int(r["bn_modules"]) == 53 for r in rows)


def test_sync_rows_take_the_collectives_out_of_the_ratio():
    from batchnorm.cli import bench_sync

    times = {"sync": [0.011, 0.0112, 0.0108], "local": [0.004, 0.004, 0.004],
             "torch": [0.005, 0.005, 0.005], "collectives": [0.006, 0.006, 0.006]}
    results = [dict(shape=[8, 64, 8, 8], count=3, layout="nchw", times=times)]
    rows = bench_sync._rows(results, 2, 1)
    assert [r["shape"] for r in rows] == ["8x64x8x8", "total"]
    assert rows[0]["beyond_collectives_ratio"] == pytest.approx(1.25)
    assert rows[0]["sync_over_torch"] == pytest.approx(2.2)
    assert rows[1]["sync_ms"] == pytest.approx(3 * 11.0) and rows[0]["status"] == "ok"
    times["collectives"] = [0.02, 0.006, 0.006]  # a collective slower than the whole call
    rows = bench_sync._rows(results, 2, 1)
    assert rows[0]["status"] == "invalid" and rows[1]["status"] == "invalid"


def test_sync_tiny_run(capsys, tmp_path):
    path = tmp_path / "sync.csv"
    assert cli.main(["bench", "--sync", "--batch", "2", "--image", "16", "--only", "x2048x",
                     "--layout", "nchw", "--reps", "3", "--threads", "2", "--csv",
                     str(path)]) == 0
    assert "SyncBatchNorm forward + backward on 2 gloo processes" in capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert [r["shape"] for r in rows] == ["2x2048x1x1", "total"]
    assert all(float(r["sync_ms"]) > 0 and float(r["collectives_ms"]) > 0 for r in rows)


def test_compile_tiny_run(capsys):
    assert cli.main(["bench", "--compile", "--compile-backend", "aot_eager", "--batch", "4",
                     "--image", "8", "--width", "4", "--blocks", "1", "--layout", "nchw",
                     "--reps", "3", "--budget", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "aot_eager" in out and "eager" in out
