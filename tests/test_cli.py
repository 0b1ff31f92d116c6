"""The command line: --help for each subcommand, and verify's table and exit status."""

import subprocess
import sys

import pytest

from batchnorm import cli


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "batchnorm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_top_level_help_lists_the_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in ("verify", "bench", "demo"):
        assert name in r.stdout


def test_verify_help():
    r = run_cli("verify", "--help")
    assert r.returncode == 0
    assert "--quick" in r.stdout and "--csv" in r.stdout


def test_missing_subcommand_is_a_usage_error():
    r = run_cli()
    assert r.returncode == 2


def test_verify_quick_prints_the_table_and_exits_zero(tmp_path):
    csv_path = tmp_path / "verify.csv"
    r = run_cli("verify", "--quick", "--csv", str(csv_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spatial nchw train" in r.stdout and "fd dx" in r.stdout
    assert "agree" in r.stdout
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("case,") and len(lines) > 10


def test_verify_one_layout():
    r = run_cli("verify", "--quick", "--layout", "nhwc", "--no-torch")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spatial nhwc train" in r.stdout and "nchw" not in r.stdout


def test_verify_exits_one_on_a_mismatch(monkeypatch, capsys):
    from batchnorm.cli import verify

    monkeypatch.setattr(verify, "TORCH_TOLERANCE", -1.0)   # every comparison now "fails"
    monkeypatch.setattr(verify, "FD_TOLERANCE", -1.0)
    assert cli.main(["verify", "--quick", "--no-torch"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bench", "demo"])  # real modules: options listed
def test_other_subcommands_have_help(name):
    r = run_cli(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "--threads" in r.stdout


def test_demo_quick_trains_three_models_and_saves_the_plot(tmp_path):
    plot = tmp_path / "curves.png"
    csv_path = tmp_path / "losses.csv"
    r = run_cli("demo", "--epochs", "1", "--quick", "--plot", str(plot), "--csv", str(csv_path),
                timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("batchnorm.torch", "torch.nn BN", "no BN", "test accuracy",
                 "BN layers / epoch", "time in the batch-norm layers"):
        assert name in r.stdout
    assert "agree within float32 tolerance" in r.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "step,batchnorm.torch,torch.nn BN,no BN" and len(rows) > 2


def test_demo_refuses_bad_options():
    r = run_cli("demo", "--epochs", "0", "--no-plot")
    assert r.returncode == 2
