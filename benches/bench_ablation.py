"""Ablation of the modern recipe on Tiny Shakespeare: each option alone, and all together.

    python benches/bench_ablation.py [--seconds 60] [--seeds 1,2,3] [--threads 2]
    python benches/bench_ablation.py --only baseline,muon --seeds 1

Every run is ``smallgpt-train --preset shakespeare-cpu --max-time SECONDS --seed S`` plus the
variant's overrides, one after the other; the figure is the final ``val_bpb`` (the whole
validation split). The table gives mean and spread (min to max) over the seeds and the
difference to the baseline's mean; it is printed and appended to ``benches/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: Dict[str, List[str]] = {
    "baseline": [],
    "muon": ["--optim.name", "muon", "--optim.muon_lr", "0.01"],
    "rmsnorm": ["--model.norm", "rmsnorm"],
    "rmsnorm, no gains": ["--model.norm", "rmsnorm", "--model.norm_weight", "false"],
    "qk_norm": ["--model.qk_norm", "true"],
    "relu2": ["--model.activation", "relu2"],
    "logit_softcap 15": ["--model.logit_softcap", "15"],
    "zero_init_proj": ["--model.zero_init_proj", "true"],
    "untied head": ["--model.tie_embeddings", "false"],
    "no biases": ["--model.bias", "false"],
}
VARIANTS["all"] = [a for name, args in VARIANTS.items() if name != "rmsnorm" for a in args]
# the options that won alone (2026-12-03 ablation), together
VARIANTS["winners"] = [a for name in ("muon", "relu2", "zero_init_proj", "untied head", "qk_norm")
                       for a in VARIANTS[name]]


def run(variant: str, extra: List[str], seed: int, seconds: float, threads: int,
        work: Path) -> float:
    out = work / f"{variant.replace(' ', '_').replace(',', '')}-{seed}"
    cmd = [sys.executable, "-m", "smallgpt.cli.train", "--preset", "shakespeare-cpu",
           "--max-time", str(seconds), "--seed", str(seed), "--out", str(out), "--overwrite",
           "--set", f"threads={threads}", "--no-progress", "--no-plot", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if r.get("final")][-1]
    print(f"{variant:20s} seed {seed}: val_bpb {final['val_bpb']:.4f} "
          f"(step {final['step']})", flush=True)
    return float(final["val_bpb"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", help="comma-separated variant names")
    p.add_argument("--extra", default="", help="overrides added to every run (space-separated)")
    p.add_argument("--no-record", action="store_true", help="print only (tuning runs)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.only.split(",") if args.only else list(VARIANTS)
    results: Dict[str, List[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # seeds outermost: drifts of the machine hit every variant alike
            for name in names:
                extra = VARIANTS[name] + args.extra.split()
                results.setdefault(name, []).append(
                    run(name, extra, seed, args.seconds, args.threads, Path(tmp)))
    report(args, results, record=not args.no_record)
    return 0


def report(args: argparse.Namespace, results: Dict[str, List[float]], record: bool) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    base = statistics.mean(results["baseline"]) if "baseline" in results else None
    lines = [f"### {datetime.datetime.now():%Y-%m-%d %H:%M}: {args.seconds:g} s per run, "
             f"seeds {args.seeds}, {args.threads} threads, code {commit}", "",
             f"Command: `python benches/bench_ablation.py --seconds {args.seconds:g} --seeds "
             f"{args.seeds} --threads {args.threads}"
             + (f" --only {args.only}" if args.only else "")
             + (f" --extra '{args.extra}'" if args.extra else "") + "`", "",
             "| variant | overrides | val_bpb mean | min .. max | vs baseline |",
             "|---|---|---:|---:|---:|"]
    for name, vals in results.items():
        mean = statistics.mean(vals)
        delta = f"{mean - base:+.4f}" if base is not None else ""
        lines.append(f"| {name} | `{' '.join(VARIANTS[name]) or '(preset)'}` | {mean:.4f} | "
                     f"{min(vals):.4f} .. {max(vals):.4f} | {delta} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if record:
        with open(ROOT / "benches" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n## bench_ablation\n\n" + text)


if __name__ == "__main__":
    sys.exit(main())
