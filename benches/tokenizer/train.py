"""Training: ``Tokenizer.train(files=..., vocab_size=...)`` against the fastest BPE trainers.

Ours with the ``gpt2`` and ``cl100k`` patterns on every file of the corpus, against gigabpe
(``pretokenizer="bytelevel"``), rustbpe, bpeasy and Hugging Face ``tokenizers`` (BpeTrainer +
ByteLevel). Each trainer runs ``--repeats`` times, one process per run, trainers interleaved so
that machine noise hits all of them alike; the table reports the median time and the largest
peak RSS, and ours against the best anchor.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List, Optional, Tuple

import harness

from .common import BPEASY_MAX_TOKEN_LENGTH, TRAINERS, fmt_mb, label, ratio
from .inputs import Inputs
from .worker import Run, idle_cell, spawn

TITLE = "Training"
HEADER = [
    "trainer",
    "pattern",
    "final vocab",
    "median s",
    "runs (s)",
    "peak MiB",
    "idle MiB",
    "speed vs best anchor (>1 faster)",
    "peak vs best anchor (<1 smaller)",
]
Stats = Dict[str, Tuple[float, float]]  # trainer key -> (median s, max peak MiB)


def trainers(libs: List[str]) -> List[str]:
    """The trainer keys selected by ``--libs``."""
    return [k for k in TRAINERS if k.split("-")[0] in libs or k in libs]


def measure(args: argparse.Namespace, inp: Inputs, keys: List[str]) -> Dict[str, List[Run]]:
    """``args.repeats`` runs of every trainer, interleaved: noise hits every trainer alike."""
    runs: Dict[str, List[Run]] = {k: [] for k in keys}
    for rep in range(args.repeats):
        for key in keys:
            spec = {
                "kind": "train",
                "trainer": key,
                "files": inp.train_files,
                "vocab_size": args.vocab_size,
            }
            r = spawn(spec, args.timeout)
            runs[key].append(r)
            sec = r.result.get("seconds")
            harness.log(
                f"[train {rep + 1}/{args.repeats}] {key}: "
                + (r.error or f"{sec:.2f} s, peak {r.peak_mib:.0f} MiB")
            )
    return runs


def summarise(runs: Dict[str, List[Run]]) -> Tuple[Stats, Optional[str]]:
    """Median seconds and largest peak of each trainer that ran, and the fastest anchor."""
    stats: Stats = {}
    for key, rs in runs.items():
        good = [r for r in rs if not r.error]
        if good:
            stats[key] = (
                statistics.median(r.result["seconds"] for r in good),
                max(r.peak_mib for r in good),
            )
    anchors = [k for k in stats if not k.startswith("ours-")]
    best = min(anchors, key=lambda k: stats[k][0]) if anchors else None
    return stats, best


def row(key: str, rs: List[Run], stats: Stats, best: Optional[str],
        idle: Dict[str, Run]) -> List[str]:
    lib, pattern = TRAINERS[key]
    errors = [r.error for r in rs if r.error]
    if key not in stats:  # never ran: e.g. the anchor is not installed
        return [label(lib), pattern, "-", errors[0] or "failed", "", "", idle_cell(idle, lib),
                "", ""]
    med, peak = stats[key]
    good = [r for r in rs if not r.error]
    each = ", ".join(f"{r.result['seconds']:.2f}" for r in good)
    if errors:
        each += f" ({len(errors)} failed: {errors[0]})"
    speed = mem = ""
    if key.startswith("ours-") and best is not None:
        speed = ratio(stats[best][0] / med)
        mem = ratio(peak / stats[best][1])
    return [label(lib), pattern, str(good[0].result["vocab"]), f"{med:.2f}", each,
            f"{peak:.0f}", idle_cell(idle, lib), speed, mem]


def notes(stats: Stats, best: Optional[str]) -> List[str]:
    out = []
    if best is not None:
        out.append(
            f"Best anchor: {label(TRAINERS[best][0])} ({stats[best][0]:.2f} s, "
            f"{stats[best][1]:.0f} MiB peak)."
        )
    if "ours-gpt2" in stats and "ours-cl100k" in stats:
        out.append(
            "Ours, cl100k time / gpt2 time: "
            f"{ratio(stats['ours-cl100k'][0] / stats['ours-gpt2'][0])} (target ≤ 1.5×)."
        )
    out.append(
        "rustbpe and bpeasy read ~1 MiB newline-aligned chunks from a Python iterator with "
        f"GPT-2's regex (bpeasy max_token_length={BPEASY_MAX_TOKEN_LENGTH}); ours, gigabpe and "
        "HF read the files themselves. Final vocab counts special tokens where the library adds "
        "them; gigabpe's base alphabet is only the bytes seen. A trainer whose library is not "
        "installed says so in its row."
    )
    return out


def section(args: argparse.Namespace, inp: Inputs,
            idle: Dict[str, Run]) -> List[Tuple[str, str]]:
    """Runs the training comparison; returns its run block as ``[(title, body)]``."""
    keys = trainers(args.libs)
    runs = measure(args, inp, keys)
    stats, best = summarise(runs)
    rows = [row(key, runs[key], stats, best, idle) for key in keys]
    body = [
        f"{len(inp.train_files)} files, {fmt_mb(inp.train_bytes)}, vocab_size "
        f"{args.vocab_size}, median of {args.repeats} run(s), one fresh process per run.",
        "",
        harness.md_table(HEADER, rows),
        "",
        *notes(stats, best),
    ]
    return [(TITLE, "\n".join(body))]
