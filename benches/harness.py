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


# ---------------------------------------------------------------- running smallgpt


def tree_env(threads: Optional[int] = None) -> Dict[str, str]:
    """The environment for subprocesses: this checkout's ``python/`` first on the path (so a
    bench runs the code of the commit it records), and ``OMP_NUM_THREADS`` if given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_logged(cmd: Sequence[str], log: Path, threads: Optional[int]) -> float:
    """Run ``cmd`` with its output in ``log``; returns its wall time. A failure raises
    ``RuntimeError`` with the log's last lines."""
    import time

    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT,
                            env=tree_env(threads)).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {rc}); {log}:\n{tail}")
    return wall


def train_smallgpt(args: Sequence[str], out: Path, threads: int) -> Dict[str, object]:
    """``smallgpt-train ARGS --out OUT`` (a fresh run, threads pinned, no progress bar or
    plot); returns its last step, tokens seen, ``elapsed_s`` (the trainer's clock), the final
    evaluation's ``val_bpb`` as the trainer measured it, ``wall_s`` (the process, start-up
    included) and ``ckpt`` (the last checkpoint)."""
    cmd = [sys.executable, "-m", "smallgpt.cli.train", *args, "--out", str(out),
           "--overwrite", "--set", f"threads={threads}", "--no-progress", "--no-plot"]
    wall = _run_logged(cmd, out.with_name(out.name + ".log"), threads)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "step" in r]
    final = next((r for r in reversed(recs) if r.get("final")), {})
    tokens = max((int(r["tokens"]) for r in recs if "tokens" in r), default=0)
    return {"steps": steps[-1]["step"] if steps else 0, "tokens": tokens,
            "elapsed_s": final.get("elapsed_s"), "train_val_bpb": final.get("val_bpb"),
            "wall_s": wall, "ckpt": str(out / "ckpt_latest.pt")}


def eval_smallgpt(model: Path, data: Path, threads: int, log: Path) -> Dict[str, float]:
    """The one evaluator of every comparison: ``smallgpt-train --eval-only`` in fp32 on every
    token of ``data``'s validation split; returns ``val_loss``, ``val_bpb``, ``val_tokens``."""
    cmd = [sys.executable, "-m", "smallgpt.cli.train", "--eval-only", "--init-from", str(model),
           "--data", str(data), "--dtype", "float32", "--device", "cpu", "--no-progress",
           "--set", f"threads={threads}"]
    _run_logged(cmd, log, threads)
    last = log.read_text(encoding="utf-8").strip().splitlines()[-1]
    return json.loads(last)


def parse_seeds(text: str) -> List[int]:
    """``"1,2,3"`` → ``[1, 2, 3]`` (distinct non-negative integers)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def smallgpt_config(args: Sequence[str]) -> str:
    """The configuration ``smallgpt-train ARGS`` would run (``--print-config``), checked before
    any long run starts: a bad override exits here with smallgpt-train's one-line error."""
    res = subprocess.run([sys.executable, "-m", "smallgpt.cli.train", *args, "--print-config"],
                         capture_output=True, text=True, env=tree_env())
    if res.returncode != 0:
        err = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"smallgpt-train {' '.join(args)}: {err[:400]}")
    return res.stdout
