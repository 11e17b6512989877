"""Short timed training runs of the GPU presets: tokens/s, MFU, peak memory, loss falling.

    python benches/gpu_train.py --presets gpt2-124m,gpt2-124m-modern --compile off,on

Tokenizes the bundled Tiny Shakespeare with GPT-2's vocabulary (the committed
tests/fixtures/gpt2 files) into a temporary folder, then runs ``smallgpt-train --preset P``
on it, bf16, for at most ``--steps`` steps or ``--seconds`` seconds each (torch.compile's
warm-up counts against the seconds), logging every step, in a fresh process per run. Each run
reports the median tokens/s and MFU (against the card's exact peak, smallgpt.train.hardware;
null for a card not in the table) over the steps after the first ``WARM_STEPS``, the peak
GPU memory (``torch.cuda.max_memory_allocated``) and whether the loss fell (the mean of the
last three steps' losses below the first step's). ``benches/gpu_check.sh`` calls
:func:`run_all`; this script prints the same figures as a table.

The global batch is ``--batch-size`` sequences of 1024 tokens (default 128: 8 micro-steps of
the presets' 16), so that a short run has enough steps to take a median; MFU does not depend
on the number of accumulation steps. ``--dry-run`` runs the same code on the CPU with a tiny
shape of each preset (fp32, compile off) in seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

#: Runs a command: ``run(cmd, env=..., timeout=...)`` -> exit status, None on a timeout.
Runner = Callable[..., Optional[int]]


def run_plain(cmd: List[str], *, env: Optional[Dict[str, str]] = None,
              timeout: float = 600) -> Optional[int]:
    """A :data:`Runner` printing to this process's terminal."""
    print("+ " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return None

ROOT = Path(__file__).resolve().parent.parent
WARM_STEPS = 3  # the first steps include compilation, autotuning and allocator growth
# A shape of each preset small enough for a CPU (the presets' other options are kept).
DRY_SHAPE = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "64",
             "--model.block_size", "64", "--data.batch_size", "4", "--data.micro_batch_size",
             "2", "--dtype", "float32", "--device", "cpu", "--set", "threads=1"]


def prepare_data(folder: Path, env: Optional[Dict[str, str]] = None,
                 run: Runner = run_plain) -> Path:
    """GPT-2 shards of the bundled Tiny Shakespeare (last 10 % for validation) in ``folder``."""
    text = ROOT / "python" / "smallgpt" / "assets" / "tinyshakespeare.txt"
    code = run([sys.executable, "-m", "smallgpt.cli.tokenize", str(text), "--out", str(folder),
                "--gpt2", str(ROOT / "tests" / "fixtures" / "gpt2"), "--val-fraction", "0.1",
                "--quiet"], env=env, timeout=300)
    if code != 0:
        raise RuntimeError(f"smallgpt-tokenize failed (exit status {code})")
    return folder


def train_args(preset: str, compile_: bool, data: Path, out: Path, steps: int, seconds: float,
               batch_size: int, dry_run: bool) -> List[str]:
    """The ``smallgpt-train`` arguments of one timed run."""
    args = ["--preset", preset, "--data", str(data), "--out", str(out), "--overwrite",
            "--max-steps", str(steps), "--max-time", str(seconds), "--log-interval", "1",
            "--eval-interval", "0", "--set", "save_interval=0", "--set",
            "data.final_eval_full=false", "--set",
            f"data.eval_tokens={1024 if dry_run else 65536}", "--set",
            f"compile={'true' if compile_ else 'false'}", "--no-plot", "--no-progress"]
    if dry_run:
        return args + DRY_SHAPE
    return args + ["--dtype", "bfloat16", "--device", "cuda", "--data.batch_size",
                   str(batch_size)]


