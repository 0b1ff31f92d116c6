"""Every ```python block in the README runs (in order, each in a fresh namespace)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # blocks that write files write them here
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})


# The README points at the code line of each formula; these fragments must be on those lines.
FORMULA_CODE = {
    "mu = sum(x) / M": "x64.mean(",
    "var = sum((x - mu)^2) / M": "var = m2 / m",
    "invstd = 1 / sqrt(var + eps)": "denom == 0",
    "y = gamma * (x - mu) * invstd + beta": "* xhat + _param(beta",
    "running_var = (1 - m) running_var + m var M / (M - 1)": "m / (m - 1)",
    "dbeta = sum(dy)": "g.sum(axis=axes)",
    "dgamma = sum(dy * xhat)": "(g * xhat).sum(",
    "dx = gamma invstd (dy - (dbeta + xhat dgamma) / M)": "(sum_g + xhat * sum_gx) / count",
}


def test_formula_links_point_at_their_code():
    rows = re.findall(r"^\| `([^`]+)`.*\]\((src/[^#)]+)#L(\d+)\) \|$", README.read_text(), re.M)
    assert {r[0] for r in rows} == set(FORMULA_CODE)
    for formula, path, line in rows:
        text = (README.parent / path).read_text().splitlines()[int(line) - 1]
        assert FORMULA_CODE[formula] in text, f"{formula}: {path} line {line} is {text!r}"
