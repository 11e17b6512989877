"""Encoding: MB/s of ours against tiktoken, quicktok and riptoken, on the same vocabulary.

cl100k: ours ``Tokenizer.from_tiktoken``, tiktoken, quicktok-v1 and riptoken, all built from
the same ``.tiktoken`` file; GPT-2: ours ``Tokenizer.from_gpt2``, tiktoken and riptoken, from
the same ``encoder.json``/``vocab.bpe`` (quicktok has no GPT-2 scanner). Workloads: English cut
into ~10 KB documents at blank lines, one call per document on one thread and one batch call
over all cores; the multilingual files one line per call, and batched (cl100k only). Every
library runs with ``encode_ordinary`` semantics, and its ids are compared with tiktoken's.

A worker warms up with one short call (and, for batched workloads, one small batch call, which
starts thread pools and lazy imports such as numpy), then times ``--encode-repeats`` passes over
the same documents (:func:`harness.timed_passes`); that is repeated for ``--encode-rounds``
rounds, libraries interleaved, and each cell is the median of all passes.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, List, Tuple

import harness

from .common import ENCODERS, fmt_mb, label, ratio
from .inputs import Inputs
from .worker import Run, Spec, idle_cell, mbps, spawn

WORKLOADS: Dict[str, str] = {
    "en-call": "English, per call",
    "en-batch": "English, batched",
    "ml-call": "multilingual, per line",
    "ml-batch": "multilingual, batched",
}
VOCAB_WORKLOADS: Dict[str, List[str]] = {
    "cl100k": ["en-call", "en-batch", "ml-call", "ml-batch"],
    "gpt2": ["en-call", "en-batch"],
}
TITLES = {"cl100k": "Encoding, cl100k", "gpt2": "Encoding, GPT-2"}
BUILT_WITH = {"cl100k": "`Tokenizer.from_tiktoken`", "gpt2": "`Tokenizer.from_gpt2`"}
Cells = Dict[Tuple[str, str], Run]  # (library, workload) -> its runs, merged over rounds


def _merge(prev: Run, r: Run) -> None:
    """Adds an earlier round's passes to ``r``: the cell's median is over all passes."""
    r.result["times"] = prev.result["times"] + r.result["times"]
    r.result["seconds"] = statistics.median(r.result["times"])
    r.peak_mib = max(r.peak_mib, prev.peak_mib)


def measure(args: argparse.Namespace, base: Spec, vocab: str, libs: List[str]) -> Cells:
    """Every (library, workload) cell of one vocabulary, over ``args.encode_rounds`` rounds."""
    res: Cells = {}
    # Rounds interleave the libraries, so a slow spell of this shared machine hits all of
    # them alike; each cell is the median over every pass of every round.
    for rnd in range(args.encode_rounds):
        for wl in VOCAB_WORKLOADS[vocab]:
            env = {"RAYON_NUM_THREADS": "1"} if wl.endswith("-call") else None
            for lib in libs:
                if lib == "ours-lists" and wl.endswith("-call"):
                    continue  # the same call as "ours"
                r = spawn(dict(base, lib=lib, vocab=vocab, workload=wl), args.timeout, env)
                prev = res.get((lib, wl))
                if prev is not None and not prev.error and not r.error:
                    _merge(prev, r)
                if prev is None or not prev.error:
                    res[lib, wl] = r
                msg = r.error or (
                    f"{r.result['bytes'] / r.result['seconds'] / 1e6:.1f} MB/s, "
                    f"peak {r.peak_mib:.0f} MiB"
                )
                harness.log(f"[encode {vocab} round {rnd + 1}] {wl} {lib}: {msg}")
    return res


def lib_row(lib: str, workloads: List[str], res: Cells, idle: Dict[str, Run]) -> List[str]:
    """MB/s per workload, whether the ids are tiktoken's, peak and idle RSS."""
    ref = {wl: res["tiktoken", wl].result.get("digest") for wl in workloads}
    cells = [label(lib)]
    diff = []
    for wl in workloads:
        if (lib, wl) not in res:
            cells.append("(as above)")
            continue
        r = res[lib, wl]
        v = mbps(r)
        cells.append(r.error or f"{v:.1f} ({r.result['seconds']:.2f} s)")
        if not r.error and ref[wl] and r.result["digest"] != ref[wl]:
            diff.append(wl)
    mine = [res[lib, wl] for wl in workloads if (lib, wl) in res]
    if lib == "tiktoken":
        same = "reference"
    elif any(r.error for r in mine):
        same = "n/a"
    else:
        same = "yes" if not diff else "NO: " + ", ".join(diff)
    peaks = [r.peak_mib for r in mine if not r.error]
    return cells + [same, f"{max(peaks):.0f}" if peaks else "-", idle_cell(idle, lib)]


