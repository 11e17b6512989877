"""What every bench shares: the machine, the commit, tables, mean and spread, and RESULTS.md.

A bench measures our code and its anchors in one invocation, prints a Markdown table, and
appends one *run block* to ``benches/RESULTS.md`` through :func:`append_run`. A block is::

    ## <bench> · <title>
    <!-- smallgpt-bench {"bench": ..., "title": ..., "date": ..., "commit": ...} -->

    Date, commit, machine (CPU model and flags), threads, torch, command.

    <body: tables and notes written by the bench>

Blocks are only ever appended: a correction is a new run. The newest block of each
``(bench, title)`` is the current figure (the documentation's results page, ``docs/results.md``,
is generated from those by ``docs/hooks.py`` when the site is built); older ones are kept as
the record.

For the measurements themselves: :func:`timed_passes` times repeated calls in this process the
way ``timeit`` does, and :func:`run_measured` runs a command in a fresh process and reports its
wall time and its own peak RSS.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(msg, file=sys.stderr, flush=True)


def timed_passes(fn: Callable[[], Any], repeats: int,
                 budget_s: float = math.inf) -> Tuple[List[float], Any]:
    """Runs ``fn`` ``repeats`` times (fewer once ``budget_s`` is spent, at least once).

    Returns the seconds of each pass and the last pass's output. As ``timeit`` does, the cyclic
    garbage collector is off while a pass runs, and the previous pass's output is freed (and
    collected) before the clock starts: otherwise a pass that returns tens of thousands of
    lists spends a quarter or more of its time in the collector walking those lists (and the
    previous pass's), a cost that is the same for every library and hides the measured one.
    """
    times: List[float] = []
    out: Any = None
    start = time.perf_counter()
    for _ in range(repeats):
        out = None
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
        if time.perf_counter() - start > budget_s:
            break
    return times, out


# Linux starts a process's ru_maxrss at the RSS high-water mark of the process whose memory it
# was cloned from (fork, or vfork before exec), so a command started by a large bench process
# would report at least that process's peak. Commands are therefore started by this tiny
# launcher (python -S, ~8 MiB RSS: the floor), which takes the command's peak RSS from
# os.wait4 (ru_maxrss, KiB; the largest of the command and the children it waited for) and
# writes it to argv[1].
LAUNCHER = """
import os, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass
class Measured:
    """What :func:`run_measured` saw of one command."""

    returncode: Optional[int]  #: None when the command was stopped at the timeout
    peak_mib: float  #: its own peak RSS in MiB (nan if unknown)
    wall_s: float  #: from start to exit, process start included
    stderr_tail: str  #: its last three lines of stderr, joined by " | "

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def error(self) -> Optional[str]:
        """None after a clean exit, else one line saying what went wrong."""
        if self.returncode is None:
            return "timeout"
        return None if self.ok else f"exit {self.returncode}: {self.stderr_tail}"


def run_measured(cmd: Sequence[str], timeout_s: Optional[float] = None,
                 env: Optional[Mapping[str, str]] = None) -> Measured:
    """Runs ``cmd`` in a fresh process (through :data:`LAUNCHER`): wall time and peak RSS.

    Its stdout is discarded and its stderr kept for the error line. The command and the
    launcher get their own process group, so a timeout kills both (and the command's children).
    """
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        rss_path = os.path.join(tmp, "maxrss")
        err_path = os.path.join(tmp, "stderr.txt")
        full = [sys.executable, "-S", "-c", LAUNCHER, rss_path, *cmd]
        t0 = time.perf_counter()
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err,
                                    env=None if env is None else dict(env),
                                    start_new_session=True)
            try:
                returncode: Optional[int] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        wall = time.perf_counter() - t0
        rss = Path(rss_path).read_text().strip() if os.path.exists(rss_path) else ""
        tail = Path(err_path).read_text(errors="replace").strip().splitlines()[-3:]
    return Measured(returncode, int(rss) / 1024.0 if rss else math.nan, wall, " | ".join(tail))


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
