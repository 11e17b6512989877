"""README and CI agree: the test command CI runs is the one README gives."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    # CI's line that installs the test extras and runs both suites is README's, verbatim
    [line] = [x for x in ci if "pytest" in x and "cargo test" in x]
    assert line.startswith('pip install ".[test]"') and line in readme


def test_ci_runs_the_readme_gpu_check_dry_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash benches/gpu_check.sh --dry-run" in ci and "bash .ci/torch_floor.sh" in ci
    assert "bash benches/gpu_check.sh --dry-run OUT" in readme
    assert "maturin build --release --out wheelhouse" in readme