def ratio_row(libs: List[str], workloads: List[str], res: Cells) -> List[str]:
    """Ours against the fastest anchor that ran, per workload."""
    cells = ["ours / best anchor"]
    for wl in workloads:
        anchor_v = [(mbps(res[lib, wl]), lib) for lib in libs if not lib.startswith("ours")]
        valid = [(v, lib) for v, lib in anchor_v if v is not None]
        ours_v = mbps(res["ours", wl])
        if valid and ours_v is not None:
            v, lib = max(valid)
            cells.append(f"**{ratio(ours_v / v)}** (vs {label(lib)})")
        else:
            cells.append("-")
    return cells + ["", "", ""]


def data_note(args: argparse.Namespace, vocab: str, res: Cells) -> str:
    en = res["tiktoken", "en-call"].result
    ml = res.get(("tiktoken", "ml-call"))
    note = (
        f"English: {fmt_mb(en.get('bytes', 0))} of the en_* files in "
        f"{en.get('docs', 0)} documents of ~{args.chunk_kb} KB (cut at blank lines)"
    )
    if ml is not None and not ml.error:
        note += (
            f"; multilingual: {fmt_mb(ml.result['bytes'])} of the ml_* files, "
            f"{ml.result['docs']} lines"
        )
    note += (
        f". MB/s (median pass seconds) over {args.encode_rounds} interleaved round(s) "
        f"of {args.encode_repeats} pass(es), one fresh process per library, workload and "
        "round. Per call: one thread (RAYON_NUM_THREADS=1); batched: each library's batch call "
        f"on all {os.cpu_count()} cores (ours `encode_batch_to_numpy`, flat arrays like "
        "quicktok's, and `encode_ordinary_batch`, lists of lists, tiktoken "
        "`encode_ordinary_batch`, quicktok `encode_batch`, riptoken "
        "`encode_ordinary_batch`). All use encode_ordinary semantics. An encoder whose library "
        "is not installed says so in its cells."
    )
    if vocab == "cl100k":
        return note + (" quicktok's vocabulary is written from the same .tiktoken file with "
                       "its importer.")
    return note + " quicktok has no GPT-2 scanner, so it is absent from this table."


def section(args: argparse.Namespace, inp: Inputs,
            idle: Dict[str, Run]) -> List[Tuple[str, str]]:
    """Runs the encoding comparison; returns one run block per vocabulary."""
    base: Spec = {
        "kind": "encode",
        "cl100k": args.cl100k,
        "gpt2_dir": args.gpt2_dir,
        "en_sample": inp.en_sample,
        "ml_files": inp.ml_files,
        "chunk_chars": args.chunk_kb * 1000,
        "repeats": args.encode_repeats,
        "budget_s": 1e9,
    }
    blocks = []
    for vocab, all_libs in ENCODERS.items():
        libs = [lib for lib in all_libs if lib.split("-")[0] in args.libs or lib == "tiktoken"]
        workloads = VOCAB_WORKLOADS[vocab]
        res = measure(args, base, vocab, libs)
        rows = [lib_row(lib, workloads, res, idle) for lib in libs]
        if "ours" in libs:
            rows.append(ratio_row(libs, workloads, res))
        header = ["encoder"] + [f"{WORKLOADS[wl]} MB/s" for wl in workloads]
        header += ["same ids as tiktoken", "peak MiB", "idle MiB"]
        body = [f"Ours built with {BUILT_WITH[vocab]}.", "", harness.md_table(header, rows), "",
                data_note(args, vocab, res)]
        blocks.append((TITLES[vocab], "\n".join(body)))
    return blocks

