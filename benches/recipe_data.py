"""The tune/report split: the data every recipe decision is made on, and the data it is
reported on.

    python benches/recipe_data.py [--work /tmp/smallgpt-recipe] [--sets tune,report]
    python benches/recipe_data.py --markdown      # the split as benches/README.md gives it

**Books** (GPT-2 tokens). The English Gutenberg files of ``../shared/data/corpus`` are split by
file into two pools: *tune* = ``en_gutenberg_01..04.txt`` (01 is what the old
``bench_vs_nanogpt.py`` trained on, and its validation book "Abbotsford and Newstead Abbey" is
in 02: every book any earlier tuning saw is in this pool) and *report* =
``en_gutenberg_05..08.txt``, which no benchmark, ablation or preset choice has read. From
each pool, whole books (cut out by ``gutenberg_manifest.tsv``'s offsets) are taken in a fixed
pseudo-random order (sha256 of each book's git blob id, so that neither set is one stretch of
the alphabet of authors): first the validation text (about 1 MB), then the training text
(about 11.9 MB) from books by *other authors* than the validation books. Books are joined
by one newline, as in the corpus files; each text is one document for ``smallgpt-tokenize``
(``--val-fraction 0.5`` with the validation text second), so the shard folder's val split
is exactly the validation text, whose UTF-8 bytes give bits per byte.

**Tiny Shakespeare** (the quickstart's 512-token BPE). *report* is today's split: the first
90 % of the characters train, the last 10 % validate (``smallgpt-train`` with no ``--data``
reads the same shards). *tune* never reads that last 10 %: its text is the first 90 %, of
which the first 8/9 train and the last 1/9 validate, tokenized with the quickstart's own
tokenizer (``smallgpt-tokenize --tokenizer``), so a ``shakespeare-cpu`` run on it is the
quickstart with other text (``--data``).

Everything is made once into ``--work`` (a scratch folder) and reused while the selection
and the produced texts' sha256 stay the same. The benches import :func:`data_for`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from harness import tree_env

ROOT = Path(__file__).resolve().parent.parent
SETS = ("tune", "report")
POOLS = {
    "tune": tuple(f"corpus/en_gutenberg_0{i}.txt" for i in (1, 2, 3, 4)),
    "report": tuple(f"corpus/en_gutenberg_0{i}.txt" for i in (5, 6, 7, 8)),
}
#: (target, cap) in bytes: books are added while under the target, none that passes the cap.
VAL_BYTES = (1_000_000, 1_150_000)
TRAIN_BYTES = (11_900_000, 12_300_000)
DEFAULT_WORK = Path("/tmp/smallgpt-recipe")
#: Books no report set may hold (read by earlier tuning); they are in the tune pool anyway.
TUNED_BEFORE = ("corpus/en_gutenberg_01.txt", "Abbotsford and Newstead Abbey")


@dataclass(frozen=True)
class Book:
    """One row of ``gutenberg_manifest.tsv``."""

    file: str
    offset: int
    length: int
    author: str
    title: str
    blob: str


def shared_dir() -> Path:
    """``$SMALLGPT_SHARED_DATA``, else the first ``shared/data`` beside or above this checkout."""
    env = os.environ.get("SMALLGPT_SHARED_DATA")
    if env:
        return Path(env)
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / "data" / "gutenberg_manifest.tsv").is_file():
            return base / "shared" / "data"
    raise SystemExit("no shared/data with gutenberg_manifest.tsv beside this checkout; set "
                     "SMALLGPT_SHARED_DATA")


def manifest(shared: Path) -> List[Book]:
    """The books of the corpus files (the holdout rows name a file that is not shipped)."""
    with open(shared / "gutenberg_manifest.tsv", encoding="utf-8", newline="") as f:
        return [Book(r["file"], int(r["byte_offset"]), int(r["byte_length"]), r["author_dir"],
                     r["title"], r["git_blob_sha1"])
                for r in csv.DictReader(f, delimiter="\t") if (shared / r["file"]).is_file()]


def _fill(books: Sequence[Book], limits: Tuple[int, int], skip_authors: set) -> List[Book]:
    target, cap = limits
    out: List[Book] = []
    total = 0
    for b in books:
        if total >= target:
            break
        if b.author in skip_authors or total + b.length > cap:
            continue
        out.append(b)
        total += b.length
    if total < target:
        raise SystemExit(f"the pool has too few books for {target:,} bytes (got {total:,})")
    return out


def select(rows: Sequence[Book], which: str) -> Tuple[List[Book], List[Book]]:
    """``(train books, val books)`` of a set: deterministic, whole books, disjoint."""
    pool = sorted((b for b in rows if b.file in POOLS[which]),
                  key=lambda b: hashlib.sha256(b.blob.encode()).hexdigest())
    val = _fill(pool, VAL_BYTES, set())
    train = _fill([b for b in pool if b not in val], TRAIN_BYTES, {b.author for b in val})
    seen = [b.title for b in train + val if b.file == TUNED_BEFORE[0]
            or b.title == TUNED_BEFORE[1]]
    if which == "report" and seen:
        raise SystemExit(f"the report set would hold books tuned on before: {seen}")
    return train, val


def _book_text(shared: Path, b: Book) -> bytes:
    with open(shared / b.file, "rb") as f:
        f.seek(b.offset)
        data = f.read(b.length)
    if len(data) != b.length:
        raise SystemExit(f"{b.file} is shorter than the manifest says ({b.title})")
    return data


def _write_if_changed(path: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest


def _tokenize(inputs: Sequence[Path], out: Path, tokenizer: Sequence[str],
              val_fraction: float) -> None:
    cmd = [sys.executable, "-m", "smallgpt.cli.tokenize", *map(str, inputs), "--out", str(out),
           *tokenizer, "--val-fraction", repr(val_fraction), "--quiet", "--overwrite"]
    subprocess.run(cmd, check=True, env=tree_env())


def _cached(folder: Path, description: Dict[str, object]) -> bool:
    """Whether ``folder`` holds shards made from exactly ``description``."""
    made = folder / "split.json"
    return (folder / "shards" / "meta.json").is_file() and made.is_file() and \
        json.loads(made.read_text(encoding="utf-8")) == description


def books(which: str, work: Path = DEFAULT_WORK, shared: Optional[Path] = None) -> Path:
    """The shard folder of the books' ``which`` set (made once into ``work``)."""
    shared = shared or shared_dir()
    train, val = select(manifest(shared), which)
    folder = work / f"books-{which}"
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"train": b"\n".join(_book_text(shared, b) for b in train),
             "val": b"\n".join(_book_text(shared, b) for b in val)}
    sums = {k: _write_if_changed(folder / f"{k}.txt", v) for k, v in texts.items()}
    description: Dict[str, object] = {
        "set": which, "sha256": sums, "bytes": {k: len(v) for k, v in texts.items()},
        "train_books": [asdict(b) for b in train], "val_books": [asdict(b) for b in val]}
    if not _cached(folder, description):
        _tokenize([folder / "train.txt", folder / "val.txt"], folder / "shards",
                  ["--gpt2", str(shared / "gpt2")], 0.5)
        (folder / "split.json").write_text(json.dumps(description, indent=1), encoding="utf-8")
    return folder / "shards"


