"""Corpus → llm.c shards: ``smallgpt-tokenize`` against the usual Python recipe, one run.

The anchor is what data-preparation scripts typically do: tiktoken ``encode_ordinary`` per
document in a ``multiprocessing.Pool`` (one process per core), each document prefixed with the
end-of-text token, then numpy writes llm.c shards. Both use the GPT-2 vocabulary and the same
documents (each input file is one document), and both run in fresh subprocesses so that peak
RSS is their own.

    python benches/bench_tokenize.py [--corpus ../shared/data/corpus] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "tests" / "fixtures" / "gpt2"
SHARD_TOKENS = 100_000_000


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


_ENC = None


def _anchor_encode(path: Path) -> list:
    assert _ENC is not None
    return [50256, *_ENC.encode_ordinary(path.read_text(encoding="utf-8"))]


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Runs a command; returns (seconds, peak RSS in MB) of that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return secs, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--anchor-worker", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    procs = os.cpu_count() or 1
    if args.anchor_worker:
        anchor_worker(Path(args.anchor_worker[0]), Path(args.anchor_worker[1]), procs)
        return
    files = sorted(p for p in args.corpus.iterdir() if p.suffix == ".txt")
    mb = sum(p.stat().st_size for p in files) / 1e6
    cli = str(Path(sys.executable).parent / "smallgpt-tokenize")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {
            "smallgpt-tokenize (Rust, all cores)": lambda out: [
                cli,
                *map(str, files),
                "--out",
                out,
                "--gpt2",
                str(GPT2),
                "--quiet",
                "--overwrite",
                "--val-fraction",
                "0",
            ],
            f"tiktoken + Pool({procs}) + numpy": lambda out: [
                sys.executable,
                __file__,
                "--anchor-worker",
                str(args.corpus),
                out,
            ],
        }
        for name, make in jobs.items():
            times, peaks = [], []
            for r in range(args.repeats):
                out = Path(tmp) / f"{len(rows)}_{r}"
                out.mkdir()
                secs, peak = run_measured(make(str(out)))
                times.append(secs)
                peaks.append(peak)
            rows[name] = (statistics.median(times), max(peaks))
        # Same tokens? Compare our shard with the anchor's.
        import numpy as np

        ours = np.fromfile(Path(tmp) / "0_0" / "train_000000.bin", dtype=np.uint16)[512:]
        theirs = np.fromfile(Path(tmp) / "1_0" / "train_000000.bin", dtype=np.uint16)[512:]
        same = bool(np.array_equal(ours, theirs))
    anchor_speed = mb / list(rows.values())[1][0]
    lines = [
        f"corpus: {args.corpus} ({len(files)} files, {mb:.1f} MB), GPT-2 vocabulary, "
        f"median of {args.repeats}; identical tokens: {same}",
        "",
        "| pipeline | seconds | MB/s | peak RSS MB | speed vs anchor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (secs, peak) in rows.items():
        lines.append(
            f"| {name} | {secs:.2f} | {mb / secs:.1f} | {peak:.0f} | "
            f"{mb / secs / anchor_speed:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        cpu = platform.processor() or platform.machine()
        try:
            model = next(
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            model = cpu
        with open(ROOT / "benches" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(
                f"\n## bench_tokenize ({dt.date.today()})\n\n"
                f"machine: {model}, {procs} cores; command: "
                f"`python benches/bench_tokenize.py --repeats {args.repeats}`\n\n"
                f"{table}\n"
            )
    print(json.dumps({k: {"seconds": v[0], "peak_mb": v[1]} for k, v in rows.items()}))


if __name__ == "__main__":
    main()
