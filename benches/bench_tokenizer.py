"""Tokenizer benchmark: our trainer and encoder against the fastest anchors, in one run.

    python benches/bench_tokenizer.py                    # full run, about 10 min on 2 cores
    python benches/bench_tokenizer.py --quick            # ~10 MB smoke test, about 1.5 min
    python benches/bench_tokenizer.py --only encode --encode-repeats 5 --no-append

Sections (targets: issue 6), one module each under ``benches/tokenizer/``:

* train -- ``Tokenizer.train(files=..., vocab_size=32768)`` with the ``gpt2`` and ``cl100k``
  patterns on every file of the corpus, against gigabpe, rustbpe, bpeasy and Hugging Face
  ``tokenizers`` (``tokenizer/train.py``);
* encode -- MB/s with cl100k and with GPT-2, ours against tiktoken, quicktok-v1 and riptoken
  built from the same vocabulary files, per call on one thread and batched on all cores, ids
  checked against tiktoken's (``tokenizer/encode.py``);
* patho -- inputs where the split pattern finds no breaks, 10x apart in size: is the time
  linear? Ours against tiktoken (``tokenizer/patho.py``).

Every measurement runs in a fresh worker process (this script with ``--worker SPEC``, see
``tokenizer/worker.py``) whose peak RSS is its own (``harness.run_measured``: ``os.wait4`` in a
tiny launcher, nothing subtracted); the RSS of an idle worker that only imported the library is
reported beside it. Libraries are interleaved run by run, so machine noise hits all of them
alike. A library that is not installed is not an error: its cells say "not installed". MB are
10^6 bytes of UTF-8 input; memory is MiB.

Each section's table is printed and appended to ``benches/RESULTS.md`` as a run block
(``harness.append_run``: titles "Training", "Encoding, cl100k", "Encoding, GPT-2",
"Pathological input"; a ``--quick`` run's titles say so) unless ``--no-append``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from tokenizer import encode, patho, train  # noqa: E402
from tokenizer.common import (  # noqa: E402
    BENCH,
    DEFAULT_CL100K,
    DEFAULT_CORPUS,
    DEFAULT_GPT2_DIR,
    DEFAULT_RESULTS,
    ENCODERS,
    LIBS,
    TRAINERS,
)
from tokenizer.inputs import prepare_inputs  # noqa: E402
from tokenizer.worker import Run, run_idle, worker  # noqa: E402

SECTIONS = ("train", "encode", "patho")
# option -> (full run, --quick)
DEFAULTS = {
    "vocab_size": (32768, 8192),
    "repeats": (3, 1),
    "encode_repeats": (3, 1),
    "encode_rounds": (3, 1),
    "encode_mb": (10.0, 2.0),
    "ml_mb": (5.0, 2.0),
    "patho_mb": (10.0, 1.0),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="directory of training files")
    p.add_argument("--cl100k", default=str(DEFAULT_CL100K), help="cl100k_base.tiktoken")
    p.add_argument("--gpt2-dir", default=str(DEFAULT_GPT2_DIR), help="encoder.json + vocab.bpe")
    p.add_argument("--quick", action="store_true", help="smoke test: ~10 MB, vocab 8192, 1 repeat")
    p.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    p.add_argument(
        "--libs",
        default=",".join(LIBS),
        help="libraries to include (tiktoken is always kept as the reference)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="default 32768 (quick: 8192)")
    p.add_argument("--repeats", type=int, default=None, help="training runs (default 3)")
    p.add_argument("--encode-repeats", type=int, default=None, help="encode passes (default 3)")
    p.add_argument(
        "--encode-rounds", type=int, default=None, help="interleaved encode rounds (default 3)"
    )
    p.add_argument("--encode-mb", type=float, default=None, help="English sample (default 10)")
    p.add_argument("--ml-mb", type=float, default=None, help="multilingual sample (default 5)")
    p.add_argument("--chunk-kb", type=int, default=10, help="English document size")
    p.add_argument("--patho-mb", type=float, default=None, help="no-whitespace size (default 10)")
    p.add_argument("--patho-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per worker process, seconds")
    p.add_argument("--quick-train-mb", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="markdown file to append to")
    p.add_argument("--no-append", "--no-record", dest="no_append", action="store_true",
                   help="print only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    bad += [lib for lib in args.libs if lib not in LIBS]
    if bad:
        p.error(f"unknown section or library: {bad}")
    return args


def idle_libs(args: argparse.Namespace) -> List[str]:
    """The libraries the selected sections use (an idle worker measures each)."""
    used = {"tiktoken"}
    if "train" in args.only:
        used |= {TRAINERS[k][0] for k in TRAINERS}
    if "encode" in args.only or "patho" in args.only:
        used |= {lib for libs in ENCODERS.values() for lib in libs}
    return [lib for lib in LIBS if lib in used and lib.split("-")[0] in args.libs]


def versions(idle: Dict[str, Run]) -> str:
    """Each distribution's version, as its idle worker saw it."""
    seen: Dict[str, str] = {}
    for lib, r in idle.items():
        dist = LIBS[lib][2]
        if r.error:
            seen.setdefault(dist, "not installed" if r.error.startswith("not installed")
                            else "failed to import")
        seen.setdefault(dist, r.result.get("version", "?"))
    return ", ".join(f"{dist} {v}" for dist, v in seen.items())


def run_sections(args: argparse.Namespace) -> Tuple[List[Tuple[str, str]], Dict[str, Run]]:
    """Every selected section, on inputs cut into a scratch folder (deleted after)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    try:
        inp = prepare_inputs(args, tmp)
        idle = run_idle(idle_libs(args), args.timeout)
        blocks: List[Tuple[str, str]] = []
        if "train" in args.only:
            blocks += train.section(args, inp, idle)
        if "encode" in args.only:
            blocks += encode.section(args, inp, idle)
        if "patho" in args.only:
            blocks += patho.section(args, inp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return blocks, idle


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker), os.path.dirname(args.worker_out))
        Path(args.worker_out).write_text(json.dumps(result))
        return
    t0 = time.perf_counter()
    blocks, idle = run_sections(args)
    extra = {"Versions": versions(idle),
             "Total": f"{time.perf_counter() - t0:.0f} s for the sections {', '.join(args.only)}"}
    if args.quick:
        extra["Quick smoke test"] = "~10 MB, small vocabulary; not comparable to full runs"
    # Tables are written once every section has run: nothing else runs beside the workers.
    for title, body in blocks:
        harness.append_run(BENCH, title + (" (quick smoke test)" if args.quick else ""), body,
                           threads=os.cpu_count(), extra=extra, results=Path(args.results),
                           record=not args.no_append)
    if not args.no_append:
        harness.log(f"appended {len(blocks)} run block(s) to {args.results}")


if __name__ == "__main__":
    main()
