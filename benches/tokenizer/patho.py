"""Pathological input: does encoding time stay linear where the split pattern finds no breaks?

One piece of letters with no whitespace at all (English with everything but A-Z/a-z removed,
10 MB) and one letter repeated (1 MB), plus inputs 10x smaller: seconds for one
``encode_ordinary`` call, and the time ratio for 10x the input (linear means <= 12x, issue 6),
ours against tiktoken (cl100k). Both sizes are the median of up to ``--encode-repeats`` passes
(the large one gets more than one only while they are cheap); a large run is stopped once it
takes far longer than linear.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Tuple

import harness

from .common import fmt_mb, label, ratio
from .inputs import Inputs
from .worker import Run, Spec, describe, spawn

TITLE = "Pathological input"
LINEAR_LIMIT = 12.0  # issue 6: 10x the input may cost at most 12x the time
PATHO_GIVE_UP = 15.0  # a large pathological run is stopped after this many times the small one
PATHO_LARGE_BUDGET = 2.0  # large pathological input: more passes only while under this (s)
INPUTS = {
    "nows": "letters only, no whitespace (one piece)",
    "one": "one letter repeated ('a')",
}
HEADER = [
    "input",
    "encoder",
    "small: s",
    "10× larger: s",
    "time ratio (10× input)",
    f"linear (≤ {LINEAR_LIMIT:.0f}×)",
    "peak MiB (large)",
    "same ids",
]


def measure(args: argparse.Namespace, base: Spec, lib: str, name: str,
            inp: Inputs) -> Tuple[Run, Run]:
    """The small input, then the large one with a timeout that linear time never meets."""
    small = spawn(dict(base, lib=lib, input=inp.patho[f"{name}-small"]), args.timeout)
    harness.log(f"[patho] {name}-small {lib}: {describe(small)}")
    if small.error:
        return small, Run({}, 0.0, 0.0, "skipped")
    # A linear encoder needs ~10x; give up well past the 12x target.
    # (Extra passes start only within PATHO_LARGE_BUDGET, so add at most twice it.)
    budget = small.wall_s + PATHO_GIVE_UP * small.result["seconds"] + 2 * PATHO_LARGE_BUDGET + 5.0
    # Measured like the small input (median of passes) where that is cheap, so that the ratio
    # compares warm passes with warm passes; slow encoders get one pass.
    spec = dict(base, lib=lib, input=inp.patho[f"{name}-large"], budget_s=PATHO_LARGE_BUDGET)
    large = spawn(spec, min(args.patho_timeout, budget))
    harness.log(f"[patho] {name}-large {lib}: {describe(large)}")
    return small, large


def large_cells(small: Run, large: Run, large_size: int) -> Tuple[str, str, str]:
    """The large input's seconds, the time ratio, and whether that is linear (``large`` is
    "skipped" when the small input failed)."""
    if large.error and large.error.startswith("timeout"):
        # Lower bound: the stopped run's wall time less the setup (start, imports,
        # vocabulary) that the small run needed besides encoding.
        setup = small.wall_s - sum(small.result["times"])
        least = max(large.wall_s - setup, 0.0)
        bound = least / small.result["seconds"]
        return (f"> {least:.1f} (stopped)", f"> {bound:.0f}×",
                "no" if bound > LINEAR_LIMIT else "?")
    if large.error:
        return large.error, "-", "?"
    lsec = large.result["seconds"]
    rr = lsec / small.result["seconds"]
    return (f"{lsec:.3f} ({large_size / lsec / 1e6:.1f} MB/s)", ratio(rr),
            "yes" if rr <= LINEAR_LIMIT else "no")


def same_ids(digests: Dict[str, Dict[str, Optional[str]]]) -> str:
    """Whether ours gave tiktoken's ids, and on which sizes that was checked."""
    checked = [size for size in ("small", "large")
               if digests["ours"][size] and digests["tiktoken"][size]]
    same = [size for size in checked if digests["ours"][size] == digests["tiktoken"][size]]
    verdict = "yes" if same == checked and checked else ("n/a" if not checked else "NO")
    return verdict + (f" ({', '.join(checked)})" if checked else "")


def input_rows(args: argparse.Namespace, base: Spec, libs: List[str], name: str,
               inp: Inputs) -> List[List[str]]:
    """One row per library for one pathological input."""
    s_size = os.path.getsize(inp.patho[f"{name}-small"])
    l_size = os.path.getsize(inp.patho[f"{name}-large"])
    rows = []
    digests: Dict[str, Dict[str, Optional[str]]] = {}
    for lib in libs:
        small, large = measure(args, base, lib, name, inp)
        digests[lib] = {"small": small.result.get("digest"),
                        "large": large.result.get("digest")}
        s_txt = small.error or f"{small.result['seconds']:.3f}"
        l_txt, r_txt, linear = large_cells(small, large, l_size)
        rows.append([INPUTS[name], label(lib), f"{fmt_mb(s_size)}: {s_txt}",
                     f"{fmt_mb(l_size)}: {l_txt}", r_txt, linear,
                     f"{large.peak_mib:.0f}" if not large.error else "-", ""])
    if "ours" in digests and "tiktoken" in digests:
        for r in rows:
            r[-1] = same_ids(digests)
    return rows


def section(args: argparse.Namespace, inp: Inputs) -> List[Tuple[str, str]]:
    """Runs the pathological-input comparison; returns its run block as ``[(title, body)]``."""
    base: Spec = {
        "kind": "patho",
        "vocab": "cl100k",
        "cl100k": args.cl100k,
        "gpt2_dir": args.gpt2_dir,
        "repeats": args.encode_repeats,
        "budget_s": 10.0,
    }
    libs = [lib for lib in ("ours", "tiktoken") if lib in args.libs or lib == "tiktoken"]
    rows = [r for name in INPUTS for r in input_rows(args, base, libs, name, inp)]
    body = [
        "cl100k, one `encode_ordinary` call.",
        "",
        harness.md_table(HEADER, rows),
        "",
        f"Both sizes: median of up to {args.encode_repeats} passes (the large input gets "
        f"more than one only while its passes so far took under {PATHO_LARGE_BUDGET:.0f} s, "
        f"so warm passes are compared with warm passes); a large run is stopped once it "
        f"exceeds {PATHO_GIVE_UP:.0f}× the small time (or --patho-timeout "
        f"{args.patho_timeout:.0f} s).",
    ]
    return [(TITLE, "\n".join(body))]