def worker(argv: List[str], report: Path) -> int:
    """Run ``smallgpt-train argv`` in this process, then write its peak memory to ``report``."""
    import torch

    from smallgpt.cli.train import main

    code = main(argv)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    report.write_text(json.dumps({
        "exit": code,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))
    return code


def summarize(metrics: Path, report: Dict[str, Any]) -> Dict[str, Any]:
    """The figures of one run from its ``metrics.jsonl`` and the worker's report."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in recs if "tokens_per_sec" in r]
    warm = [r for r in steps if r["step"] > WARM_STEPS]
    out: Dict[str, Any] = {"steps": steps[-1]["step"] if steps else 0,
                           "tokens_per_step": steps[-1]["tokens"] // steps[-1]["step"]
                           if steps else None,
                           "warm_steps": len(warm), "tokens_per_s": None, "mfu": None,
                           "peak_mem_gib": report.get("peak_mem_gib"),
                           "peak_rss_gib": report.get("peak_rss_gib"),
                           "loss_first": None, "loss_last": None, "loss_fell": False}
    if warm:
        out["tokens_per_s"] = statistics.median(r["tokens_per_sec"] for r in warm)
        mfus = [r["mfu"] for r in warm if r.get("mfu") is not None]
        out["mfu"] = statistics.median(mfus) if mfus else None
    if len(steps) >= 4:
        out["loss_first"] = steps[0]["loss"]
        out["loss_last"] = statistics.fmean(r["loss"] for r in steps[-3:])
        out["loss_fell"] = out["loss_last"] < out["loss_first"]
    return out


def run_one(preset: str, compile_: bool, data: Path, out: Path, *, steps: int, seconds: float,
            batch_size: int = 128, dry_run: bool = False,
            env: Optional[Dict[str, str]] = None, timeout: float = 600,
            run: Runner = run_plain) -> Dict[str, Any]:
    """One timed run in a fresh process; returns its figures and ``status``."""
    argv = train_args(preset, compile_, data, out, steps, seconds, batch_size, dry_run)
    report = out.with_name(out.name + ".report.json")
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    code = run([sys.executable, str(Path(__file__).resolve()), "--worker", str(report), "--",
                *argv], env=env, timeout=timeout)
    rep = json.loads(report.read_text()) if report.exists() else {}
    res = {"preset": preset, "compile": compile_, **summarize(out / "metrics.jsonl", rep),
           "seconds": round(time.perf_counter() - t0, 1)}
    why = ("timed out" if code is None else f"exit status {code}" if code != 0
           else "no step after the warm-up" if not res["warm_steps"]
           else "the loss did not fall" if not res["loss_fell"] else "")
    res["status"] = "failed" if why else "passed"
    if why:
        res["why"] = why
    return res


def table(rows: List[Dict[str, Any]]) -> str:
    """The runs as a Markdown table."""
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    lines = ["| preset | compile | steps | tokens/step | tokens/s | MFU | peak memory (GiB) | "
             "loss first → last | status |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {'on' if r['compile'] else 'off'} | {r.get('steps', 0)} | "
            f"{fmt(r.get('tokens_per_step'), ',')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
            f"{fmt(r.get('loss_first'), '.3f')} → {fmt(r.get('loss_last'), '.3f')} | "
            f"{r['status']}{' (' + r['why'] + ')' if r.get('why') else ''} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="gpt2-124m,gpt2-124m-modern")
    p.add_argument("--compile", default="off,on", help="off, on or off,on")
    p.add_argument("--steps", type=int, default=60, help="at most this many steps per run")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="at most this long per run, compilation included")
    p.add_argument("--batch-size", type=int, default=128, help="global batch in sequences")
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        return worker(args.rest, args.worker)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = prepare_data(out / "shakespeare-gpt2")
        rows = [run_one(preset, c == "on", data, out / f"{preset}-compile-{c}",
                        steps=args.steps, seconds=args.seconds, batch_size=args.batch_size,
                        dry_run=args.dry_run)
                for preset in args.presets.split(",") for c in args.compile.split(",")]
    print("\n" + table(rows))
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
