"""Corpus → llm.c shards: ``smallgpt-tokenize`` against the usual Python recipe, one run.

The anchor is what data-preparation scripts typically do: tiktoken ``encode_ordinary`` per
document in a ``multiprocessing.Pool`` (one process per core), each document prefixed with the
end-of-text token, then numpy writes llm.c shards. Both use the GPT-2 vocabulary
(``tests/fixtures/gpt2``) and the same documents (each ``*.txt`` file of the corpus is one
document), and both run in fresh processes (``harness.run_measured``) so that wall time and peak
RSS are their own (peak RSS: the largest single process, the pool's workers included). The two
arms alternate run by run; the table reports mean ± sd seconds, MB/s, the largest peak RSS, and
whether the two wrote the same tokens.

    python benches/bench_tokenize.py                  # the shared corpus (~170 MB), 3 runs each
    python benches/bench_tokenize.py --corpus DIR --repeats 1 --no-record   # smoke test

The table is printed and appended to ``benches/RESULTS.md`` as the run block "corpus to
shards, GPT-2" (``harness.append_run``) unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import harness  # noqa: E402

GPT2 = ROOT / "tests" / "fixtures" / "gpt2"
SHARD_TOKENS = 100_000_000
HEADER_TOKENS = 512  # an llm.c shard starts with 256 int32s: 512 uint16 slots
_ENC = None


def anchor_worker(corpus: Path, out: Path, procs: int) -> None:
    """The usual recipe: tiktoken in a process pool + numpy shard writes."""
    import multiprocessing as mp

    import numpy as np
    import tiktoken
    import tiktoken_ext.openai_public as op
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2 / "vocab.bpe"), str(GPT2 / "encoder.json"))
    global _ENC
    _ENC = tiktoken.Encoding(
        "gpt2",
        pat_str=op.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    files = sorted(p for p in corpus.iterdir() if p.suffix == ".txt")

    def write(tokens: list, idx: int) -> None:
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (20240520, 1, len(tokens))
        with open(out / f"train_{idx:06d}.bin", "wb") as f:
            f.write(header.tobytes())
            f.write(np.asarray(tokens, dtype=np.uint16).tobytes())

    with mp.get_context("fork").Pool(procs) as pool:
        buf: list = []
        idx = 0
        for toks in pool.imap(_anchor_encode, files, chunksize=1):
            buf.extend(toks)
            while len(buf) >= SHARD_TOKENS:
                write(buf[:SHARD_TOKENS], idx)
                buf, idx = buf[SHARD_TOKENS:], idx + 1
        if buf:
            write(buf, idx)


def _anchor_encode(path: Path) -> list:
    assert _ENC is not None
    return [50256, *_ENC.encode_ordinary(path.read_text(encoding="utf-8"))]


def arms(corpus: Path, files: List[Path], procs: int) -> Dict[str, Callable[[str], List[str]]]:
    """Each pipeline's name -> its command line, given the output folder."""
    cli = str(Path(sys.executable).parent / "smallgpt-tokenize")
    if not os.path.exists(cli):  # e.g. a venv that sees smallgpt through its system packages
        cli = shutil.which("smallgpt-tokenize") or ""
    if not cli:
        raise SystemExit("bench_tokenize: no smallgpt-tokenize command (pip install -e .)")
    return {
        "smallgpt-tokenize (Rust, all cores)": lambda out: [
            cli, *map(str, files), "--out", out, "--gpt2", str(GPT2), "--quiet", "--overwrite",
            "--val-fraction", "0",
        ],
        f"tiktoken + Pool({procs}) + numpy": lambda out: [
            sys.executable, __file__, "--anchor-worker", str(corpus), out,
        ],
    }


def measure(jobs: Dict[str, Callable[[str], List[str]]], repeats: int, tmp: Path,
            timeout_s: float) -> Dict[str, List[harness.Measured]]:
    """``repeats`` runs of every arm, alternating; run ``r`` of arm ``i`` writes to
    ``tmp/i_r``."""
    runs: Dict[str, List[harness.Measured]] = {name: [] for name in jobs}
    for r in range(repeats):
        for i, (name, make) in enumerate(jobs.items()):
            out = tmp / f"{i}_{r}"
            out.mkdir()
            m = harness.run_measured(make(str(out)), timeout_s)
            if not m.ok:
                raise SystemExit(f"bench_tokenize: {name} failed ({m.error})")
            runs[name].append(m)
            harness.log(f"[{r + 1}/{repeats}] {name}: {m.wall_s:.2f} s, "
                        f"peak {m.peak_mib:.0f} MiB")
    return runs


def same_tokens(a: Path, b: Path) -> bool:
    """Whether two folders of llm.c shards hold the same token stream."""
    import numpy as np

    def stream(folder: Path) -> np.ndarray:
        shards = sorted(folder.glob("train_*.bin"))
        return np.concatenate([np.fromfile(p, dtype=np.uint16)[HEADER_TOKENS:] for p in shards])

    return bool(np.array_equal(stream(a), stream(b)))


def table(runs: Dict[str, List[harness.Measured]], mb: float) -> Tuple[str, str]:
    """The Markdown table (anchor last) and who is faster."""
    secs = {name: [m.wall_s for m in ms] for name, ms in runs.items()}
    ours, anchor = list(secs)
    anchor_speed = mb / harness.mean_spread(secs[anchor])[0]
    rows = []
    for name, ts in secs.items():
        mean = harness.mean_spread(ts)[0]
        peak = max(m.peak_mib for m in runs[name])
        rows.append([name, harness.fmt_mean(ts, 2), f"{mb / mean:.1f}", f"{peak:.0f}",
                     f"{mb / mean / anchor_speed:.2f}x"])
    header = ["pipeline", "seconds", "MB/s", "peak RSS MiB", "speed vs anchor"]
    verdict = harness.compare(secs[ours], secs[anchor], names=("smallgpt-tokenize", "anchor"))
    return harness.md_table(header, rows), verdict


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "corpus",
                    help="folder whose *.txt files are the documents")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    ap.add_argument("--no-record", "--no-append", dest="no_record", action="store_true",
                    help="print only; do not append to RESULTS.md")
    ap.add_argument("--anchor-worker", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    procs = os.cpu_count() or 1
    if args.anchor_worker:
        anchor_worker(Path(args.anchor_worker[0]), Path(args.anchor_worker[1]), procs)
        return
    if not args.corpus.is_dir():
        raise SystemExit(f"bench_tokenize: no corpus folder {args.corpus} (see --corpus)")
    files = sorted(p for p in args.corpus.iterdir() if p.suffix == ".txt")
    if not files:
        raise SystemExit(f"bench_tokenize: no *.txt files in {args.corpus}")
    mb = sum(p.stat().st_size for p in files) / 1e6
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        runs = measure(arms(args.corpus, files, procs), args.repeats, Path(tmp), args.timeout)
        same = same_tokens(Path(tmp) / "0_0", Path(tmp) / "1_0")
    body, verdict = table(runs, mb)
    notes = (f"Corpus: {args.corpus} ({len(files)} files, {mb:.1f} MB), GPT-2 vocabulary, "
             f"{args.repeats} run(s) of each arm, alternating; identical tokens: {same}. "
             f"Seconds: mean ± sd, process start included; MB/s and speed from the means. "
             f"smallgpt-tokenize vs anchor: {verdict}.")
    harness.append_run("bench_tokenize", "corpus to shards, GPT-2", body + "\n\n" + notes,
                       threads=procs, record=not args.no_record)


if __name__ == "__main__":
    main()
