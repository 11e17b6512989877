"""README and CI agree: the test command CI runs is the one README gives; README's links lead
somewhere; every figure in README's results table is in a current run block of RESULTS.md."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    # CI's line that installs the test extras and runs both suites is README's, verbatim
    [line] = [x for x in ci if "pytest" in x and "cargo test" in x]
    assert line.startswith('pip install ".[test]"') and line in readme()


def test_ci_runs_the_readme_gpu_check_dry_run() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash benches/gpu_check.sh --dry-run" in ci and "bash .ci/torch_floor.sh" in ci
    assert "bash benches/gpu_check.sh --dry-run OUT" in readme()
    assert "maturin build --release --out wheelhouse" in readme()


def test_ci_builds_the_docs_strictly_after_the_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    tests = next(i for i, x in enumerate(ci) if "pytest" in x and "cargo test" in x)
    build = next(i for i, x in enumerate(ci) if x.startswith("mkdocs build --strict"))
    assert build > tests


def test_readme_links_lead_to_files() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", readme())
    local = [x.split("#", 1)[0] for x in links if not re.match(r"[a-z]+:|#", x)]
    assert len(local) >= 15
    missing = [x for x in local if not (ROOT / x).exists()]
    assert not missing, missing


def results_table() -> List[List[str]]:
    """The cells of README's results table (header and separator left out)."""
    text = readme().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def current_results_text() -> str:
    spec = importlib.util.spec_from_file_location("_harness_for_readme",
                                                  ROOT / "benches" / "harness.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # its dataclasses look their module up
    spec.loader.exec_module(harness)
    text = (ROOT / "benches" / "RESULTS.md").read_text(encoding="utf-8")
    return "\n".join(block for _, block in harness.current_runs(text))


NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def test_readme_results_are_current_run_figures() -> None:
    """A figure in README's results table (its smallgpt and anchor columns; the first column
    describes the run) must appear in a current block of benches/RESULTS.md: a stale or
    hand-typed number fails here. A cell not measured yet is '—'."""
    rows = results_table()
    assert len(rows) >= 6 and all(len(r) == 4 for r in rows), rows
    blocks = current_results_text()
    stale = []
    for row in rows:
        for cell in row[1:3]:
            for num in NUMBER.findall(cell):
                if not re.search(rf"(?<![\d.]){re.escape(num)}(?![\d])", blocks):
                    stale.append(f"{num} ({row[0]})")
    assert not stale, f"not in a current run block of benches/RESULTS.md: {stale}"
