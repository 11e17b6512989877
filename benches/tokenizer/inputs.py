"""The samples every section reads, cut from the corpus once per run into a scratch folder.

The corpus folder holds English books (``en_*``) and multilingual text (``ml_*``). Training
reads every file (``--quick``: the start of each, ~10 MB in all); encoding reads an English
sample and a multilingual one, the same share of every file; the pathological inputs are
letters only (English with everything but A-Z/a-z removed) and one letter repeated, each at two
sizes ten times apart.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

from .common import read_prefix


@dataclass
class Inputs:
    train_files: List[str]
    train_bytes: int
    en_sample: str  # one file of English, cut at blank lines
    ml_files: List[str]  # the multilingual sample, one file per language
    patho: Dict[str, str] = field(default_factory=dict)  # name -> path


def _prefixes(files: Sequence[str], total: int, folder: Path) -> List[str]:
    """Writes about ``total / len(files)`` bytes of the start of each file (cut at a newline)
    into ``folder``; returns the new paths."""
    folder.mkdir()
    per_file = total // len(files)
    out = []
    for f in files:
        dst = folder / Path(f).name
        dst.write_text(read_prefix(f, per_file), encoding="utf-8")
        out.append(str(dst))
    return out


def _letters_only(files: Sequence[str], size: int) -> str:
    """The first ``size`` letters (A-Z, a-z) of the files, everything else removed."""
    letters: List[str] = []
    have = 0
    for f in files:
        with open(f, encoding="utf-8") as fh:
            while have < size:
                block = fh.read(1 << 22)
                if not block:
                    break
                kept = re.sub(r"[^A-Za-z]+", "", block)
                letters.append(kept)
                have += len(kept)
        if have >= size:
            break
    return "".join(letters)[:size]


def _pathological(en_files: Sequence[str], patho_mb: float, tmp: Path) -> Dict[str, str]:
    """Letters only (no whitespace) and one repeated letter, each at two sizes 10x apart."""
    big = int(patho_mb * 1_000_000)
    nows = _letters_only(en_files, big)
    one = max(big // 10, 1)
    texts = {
        "nows-large": nows,
        "nows-small": nows[: big // 10],
        "one-large": "a" * one,
        "one-small": "a" * (one // 10),
    }
    paths = {}
    for name, text in texts.items():
        path = tmp / f"{name}.txt"
        path.write_text(text, encoding="ascii")
        paths[name] = str(path)
    return paths


def prepare_inputs(args: argparse.Namespace, tmp: Path) -> Inputs:
    """Cuts every sample the run needs from ``args.corpus`` into ``tmp``."""
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        sys.exit(f"bench_tokenizer: no corpus folder {corpus} (see --corpus)")
    files = sorted(str(p) for p in corpus.iterdir() if p.is_file())
    if not files:
        sys.exit(f"no files in {corpus}")
    en_files = [f for f in files if Path(f).name.startswith("en_")]
    ml_files = [f for f in files if Path(f).name.startswith("ml_")]
    if not en_files or not ml_files:
        sys.exit(f"{corpus} needs en_*.txt (English) and ml_*.txt (multilingual) files")

    train_files = files
    if args.quick:  # ~10 MB: the start of every file, cut at a newline
        train_files = _prefixes(files, args.quick_train_mb * 1_000_000, tmp / "train")
    train_bytes = sum(os.path.getsize(f) for f in train_files)

    # Multilingual sample: the same share of every ml_* file (all of the small ones).
    ml_sample = _prefixes(ml_files, int(args.ml_mb * 1_000_000), tmp / "ml")

    # English sample: the same share of every en_* file, cut at a blank line.
    per_file = int(args.encode_mb * 1_000_000) // len(en_files)
    en_sample = tmp / "en_sample.txt"
    en_sample.write_text(
        "".join(read_prefix(f, per_file, b"\n\n") for f in en_files), encoding="utf-8"
    )
    patho = _pathological(en_files, args.patho_mb, tmp)
    return Inputs(train_files, train_bytes, str(en_sample), ml_sample, patho)
