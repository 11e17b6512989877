"""benches/harness.py: the measuring helpers the benches share (not their figures)."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest

# Loaded from its file: putting benches/ on sys.path would let its modules shadow others.
_spec = importlib.util.spec_from_file_location(
    "bench_harness", Path(__file__).resolve().parents[1] / "benches" / "harness.py"
)
assert _spec is not None and _spec.loader is not None
harness = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = harness  # dataclasses look their module up by name
_spec.loader.exec_module(harness)


def test_timed_passes_runs_each_pass_with_the_collector_off() -> None:
    seen = []

    def fn() -> int:
        seen.append(gc.isenabled())
        return len(seen)

    times, out = harness.timed_passes(fn, 3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert out == 3 and seen == [False, False, False]
    assert gc.isenabled()


def test_timed_passes_stops_once_the_budget_is_spent() -> None:
    times, out = harness.timed_passes(lambda: "x", 5, budget_s=0.0)
    assert len(times) == 1 and out == "x"


def test_run_measured_reports_the_commands_own_peak() -> None:
    # The parent holds 256 MiB: a fresh process must not inherit that as its floor.
    ballast = bytearray(b"x") * (256 << 20)
    small = harness.run_measured([sys.executable, "-c", "pass"], timeout_s=60)
    big = harness.run_measured(
        [sys.executable, "-c", "b = bytearray(b'x') * (128 << 20)"], timeout_s=60
    )
    del ballast
    assert small.ok and big.ok and small.error is None
    assert 0 < small.peak_mib < 100
    assert big.peak_mib >= 128


def test_run_measured_reports_failures_and_timeouts() -> None:
    failed = harness.run_measured(
        [sys.executable, "-c", "import sys; sys.exit('bad input here')"], timeout_s=60
    )
    assert failed.returncode == 1 and not failed.ok
    assert failed.error is not None and "bad input here" in failed.error
    stopped = harness.run_measured([sys.executable, "-c", "import time; time.sleep(600)"],
                                   timeout_s=1)
    assert stopped.returncode is None and stopped.error == "timeout"


def test_append_run_appends_a_block_and_can_only_print(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "RESULTS.md"
    harness.append_run("bench_x", "title", "| a |\n|---|\n| 1 |", threads=1, results=results,
                       record=False)
    assert not results.exists() and "## bench_x · title" in capsys.readouterr().out
    for body in ("first", "second"):
        harness.append_run("bench_x", "title", body, threads=1, results=results)
    runs = harness.parse_runs(results.read_text(encoding="utf-8"))
    assert [m["title"] for m, _ in runs] == ["title", "title"]
    [(meta, block)] = harness.current_runs(results.read_text(encoding="utf-8"))
    assert "second" in block and meta["bench"] == "bench_x"
