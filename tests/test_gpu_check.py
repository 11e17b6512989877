"""benches/gpu_check.py's pieces that need no GPU: its test selection stays whole, its
summaries count right. (`bash benches/gpu_check.sh --dry-run OUT` itself runs in .ci/run.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import gpu_check  # noqa: E402
import gpu_train  # noqa: E402


def test_every_file_with_device_tests_is_run_by_the_gpu_check() -> None:
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.device\b", p.read_text(encoding="utf-8"))}
    assert marked == set(gpu_check.DEVICE_TEST_FILES)


def test_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="7" failures="1" errors="1" '
                   'skipped="2"></testsuite></testsuites>')
    assert gpu_check.junit_counts(xml) == {"passed": 3, "failed": 1, "errors": 1,
                                           "skipped": 2}
    assert gpu_check.junit_counts(tmp_path / "none.xml") == {}


def test_run_figures_from_metrics(tmp_path: Path) -> None:
    lines = [f'{{"step": {s}, "loss": {10 - s * 0.5}, "tokens": {s * 100}, '
             f'"tokens_per_sec": {1000 + s}, "mfu": {0.1 * s if s != 5 else "null"}}}'
             for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "final": true}\n')
    got = gpu_train.summarize(tmp_path / "metrics.jsonl", {"peak_mem_gib": 1.5})
    assert got["steps"] == 7 and got["tokens_per_step"] == 100 and got["warm_steps"] == 4
    assert got["tokens_per_s"] == 1005.5  # median of steps 4-7
    assert abs(got["mfu"] - 0.6) < 1e-9  # median of 0.4, 0.6, 0.7 (step 5: unknown)
    assert got["loss_first"] == 9.5 and got["loss_last"] == 7.0 and got["loss_fell"]
    assert got["peak_mem_gib"] == 1.5
    flat = gpu_train.summarize(tmp_path / "missing.jsonl", {})
    assert flat["steps"] == 0 and flat["tokens_per_s"] is None and not flat["loss_fell"]
