"""benchmarks/gpu.py, the device command, in the parts that run without a GPU: its options,
its time budget, its report writers, and its correctness check (under the interpreter)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from batchnorm.backends import gpu  # noqa: E402

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
_spec = importlib.util.spec_from_file_location("gpu_benchmark", _PATH)
B = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = B  # dataclasses look their module up there
_spec.loader.exec_module(B)


def test_options():
    a = B.parse_args([])
    assert a.batches == [32, 256] and a.dtypes == ["float16", "float32", "bfloat16"]
    assert a.layouts == ["nchw", "nhwc"] and a.budget == 210
    assert B.parse_args(["--quick"]).batches == [32]
    assert B.parse_args(["--dtypes", "float32", "--layouts", "nhwc"]).dtypes == ["float32"]
    for bad in (["--dtypes", "float64"], ["--layouts", "nwhc"], ["--budget", "0"]):
        with pytest.raises(SystemExit) as exc:
            B.parse_args(bad)
        assert exc.value.code == 2


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_budget_stops_timing_cleanly():
    """Groups run in priority order until the budget is spent; a group the budget stops
    part-way contributes no rows; everything not completed is reported as skipped."""
    clock = FakeClock()
    budget = B.Budget(10.0, clock=clock)
    todo = B.groups([32, 256], ["float16", "float32", "bfloat16"], ["nchw", "nhwc"])
    assert [(g.dtype, g.batch, g.layout) for g in todo[:3]] == [
        ("float16", 32, "nchw"), ("float16", 32, "nhwc"), ("float16", 256, "nchw")]
    seen = []

    def time_group(grp, budget_):
        seen.append(grp)
        clock.now += 4.0  # each group takes 4 s
        if budget_.spent():  # the budget ran out inside this group
            return None
        return [dict(dtype=grp.dtype, batch=grp.batch, layout=grp.layout, count=1,
                     pass_="forward", provider=p, median_us=t)
                for p, t in (("ours", 1.0), ("torch", 2.0), ("copy", 0.5))]

    lines = []
    rows, skipped = B.run_groups(todo, time_group, budget, progress=lines.append)
    assert len(seen) == 3           # 4 s, 8 s, then the third passes 10 s part-way
    assert len(rows) == 6 and skipped == todo[2:]
    assert len(lines) == 2 and "2.00x torch" in lines[0]


ROWS = [
    # one group, two layer shapes (counts 1 and 3), forward and backward
    *(dict(dtype="float16", batch=32, layout="nchw", pass_=p, provider=prov, count=n,
           median_us=t) for p, n, prov, t in [
        ("forward", 1, "ours", 10.0), ("forward", 1, "torch", 20.0),
        ("forward", 1, "copy", 9.0), ("forward", 3, "ours", 5.0),
        ("forward", 3, "torch", 5.0), ("forward", 3, "copy", 4.0),
        ("backward", 1, "ours", 30.0), ("backward", 1, "torch", 45.0),
        ("backward", 1, "copy", 18.0)]),
]


def test_network_totals_and_targets():
    tot = B.network_totals(ROWS)
    fwd = tot[("float16", 32, "nchw", "forward")]
    assert fwd["ours"] == 25.0 and fwd["torch"] == 35.0 and fwd["copy_min"] == 21.0
    bwd = tot[("float16", 32, "nchw", "backward")]
    assert bwd["copy_min"] == 27.0  # backward's minimum is 1.5 copies of x
    misses = B.target_misses(ROWS)
    # forward: f = 21 / 25 = 0.84 < 0.85, 1.4x torch; backward: f = 0.9, 1.5x torch
    assert len(misses) == 1 and "forward" in misses[0] and "f 0.84" in misses[0]


def test_markdown_table_and_csv(tmp_path):
    md = B.markdown_table(ROWS, "header line")
    lines = md.splitlines()
    assert lines[0] == "header line" and lines[2].startswith("| dtype |")
    assert "| float16 | 32 | nchw | forward | 0.025 | 0.035 | 0.021 | 0.84 | 0.60 | 1.40x |" \
        in lines
    path = tmp_path / "rows.csv"
    B.write_csv(ROWS, path, {"device": "X"})
    text = path.read_text().splitlines()
    assert text[0].endswith(",device") and len(text) == len(ROWS) + 1


SPLIT = (("PERSISTENT_MAX_ELEMS", 0), ("PERSISTENT_MAX_ELEMS_CL", 0), ("TILE_ELEMS", 16),
         ("CL_BLOCK_C", 4), ("FINALIZE_BLOCK_S", 2))  # tiny inputs take the split kernels


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_check_passes_and_reaches_every_kernel(monkeypatch):
    """Every kernel, the fused forms' too; two of the three dtypes (the interpreter is slow;
    the dtype does not change which kernels run)."""
    shapes, dtypes = ((2, 4, 3, 3),), ("float16", "bfloat16")
    first = B.check("cpu", shapes=shapes, dtypes=dtypes)
    assert first.mismatches == []
    assert first.missed  # the persistent kernels alone on this shape
    assert {("forward add_relu", "persistent"),
            ("backward leaky_relu_in_place", "persistent")} <= first.reached
    with monkeypatch.context() as m:
        for name, value in SPLIT:
            m.setattr(gpu, name, value)
        second = B.check("cpu", shapes=shapes, dtypes=dtypes)
    assert second.mismatches == []
    first.reached |= second.reached
    assert first.ok and not first.missed


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_check_reports_a_wrong_kernel(monkeypatch):
    real = gpu.forward_inference
    monkeypatch.setattr(gpu, "forward_inference", lambda *a, **k: real(*a, **k) * 1.01)
    res = B.check("cpu", shapes=((2, 4, 3, 3),), dtypes=("float32",), layouts=("nchw",))
    assert len(res.mismatches) == 1 and res.mismatches[0].startswith("inference y")
    assert not res.ok


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_check_reports_a_wrong_fused_kernel(monkeypatch):
    real = gpu.backward

    def wrong_dz(*a, **k):
        out = real(*a, **k)
        return (*out[:3], out[3] * 1.01) if k.get("residual") else out

    monkeypatch.setattr(gpu, "backward", wrong_dz)
    res = B.check("cpu", shapes=((2, 4, 3, 3),), dtypes=("float32",), layouts=("nchw",))
    assert [m.split(" (")[0] for m in res.mismatches] == ["add_relu dz"]