def shakespeare(which: str, work: Path = DEFAULT_WORK) -> Path:
    """The shard folder of Tiny Shakespeare's ``which`` split (see the module's docstring)."""
    sys.path.insert(0, str(ROOT / "python"))
    from smallgpt.data import prepare_shakespeare

    report = prepare_shakespeare(work / "shakespeare-report")
    if which == "report":
        return report
    folder = work / "shakespeare-tune"
    folder.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "python" / "smallgpt" / "assets" / "tinyshakespeare.txt").read_text(
        encoding="utf-8")
    # The report split's training text, by the rule smallgpt-tokenize splits one document by.
    prefix = text[: int(len(text) * (1.0 - 0.1))]
    digest = _write_if_changed(folder / "tune.txt", prefix.encode("utf-8"))
    tok = report / "tokenizer.json"
    description: Dict[str, object] = {
        "set": which, "sha256": {"text": digest}, "chars": len(prefix),
        "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest()}
    if not _cached(folder, description):
        _tokenize([folder / "tune.txt"], folder / "shards", ["--tokenizer", str(tok)], 1 / 9)
        (folder / "split.json").write_text(json.dumps(description, indent=1), encoding="utf-8")
    return folder / "shards"


def data_for(preset: str, which: str, work: Path = DEFAULT_WORK,
             shared: Optional[Path] = None) -> Path:
    """The shard folder a preset is tuned (``"tune"``) or reported (``"report"``) on:
    ``shakespeare-*`` presets read Tiny Shakespeare, the others the books."""
    if which not in SETS:
        raise SystemExit(f"unknown set {which!r} (use {' or '.join(SETS)})")
    if preset.startswith("shakespeare"):
        return shakespeare(which, work)
    return books(which, work, shared)


def _split_sums(shards: Path) -> Dict[str, Tuple[int, str]]:
    """Bytes and sha256 of each split's text, decoded back from the shards."""
    sys.path.insert(0, str(ROOT / "python"))
    from smallgpt.data import load_meta, read_shard, split_files
    from smallgpt.tokenizer import Tokenizer

    tok = Tokenizer.load(shards / "tokenizer.json")
    eot = load_meta(shards)["eot_id"]
    out = {}
    for split in ("train", "val"):
        ids = [int(t) for p in split_files(shards, split) for t in read_shard(p) if t != eot]
        data = tok.decode_bytes(ids)
        out[split] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def markdown(work: Path, shared: Optional[Path]) -> str:
    """The split as a Markdown section (books, sizes, sha256)."""
    shared = shared or shared_dir()
    lines: List[str] = []
    rows = manifest(shared)
    for which in SETS:
        train, val = select(rows, which)
        desc = json.loads((books(which, work, shared).parent / "split.json").read_text())
        lines += [f"**Books, {which} set** (pool: {', '.join(Path(p).name for p in POOLS[which])})"
                  f": train {desc['bytes']['train']:,} bytes, {len(train)} books, sha256 "
                  f"`{desc['sha256']['train']}`; val {desc['bytes']['val']:,} bytes, "
                  f"{len(val)} books, sha256 `{desc['sha256']['val']}`.", ""]
        for name, group in (("val", val), ("train", train)):
            lines.append(f"- {which} {name}: " + "; ".join(
                f"{b.title} ({b.author.split(',')[0]}, {Path(b.file).stem[-2:]})"
                for b in group) + ".")
        lines.append("")
    for which in SETS:
        sums = _split_sums(shakespeare(which, work))
        lines.append(f"- Tiny Shakespeare {which}: train {sums['train'][0]:,} bytes "
                     f"(sha256 `{sums['train'][1]}`), val {sums['val'][0]:,} bytes "
                     f"(sha256 `{sums['val'][1]}`).")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (cache)")
    p.add_argument("--shared", type=Path, help="the shared data folder (default: found)")
    p.add_argument("--sets", default="tune,report")
    p.add_argument("--markdown", action="store_true", help="print the split for README")
    args = p.parse_args()
    if args.markdown:
        print(markdown(args.work, args.shared))
        return 0
    for which in args.sets.split(","):
        for kind in ("books", "shakespeare"):
            folder = data_for(kind, which, args.work, args.shared)
            meta = json.loads((folder / "meta.json").read_text())
            sizes = ", ".join(f"{k} {v['tokens']:,} tokens / {v['bytes']:,} bytes"
                              for k, v in meta["splits"].items())
            print(f"{kind:12s} {which:7s} {folder}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
