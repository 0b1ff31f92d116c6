"""Every citation of the contract in the code and docs points at a section that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "docs" / "contract.md"
# "contract §5", "contract §3 and §1", "docs/contract.md §5": every § number on such a line
CITE = re.compile(r"contract(?:\.md)?\)? §\d+(?:(?:,| and) §\d+)*")


def _sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", CONTRACT.read_text(), flags=re.M))


def _sources():
    for folder in ("src", "benchmarks", "examples", "tests", "docs"):
        yield from (ROOT / folder).rglob("*.py")
        yield from (ROOT / folder).rglob("*.md")
    yield ROOT / "README.md"


def test_every_citation_names_an_existing_section():
    sections = _sections()
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections
    missing, cited = [], 0
    for path in _sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for cite in CITE.findall(line):
                for num in re.findall(r"§(\d+)", cite):
                    cited += 1
                    if num not in sections:
                        missing.append(f"{path.relative_to(ROOT)}:{n}: §{num}")
    assert cited >= 20, "the citation pattern no longer matches how the code cites"
    assert not missing, "citations of sections that do not exist:\n" + "\n".join(missing)


def test_no_citation_of_a_document_outside_the_project():
    stale = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _sources() if path.name != "test_contract.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bSPEC\b", line)
    ]
    assert not stale, "cite docs/contract.md instead of SPEC: " + ", ".join(stale)
