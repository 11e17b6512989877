"""What every bench shares: the machine, the commit, tables, mean and spread, and RESULTS.md.

A bench measures our code and its anchors in one invocation, prints a Markdown table, and
appends one *run block* to ``benches/RESULTS.md`` through :func:`append_run`. A block is::

    ## <bench> · <title>
    <!-- smallgpt-bench {"bench": ..., "title": ..., "date": ..., "commit": ...} -->

    Date, commit, machine (CPU model and flags), threads, torch, command.

    <body: tables and notes written by the bench>

Blocks are only ever appended: a correction is a new run. The newest block of each
``(bench, title)`` is the current figure (``docs/results.md`` is generated from those by
``benches/results_page.py``); older ones are kept as the record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "RESULTS.md"
MARK = "<!-- smallgpt-bench "
#: CPU flags that decide which kernels torch and our encoder use.
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """Which of :data:`FLAGS` this CPU has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in FLAGS if f in have]


def machine() -> str:
    """One line: CPU model, cores, flags, OS, Python, torch."""
    torch_v = "not installed"
    try:
        import torch

        torch_v = torch.__version__
    except ImportError:
        pass
    flags = ", ".join(cpu_flags()) or "none of " + "/".join(FLAGS)
    return (f"{cpu_model()}, {os.cpu_count()} cores ({flags}); {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}; torch {torch_v}")


def commit() -> str:
    """The checkout's commit (short), with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    """The command line that started this process, as one would type it."""
    argv = list(sys.argv)
    try:
        argv[0] = os.path.relpath(argv[0], ROOT)
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table; cells are formatted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_spread(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt_mean(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd (n)``."""
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})"


def compare(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True,
            names: Tuple[str, str] = ("A", "B")) -> str:
    """Says which arm wins, or "tie" when the difference of means is within the larger spread
    of the two arms."""
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    diff = mb - ma if lower_is_better else ma - mb
    if abs(ma - mb) <= max(sa, sb):
        return f"tie (difference {abs(ma - mb):.3f} within spread {max(sa, sb):.3f})"
    winner = names[0] if diff > 0 else names[1]
    return f"{winner} better by {abs(ma - mb):.3f} (spread {max(sa, sb):.3f})"


def header_lines(threads: Optional[int] = None, extra: Optional[Dict[str, str]] = None) -> str:
    """The run's provenance, one Markdown line each."""
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = os.cpu_count() or 1
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"Date: {now}; commit {commit()}; load average {load_average()} at the end.",
             f"Machine: {machine()}; {threads} thread(s).",
             f"Command: `{command()}`."]
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}.")
    return "  \n".join(lines)


def append_run(bench: str, title: str, body: str, *, threads: Optional[int] = None,
               extra: Optional[Dict[str, str]] = None, results: Path = RESULTS,
               record: bool = True) -> str:
    """Print the run block and, if ``record``, append it to ``results`` atomically.

    Returns the block's text.
    """
    meta = {"bench": bench, "title": title,
            "date": _dt.datetime.now().isoformat(timespec="minutes"), "commit": commit()}
    block = (f"## {bench} · {title}\n{MARK}{json.dumps(meta)} -->\n\n"
             f"{header_lines(threads, extra)}\n\n{body.strip()}\n")
    print("\n" + block, flush=True)
    if record:
        old = results.read_text(encoding="utf-8") if results.exists() else \
            "# Benchmark results\n"
        tmp = results.with_name(f".{results.name}.{os.getpid()}.tmp")
        tmp.write_text(old.rstrip("\n") + "\n\n" + block, encoding="utf-8")
        os.replace(tmp, results)
    return block


def parse_runs(text: str) -> List[Tuple[Dict[str, str], str]]:
    """The run blocks of a RESULTS file: ``(meta, block text)`` in file order."""
    out: List[Tuple[Dict[str, str], str]] = []
    parts = re.split(r"(?m)^(?=## )", text)
    for part in parts:
        idx = part.find(MARK)
        if idx < 0:
            continue
        end = part.find("-->", idx)
        meta = json.loads(part[idx + len(MARK):end])
        out.append((meta, part.rstrip() + "\n"))
    return out


def current_runs(text: str) -> List[Tuple[Dict[str, str], str]]:
    """The newest block of each ``(bench, title)``, in order of first appearance."""
    latest: Dict[Tuple[str, str], Tuple[Dict[str, str], str]] = {}
    order: List[Tuple[str, str]] = []
    for meta, block in parse_runs(text):
        key = (meta["bench"], meta["title"])
        if key not in latest:
            order.append(key)
        latest[key] = (meta, block)
    return [latest[k] for k in order]
