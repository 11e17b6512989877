"""Tokenizer benchmark: our trainer and encoder against the fastest anchors, in one run.

    python benches/bench_tokenizer.py                    # full run, about 10 min on 2 cores
    python benches/bench_tokenizer.py --quick            # ~10 MB smoke test, about 1.5 min
    python benches/bench_tokenizer.py --only encode --encode-repeats 5 --no-append

Sections (targets: issue 6):

* train -- ``Tokenizer.train(files=..., vocab_size=32768)`` with the ``gpt2`` and ``cl100k``
  patterns on every file of the corpus, against gigabpe (``pretokenizer="bytelevel"``),
  rustbpe, bpeasy and Hugging Face ``tokenizers`` (BpeTrainer + ByteLevel), each through its
  fastest natural API: file paths where the library reads files itself (ours, gigabpe, HF),
  otherwise an iterator of ~1 MiB newline-aligned chunks (rustbpe, bpeasy; GPT-2 regex).
* encode -- MB/s with cl100k (ours ``Tokenizer.from_tiktoken``, tiktoken, quicktok-v1,
  riptoken, all built from the same ``.tiktoken`` file) and with GPT-2 (ours
  ``Tokenizer.from_gpt2``, tiktoken, riptoken, from the same ``encoder.json``/``vocab.bpe``):
  English (10 MB from the en_* files) cut into ~10 KB documents at blank lines, one call per
  document on one thread and one batch call over all cores; the multilingual files (5 MB from
  the ml_* files) one line per call, and batched.
  Every library runs with ``encode_ordinary`` semantics (special-token text is plain text),
  and its ids are compared with tiktoken's ("same ids").
* patho -- one 10 MB piece of letters (English with everything but A-Z/a-z removed: no
  whitespace at all) and 1 MB of one letter, plus inputs 10x smaller: seconds and the time
  ratio for 10x the input (linear means <= 12x), ours against tiktoken.

Every measurement runs in a fresh worker process (this script with ``--worker SPEC``). Its
peak RSS comes from ``os.wait4`` (``ru_maxrss``, KiB on Linux) in a tiny launcher process
(see ``LAUNCHER``), nothing subtracted; the RSS of an idle worker that only imported the
library is reported beside it. Training runs ``--repeats`` times (one process per run,
libraries interleaved so machine noise hits all of them alike) and reports the median; an
encode worker warms up with one short call (and, for batched workloads, one small batch call,
which starts thread pools and lazy imports such as numpy), then times ``--encode-repeats``
passes over the same documents (the garbage collector off during a pass, as ``timeit`` does;
see ``timed_passes``); that is repeated for
``--encode-rounds`` rounds, libraries interleaved, and the median of all passes is reported.
MB are 10^6 bytes of UTF-8 input; memory is MiB.

The markdown tables are printed and appended to ``benches/RESULTS.md`` under
``## bench_tokenizer (<date>)`` with the date, the machine and the exact command.
"""

from __future__ import annotations

import argparse
import array
import base64
import datetime
import gc
import hashlib
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CORPUS = SHARED / "corpus"
DEFAULT_CL100K = SHARED / "tiktoken" / "cl100k_base.tiktoken"
DEFAULT_GPT2_DIR = REPO / "tests" / "fixtures" / "gpt2"
DEFAULT_RESULTS = REPO / "benches" / "RESULTS.md"

EOT = "<|endoftext|>"
# tiktoken's published cl100k_base split pattern and special tokens, written out here so the
# reference encoders do not depend on our own pattern table.
CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIALS = {
    EOT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
GPT2_SPECIALS = {EOT: 50256}
# GPT-2's original split regex, for the training anchors that take one (rustbpe, bpeasy).
GPT2_TRAIN_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPEASY_MAX_TOKEN_LENGTH = 128  # bpeasy requires a limit; 128 is its own default
STREAM_CHUNK_BYTES = 1 << 20  # chunk size for the trainers fed by a Python iterator

# library key -> (label in the tables, module to import, distribution name for the version)
LIBS: Dict[str, Tuple[str, str, str]] = {
    "ours": ("**ours (smallgpt)**", "smallgpt", "smallgpt"),
    "ours-lists": ("ours, batch as lists", "smallgpt", "smallgpt"),
    "gigabpe": ("gigabpe", "gigabpe", "gigabpe"),
    "rustbpe": ("rustbpe", "rustbpe", "rustbpe"),
    "bpeasy": ("bpeasy", "bpeasy", "bpeasy"),
    "hf": ("HF tokenizers", "tokenizers", "tokenizers"),
    "tiktoken": ("tiktoken", "tiktoken", "tiktoken"),
    "quicktok": ("quicktok-v1", "quicktok", "quicktok-v1"),
    "riptoken": ("riptoken", "riptoken", "riptoken"),
}
# trainer key -> (library key, split pattern name shown in the table)
TRAINERS: Dict[str, Tuple[str, str]] = {
    "ours-gpt2": ("ours", "gpt2"),
    "ours-cl100k": ("ours", "cl100k"),
    "gigabpe": ("gigabpe", "gpt2 (bytelevel)"),
    "rustbpe": ("rustbpe", "gpt2"),
    "bpeasy": ("bpeasy", "gpt2"),
    "hf": ("hf", "gpt2 (ByteLevel)"),
}
ENCODERS: Dict[str, List[str]] = {
    "cl100k": ["ours", "ours-lists", "tiktoken", "quicktok", "riptoken"],
    "gpt2": ["ours", "ours-lists", "tiktoken", "riptoken"],
}
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
LINEAR_LIMIT = 12.0  # issue 6: 10x the input may cost at most 12x the time
PATHO_GIVE_UP = 15.0  # a large pathological run is stopped after this many times the small one
PATHO_LARGE_BUDGET = 2.0  # large pathological input: more passes only while under this (s)

# Linux starts a new process's ru_maxrss at the RSS high-water mark of the process that
# forked it, so a worker forked by this (large) parent would report at least the parent's
# peak. Workers are therefore started by this tiny launcher (python -S, ~8 MiB RSS, the floor),
# which takes the worker's peak RSS from os.wait4 (ru_maxrss, KiB) and writes it to argv[1].
LAUNCHER = """
import os, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""

Spec = Dict[str, Any]
Result = Dict[str, Any]


# --------------------------------------------------------------------------------- helpers


def read_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """Parses a ``.tiktoken`` file (``base64-token rank`` per line)."""
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_ranks(gpt2_dir: str) -> Dict[bytes, int]:
    """GPT-2 ranks through tiktoken's own loader (caching disabled: local files only)."""
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    return data_gym_to_mergeable_bpe_ranks(
        os.path.join(gpt2_dir, "vocab.bpe"), os.path.join(gpt2_dir, "encoder.json")
    )


def gpt2_tiktoken_pattern() -> str:
    from tiktoken_ext.openai_public import r50k_pat_str

    return r50k_pat_str


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_prefix(path: str, limit: int, sep: bytes = b"\n") -> str:
    """About the first ``limit`` bytes of a file, cut after the last ``sep``."""
    with open(path, "rb") as f:
        data = f.read(limit)
    if len(data) == limit:
        cut = data.rfind(sep)
        data = data[: cut + len(sep)] if cut >= 0 else data
    return data.decode("utf-8")


def newline_chunks(files: Sequence[str], size: int = STREAM_CHUNK_BYTES) -> Iterator[str]:
    """Streams files as ~``size``-character pieces that end at a newline."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            rest = ""
            while True:
                block = f.read(size)
                if not block:
                    break
                block = rest + block
                cut = block.rfind("\n") + 1
                if cut == 0:
                    rest = block
                    continue
                rest = block[cut:]
                yield block[:cut]
            if rest:
                yield rest


def paragraph_chunks(text: str, target_chars: int) -> List[str]:
    """Cuts text at blank lines into documents of at least ``target_chars`` (the last may be
    shorter); the documents concatenate back to ``text``."""
    docs: List[str] = []
    start = 0
    for m in re.finditer(r"\n[ \t]*\n", text):
        if m.end() - start >= target_chars:
            docs.append(text[start : m.end()])
            start = m.end()
    if start < len(text):
        docs.append(text[start:])
    return docs


def utf8_len(docs: Sequence[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def ids_digest(out: Any) -> Tuple[str, int]:
    """A hash of a list of id sequences (or quicktok's ``(tokens, offsets)`` pair) and the
    number of ids; equal hashes mean identical ids document by document."""
    h = hashlib.sha256()
    n = 0
    if isinstance(out, tuple):
        tokens, offsets = out
        for i in range(len(offsets) - 1):
            doc = tokens[int(offsets[i]) : int(offsets[i + 1])]
            h.update(len(doc).to_bytes(8, "little"))
            h.update(doc.astype("<u4").tobytes())
        n = len(tokens)
    else:
        for ids in out:
            h.update(len(ids).to_bytes(8, "little"))
            h.update(array.array("I", ids).tobytes())
            n += len(ids)
    return h.hexdigest()[:16], n


def lib_version(key: str) -> str:
    try:
        return metadata.version(LIBS[key][2])
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------- trainers

TrainFn = Callable[[List[str], int], int]


def make_trainer(key: str) -> TrainFn:
    """Imports the library and returns ``train(files, vocab_size) -> final vocab size``."""
    if key.startswith("ours-"):
        from smallgpt import Tokenizer

        pattern = key.split("-", 1)[1]

        def train_ours(files: List[str], vocab_size: int) -> int:
            tok = Tokenizer.train(files=files, vocab_size=vocab_size, pattern=pattern)
            return tok.vocab_size

        return train_ours
    if key == "gigabpe":
        import gigabpe

        def train_gigabpe(files: List[str], vocab_size: int) -> int:
            vocab, _merges = gigabpe.train_bpe(
                files, vocab_size, special_tokens=[EOT], pretokenizer="bytelevel"
            )
            return len(vocab)

        return train_gigabpe
    if key == "rustbpe":
        import rustbpe

        def train_rustbpe(files: List[str], vocab_size: int) -> int:
            tok = rustbpe.Tokenizer()
            tok.train_from_iterator(newline_chunks(files), vocab_size, pattern=GPT2_TRAIN_PAT)
            return int(tok.vocab_size)

        return train_rustbpe
    if key == "bpeasy":
        import bpeasy

        def train_bpeasy(files: List[str], vocab_size: int) -> int:
            vocab = bpeasy.train_bpe(
                newline_chunks(files), GPT2_TRAIN_PAT, BPEASY_MAX_TOKEN_LENGTH, vocab_size
            )
            return len(vocab)

        return train_bpeasy
    if key == "hf":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        def train_hf(files: List[str], vocab_size: int) -> int:
            tok = HFTokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=[EOT],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train(files, trainer)
            return tok.get_vocab_size()

        return train_hf
    raise ValueError(f"unknown trainer {key!r}")


# --------------------------------------------------------------------------------- encoders


@dataclass
class Encoder:
    one: Callable[[str], Any]  # one document -> ids
    batch: Callable[[List[str]], Any]  # documents -> ids per document, all cores


def make_encoder(lib: str, vocab: str, cl100k_path: str, gpt2_dir: str, tmp: str) -> Encoder:
    """Builds ``lib``'s encoder for ``vocab`` ("cl100k" or "gpt2") from the shared files."""
    threads = os.cpu_count() or 1
    if lib in ("ours", "ours-lists"):
        from smallgpt import Tokenizer

        if vocab == "cl100k":
            tok = Tokenizer.from_tiktoken(cl100k_path)
        else:
            tok = Tokenizer.from_gpt2(
                os.path.join(gpt2_dir, "encoder.json"), os.path.join(gpt2_dir, "vocab.bpe")
            )
        if lib == "ours-lists":
            return Encoder(tok.encode_ordinary, tok.encode_ordinary_batch)
        # Flat arrays, as quicktok's batch call returns.
        return Encoder(
            tok.encode_ordinary,
            lambda docs: tok.encode_batch_to_numpy(docs, disallowed_special=()),
        )

    if vocab == "cl100k":
        ranks, specials, pattern = read_tiktoken_ranks(cl100k_path), CL100K_SPECIALS, CL100K_PAT
    else:
        ranks, specials, pattern = gpt2_ranks(gpt2_dir), GPT2_SPECIALS, gpt2_tiktoken_pattern()

    if lib == "tiktoken":
        import tiktoken

        enc = tiktoken.Encoding(
            f"{vocab}-bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        return Encoder(
            enc.encode_ordinary, lambda docs: enc.encode_ordinary_batch(docs, num_threads=threads)
        )
    if lib == "riptoken":
        import riptoken

        core = riptoken.CoreBPE(ranks, specials, pattern)
        return Encoder(core.encode_ordinary, core.encode_ordinary_batch)
    if lib == "quicktok":
        if vocab != "cl100k":
            raise ValueError("quicktok has no scanner for the GPT-2 pattern")
        import quicktok
        from quicktok import _import_core

        # quicktok reads its own binary vocabulary; write it from the same .tiktoken ranks
        # with quicktok's importer (the result is byte-identical to its bundled cl100k).
        _import_core.write_files(tmp, "cl100k_bench", ranks, specials, "cl100k", False)
        bundled = os.path.join(os.path.dirname(quicktok.__file__), "data")
        _import_core.ensure_tables(tmp, bundled, "cl100k", False)
        qt = quicktok.Tokenizer("cl100k_bench", tmp)
        return Encoder(qt.encode_ordinary, lambda docs: qt.encode_batch(docs, 0, False))
    raise ValueError(f"unknown encoder {lib!r}")


def load_docs(workload: str, spec: Spec) -> List[str]:
    if workload.startswith("en-"):
        return paragraph_chunks(read_text(spec["en_sample"]), spec["chunk_chars"])
    docs: List[str] = []
    for path in spec["ml_files"]:
        docs.extend(read_text(path).splitlines(keepends=True))
    return docs


def timed_passes(fn: Callable[[], Any], repeats: int, budget_s: float) -> Tuple[List[float], Any]:
    """Runs ``fn`` ``repeats`` times (fewer once ``budget_s`` is spent, at least once).

    As ``timeit`` does, the cyclic garbage collector is off while a pass runs, and the
    previous pass's output is freed (and collected) before the clock starts: otherwise a
    pass that returns tens of thousands of lists spends a quarter or more of its time in
    the collector walking those lists (and the previous pass's), a cost that is the same
    for every library and hides the tokenizer's own.
    """
    times: List[float] = []
    out: Any = None
    start = time.perf_counter()
    for _ in range(repeats):
        out = None
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
        if time.perf_counter() - start > budget_s:
            break
    return times, out


# --------------------------------------------------------------------------------- worker


def worker(spec: Spec, scratch: str) -> Result:
    """Runs one measurement; ``scratch`` is a directory the parent deletes afterwards."""
    kind = spec["kind"]
    if kind == "idle":
        importlib.import_module(LIBS[spec["lib"]][1])
        return {"version": lib_version(spec["lib"])}
    if kind == "train":
        train = make_trainer(spec["trainer"])
        t0 = time.perf_counter()
        vocab = train(spec["files"], spec["vocab_size"])
        return {"seconds": time.perf_counter() - t0, "vocab": vocab}
    if kind in ("encode", "patho"):
        t0 = time.perf_counter()
        enc = make_encoder(spec["lib"], spec["vocab"], spec["cl100k"], spec["gpt2_dir"], scratch)
        load_s = time.perf_counter() - t0
        if kind == "patho":
            text = read_text(spec["input"])
            docs = [text]
            run: Callable[[], Any] = lambda: [enc.one(text)]  # noqa: E731
        else:
            docs = load_docs(spec["workload"], spec)
            if spec["workload"].endswith("-call"):
                one = enc.one
                run = lambda: [one(d) for d in docs]  # noqa: E731
            else:
                batch = enc.batch
                run = lambda: batch(docs)  # noqa: E731
        warm_up = "warm-up: Hello, world! 123 \u00e9t\u00e9 \u65e5\u672c\n"
        enc.one(warm_up)
        if kind == "encode" and not spec["workload"].endswith("-call"):
            # A batch call first, for every library alike: thread pools start and lazy
            # imports (numpy, for ours and quicktok) happen before the clock runs.
            enc.batch([warm_up] * 8)
        times, out = timed_passes(run, spec["repeats"], spec["budget_s"])
        digest, n_ids = ids_digest(out)
        return {
            "seconds": statistics.median(times),
            "times": times,
            "bytes": utf8_len(docs),
            "docs": len(docs),
            "digest": digest,
            "ids": n_ids,
            "load_s": load_s,
        }
    raise ValueError(f"unknown worker kind {kind!r}")


# --------------------------------------------------------------------------------- parent


@dataclass
class Run:
    result: Result
    peak_mib: float
    wall_s: float
    error: Optional[str] = None


def spawn(spec: Spec, timeout_s: float, env: Optional[Dict[str, str]] = None) -> Run:
    """Runs one worker process (through ``LAUNCHER``) and returns its result and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench_tok_run_") as tmp:
        out_path = os.path.join(tmp, "result.json")
        rss_path = os.path.join(tmp, "maxrss")
        err_path = os.path.join(tmp, "stderr.txt")
        cmd = [sys.executable, "-S", "-c", LAUNCHER, rss_path]
        cmd += [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        cmd += ["--worker-out", out_path]
        child_env = dict(os.environ, TIKTOKEN_CACHE_DIR="", **(env or {}))
        t0 = time.perf_counter()
        timed_out = False
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env,
                start_new_session=True,  # its own process group: a timeout kills both
            )
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
        wall = time.perf_counter() - t0
        rss = Path(rss_path).read_text().strip() if os.path.exists(rss_path) else ""
        peak = int(rss) / 1024.0 if rss else float("nan")
        if timed_out:
            return Run({}, peak, wall, f"timeout > {timeout_s:.0f} s")
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = Path(err_path).read_text(errors="replace").strip().splitlines()[-3:]
            return Run({}, peak, wall, f"exit {proc.returncode}: {' | '.join(tail)}")
        return Run(json.loads(Path(out_path).read_text()), peak, wall)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Inputs:
    train_files: List[str]
    train_bytes: int
    en_sample: str
    ml_files: List[str]
    patho: Dict[str, str] = field(default_factory=dict)  # name -> path


def prepare_inputs(args: argparse.Namespace, tmp: Path) -> Inputs:
    corpus = Path(args.corpus)
    files = sorted(str(p) for p in corpus.iterdir() if p.is_file())
    if not files:
        sys.exit(f"no files in {corpus}")
    en_files = [f for f in files if Path(f).name.startswith("en_")]
    ml_files = [f for f in files if Path(f).name.startswith("ml_")]
    if not en_files or not ml_files:
        sys.exit(f"{corpus} needs en_*.txt (English) and ml_*.txt (multilingual) files")

    train_files = files
    if args.quick:  # ~10 MB: the start of every file, cut at a newline
        (tmp / "train").mkdir()
        per_file = args.quick_train_mb * 1_000_000 // len(files)
        train_files = []
        for f in files:
            dst = tmp / "train" / Path(f).name
            dst.write_text(read_prefix(f, per_file), encoding="utf-8")
            train_files.append(str(dst))
    train_bytes = sum(os.path.getsize(f) for f in train_files)

    # Multilingual sample: the same share of every ml_* file (all of the small ones).
    (tmp / "ml").mkdir()
    per_file = int(args.ml_mb * 1_000_000) // len(ml_files)
    ml_sample = []
    for f in ml_files:
        dst = tmp / "ml" / Path(f).name
        dst.write_text(read_prefix(f, per_file), encoding="utf-8")
        ml_sample.append(str(dst))

    # English sample: the same share of every en_* file, cut at a blank line.
    per_file = int(args.encode_mb * 1_000_000) // len(en_files)
    parts = []
    for f in en_files:
        parts.append(read_prefix(f, per_file, b"\n\n"))
    en_sample = tmp / "en_sample.txt"
    en_sample.write_text("".join(parts), encoding="utf-8")

    # Pathological inputs: letters only (no whitespace) and one repeated letter.
    big = int(args.patho_mb * 1_000_000)
    letters: List[str] = []
    have = 0
    for f in en_files:
        with open(f, encoding="utf-8") as fh:
            while have < big:
                block = fh.read(1 << 22)
                if not block:
                    break
                kept = re.sub(r"[^A-Za-z]+", "", block)
                letters.append(kept)
                have += len(kept)
        if have >= big:
            break
    nows = "".join(letters)[:big]
    one = max(big // 10, 1)
    patho_texts = {
        "nows-large": nows,
        "nows-small": nows[: big // 10],
        "one-large": "a" * one,
        "one-small": "a" * (one // 10),
    }
    patho = {}
    for name, text in patho_texts.items():
        path = tmp / f"{name}.txt"
        path.write_text(text, encoding="ascii")
        patho[name] = str(path)
    return Inputs(train_files, train_bytes, str(en_sample), ml_sample, patho)


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe(r: Run) -> str:
    return r.error or f"{r.result['seconds']:.3f} s, peak {r.peak_mib:.0f} MiB"


def mbps(r: Run) -> Optional[float]:
    return None if r.error else r.result["bytes"] / r.result["seconds"] / 1e6


def ratio(x: float) -> str:
    return f"{x:.2f}×"


def run_idle(libs: Sequence[str], timeout: float) -> Dict[str, Run]:
    out = {}
    for lib in libs:
        out[lib] = spawn({"kind": "idle", "lib": lib}, timeout)
        log(f"[idle] {lib}: {out[lib].peak_mib:.0f} MiB {out[lib].error or ''}")
    return out


def section_train(args: argparse.Namespace, inp: Inputs, idle: Dict[str, Run]) -> str:
    keys = [k for k in TRAINERS if k.split("-")[0] in args.libs or k in args.libs]
    runs: Dict[str, List[Run]] = {k: [] for k in keys}
    for rep in range(args.repeats):  # interleaved: noise hits every trainer alike
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
            log(
                f"[train {rep + 1}/{args.repeats}] {key}: "
                + (r.error or f"{sec:.2f} s, peak {r.peak_mib:.0f} MiB")
            )

    stats: Dict[str, Tuple[float, float]] = {}  # key -> (median s, max peak MiB)
    for key, rs in runs.items():
        good = [r for r in rs if not r.error]
        if good:
            stats[key] = (
                statistics.median(r.result["seconds"] for r in good),
                max(r.peak_mib for r in good),
            )
    anchors = [k for k in stats if not k.startswith("ours-")]
    best = min(anchors, key=lambda k: stats[k][0]) if anchors else None

    rows = []
    for key in keys:
        lib, pattern = TRAINERS[key]
        rs = runs[key]
        errors = [r.error for r in rs if r.error]
        idle_mib = f"{idle[lib].peak_mib:.0f}" if lib in idle and not idle[lib].error else "?"
        if key not in stats:
            rows.append(
                [LIBS[lib][0], pattern, "-", errors[0] or "failed", "", "", idle_mib, "", ""]
            )
            continue
        med, peak = stats[key]
        good = [r for r in rs if not r.error]
        vocab = str(good[0].result["vocab"])
        each = ", ".join(f"{r.result['seconds']:.2f}" for r in good)
        if errors:
            each += f" ({len(errors)} failed: {errors[0]})"
        speed = mem = ""
        if key.startswith("ours-") and best is not None:
            speed = ratio(stats[best][0] / med)
            mem = ratio(peak / stats[best][1])
        label = LIBS[lib][0]
        rows.append(
            [label, pattern, vocab, f"{med:.2f}", each, f"{peak:.0f}", idle_mib, speed, mem]
        )
    header = [
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
    out = [
        f"### Training: {len(inp.train_files)} files, {fmt_mb(inp.train_bytes)}, "
        f"vocab_size {args.vocab_size}, median of {args.repeats} run(s)",
        "",
        md_table(header, rows),
        "",
    ]
    if best is not None:
        out.append(
            f"Best anchor: {LIBS[TRAINERS[best][0]][0]} ({stats[best][0]:.2f} s, "
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
        "them; gigabpe's base alphabet is only the bytes seen."
    )
    return "\n".join(out)


def section_encode(args: argparse.Namespace, inp: Inputs, idle: Dict[str, Run]) -> str:
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
    parts: List[str] = []
    data_line = ""
    for vocab, libs in ENCODERS.items():
        libs = [lib for lib in libs if lib.split("-")[0] in args.libs or lib == "tiktoken"]
        workloads = VOCAB_WORKLOADS[vocab]
        res: Dict[Tuple[str, str], Run] = {}
        # Rounds interleave the libraries, so a slow spell of this shared machine hits all of
        # them alike; each cell is the median over every pass of every round.
        for rnd in range(args.encode_rounds):
            for wl in workloads:
                env = {"RAYON_NUM_THREADS": "1"} if wl.endswith("-call") else None
                for lib in libs:
                    if lib == "ours-lists" and wl.endswith("-call"):
                        continue  # the same call as "ours"
                    spec = dict(base, lib=lib, vocab=vocab, workload=wl)
                    r = spawn(spec, args.timeout, env)
                    prev = res.get((lib, wl))
                    if prev is not None and not prev.error and not r.error:
                        r.result["times"] = prev.result["times"] + r.result["times"]
                        r.result["seconds"] = statistics.median(r.result["times"])
                        r.peak_mib = max(r.peak_mib, prev.peak_mib)
                    if prev is None or not prev.error:
                        res[lib, wl] = r
                    msg = r.error or (
                        f"{r.result['bytes'] / r.result['seconds'] / 1e6:.1f} MB/s, "
                        f"peak {r.peak_mib:.0f} MiB"
                    )
                    log(f"[encode {vocab} round {rnd + 1}] {wl} {lib}: {msg}")
        ref = {wl: res["tiktoken", wl].result.get("digest") for wl in workloads}
        rows = []
        for lib in libs:
            cells = [LIBS[lib][0]]
            diff = []
            for wl in workloads:
                if (lib, wl) not in res:
                    cells.append("(as above)")
                    continue
                r = res[lib, wl]
                v = mbps(res[lib, wl])
                cells.append(r.error or f"{v:.1f} ({r.result['seconds']:.2f} s)")
                if not r.error and ref[wl] and r.result["digest"] != ref[wl]:
                    diff.append(wl)
            if lib == "tiktoken":
                same = "reference"
            elif any(res[lib, wl].error for wl in workloads if (lib, wl) in res):
                same = "n/a"
            else:
                same = "yes" if not diff else "NO: " + ", ".join(diff)
            mine = [res[lib, wl] for wl in workloads if (lib, wl) in res]
            peaks = [r.peak_mib for r in mine if not r.error]
            idle_mib = f"{idle[lib].peak_mib:.0f}" if lib in idle and not idle[lib].error else "?"
            cells += [same, f"{max(peaks):.0f}" if peaks else "-", idle_mib]
            rows.append(cells)
        if "ours" in libs:
            cells = ["ours / best anchor"]
            for wl in workloads:
                anchor_v = [
                    (mbps(res[lib, wl]), lib) for lib in libs if not lib.startswith("ours")
                ]
                valid = [(v, lib) for v, lib in anchor_v if v is not None]
                ours_v = mbps(res["ours", wl])
                if valid and ours_v is not None:
                    v, lib = max(valid)
                    cells.append(f"**{ratio(ours_v / v)}** (vs {LIBS[lib][0]})")
                else:
                    cells.append("-")
            rows.append(cells + ["", "", ""])
        header = ["encoder"] + [f"{WORKLOADS[wl]} MB/s" for wl in workloads]
        header += ["same ids as tiktoken", "peak MiB", "idle MiB"]
        titles = {"cl100k": "cl100k (`Tokenizer.from_tiktoken`)", "gpt2": "GPT-2 (`from_gpt2`)"}
        title = titles[vocab]
        parts += [f"### Encoding, {title}", "", md_table(header, rows), ""]
        if not data_line:
            en = res["tiktoken", "en-call"].result
            ml = res.get(("tiktoken", "ml-call"))
            data_line = (
                f"English: {fmt_mb(en.get('bytes', 0))} of the en_* files in "
                f"{en.get('docs', 0)} documents of ~{args.chunk_kb} KB (cut at blank lines)"
            )
            if ml is not None and not ml.error:
                data_line += (
                    f"; multilingual: {fmt_mb(ml.result['bytes'])} of the ml_* files, "
                    f"{ml.result['docs']} lines"
                )
            data_line += (
                f". MB/s (median pass seconds) over {args.encode_rounds} interleaved round(s) "
                f"of {args.encode_repeats} pass(es). Per call: "
                "one thread (RAYON_NUM_THREADS=1); batched: each library's batch call on all "
                f"{os.cpu_count()} cores (ours `encode_batch_to_numpy`, flat arrays like "
                "quicktok's, and `encode_ordinary_batch`, lists of lists, tiktoken "
                "`encode_ordinary_batch`, quicktok `encode_batch`, riptoken "
                "`encode_ordinary_batch`). All use encode_ordinary semantics. quicktok's "
                "vocabulary is written from the same .tiktoken file with its importer; it has "
                "no GPT-2 scanner, so it is absent from the GPT-2 table."
            )
    return "\n".join(parts + [data_line])


def section_patho(args: argparse.Namespace, inp: Inputs) -> str:
    base: Spec = {
        "kind": "patho",
        "vocab": "cl100k",
        "cl100k": args.cl100k,
        "gpt2_dir": args.gpt2_dir,
        "repeats": args.encode_repeats,
        "budget_s": 10.0,
    }
    libs = [lib for lib in ("ours", "tiktoken") if lib in args.libs or lib == "tiktoken"]
    inputs = {
        "nows": "letters only, no whitespace (one piece)",
        "one": "one letter repeated ('a')",
    }
    rows = []
    for name, desc in inputs.items():
        digests: Dict[str, Dict[str, Optional[str]]] = {}
        for lib in libs:
            small = spawn(dict(base, lib=lib, input=inp.patho[f"{name}-small"]), args.timeout)
            log(f"[patho] {name}-small {lib}: {describe(small)}")
            if small.error:
                large = Run({}, 0.0, 0.0, "skipped")
            else:
                # A linear encoder needs ~10x; give up well past the 12x target.
                # (Extra passes start only within PATHO_LARGE_BUDGET, so add at most twice it.)
                budget = (
                    small.wall_s
                    + PATHO_GIVE_UP * small.result["seconds"]
                    + 2 * PATHO_LARGE_BUDGET
                    + 5.0
                )
                timeout = min(args.patho_timeout, budget)
                # Measured like the small input (median of passes) where that is cheap, so
                # that the ratio compares warm passes with warm passes; slow encoders get
                # one pass.
                spec = dict(
                    base, lib=lib, input=inp.patho[f"{name}-large"], budget_s=PATHO_LARGE_BUDGET
                )
                large = spawn(spec, timeout)
                log(f"[patho] {name}-large {lib}: {describe(large)}")
            digests[lib] = {
                "small": small.result.get("digest"),
                "large": large.result.get("digest"),
            }
            s_size = os.path.getsize(inp.patho[f"{name}-small"])
            l_size = os.path.getsize(inp.patho[f"{name}-large"])
            s_txt = small.error or f"{small.result['seconds']:.3f}"
            if large.error and large.error.startswith("timeout"):
                # Lower bound: the stopped run's wall time less the setup (start, imports,
                # vocabulary) that the small run needed besides encoding.
                setup = small.wall_s - sum(small.result["times"])
                least = max(large.wall_s - setup, 0.0)
                bound = least / small.result["seconds"]
                l_txt = f"> {least:.1f} (stopped)"
                r_txt = f"> {bound:.0f}×"
                linear = "no" if bound > LINEAR_LIMIT else "?"
            elif large.error:
                l_txt, r_txt, linear = large.error, "-", "?"
            else:
                lsec = large.result["seconds"]
                l_txt = f"{lsec:.3f} ({l_size / lsec / 1e6:.1f} MB/s)"
                rr = lsec / small.result["seconds"]
                r_txt = ratio(rr)
                linear = "yes" if rr <= LINEAR_LIMIT else "no"
            rows.append(
                [
                    desc,
                    LIBS[lib][0],
                    f"{fmt_mb(s_size)}: {s_txt}",
                    f"{fmt_mb(l_size)}: {l_txt}",
                    r_txt,
                    linear,
                    f"{large.peak_mib:.0f}" if not large.error else "-",
                    "",
                ]
            )
        if "ours" in digests and "tiktoken" in digests:
            same = [
                size
                for size in ("small", "large")
                if digests["ours"][size] and digests["ours"][size] == digests["tiktoken"][size]
            ]
            checked = [
                size
                for size in ("small", "large")
                if digests["ours"][size] and digests["tiktoken"][size]
            ]
            verdict = "yes" if same == checked and checked else ("n/a" if not checked else "NO")
            for row in rows[-len(libs) :]:
                row[-1] = verdict + (f" ({', '.join(checked)})" if checked else "")
    header = [
        "input",
        "encoder",
        "small: s",
        "10× larger: s",
        "time ratio (10× input)",
        f"linear (≤ {LINEAR_LIMIT:.0f}×)",
        "peak MiB (large)",
        "same ids",
    ]
    return "\n".join(
        [
            "### Pathological input, cl100k, one `encode_ordinary` call",
            "",
            md_table(header, rows),
            "",
            f"Both sizes: median of up to {args.encode_repeats} passes (the large input gets "
            f"more than one only while its passes so far took under {PATHO_LARGE_BUDGET:.0f} s, "
            f"so warm passes are compared with warm passes); a large run is stopped once it "
            f"exceeds {PATHO_GIVE_UP:.0f}× the small time (or --patho-timeout "
            f"{args.patho_timeout:.0f} s).",
        ]
    )


def machine_line() -> str:
    model = "?"
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", info, re.M)
        if m:
            model = m.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    return (
        f"{model}, {os.cpu_count()} cores; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def append_results(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text("# Benchmark results\n", encoding="utf-8")
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + section.rstrip() + "\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="directory of training files")
    p.add_argument("--cl100k", default=str(DEFAULT_CL100K), help="cl100k_base.tiktoken")
    p.add_argument("--gpt2-dir", default=str(DEFAULT_GPT2_DIR), help="encoder.json + vocab.bpe")
    p.add_argument("--quick", action="store_true", help="smoke test: ~10 MB, vocab 8192, 1 repeat")
    p.add_argument("--only", default="train,encode,patho", help="sections to run")
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
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (
        ("vocab_size", 32768, 8192),
        ("repeats", 3, 1),
        ("encode_repeats", 3, 1),
        ("encode_rounds", 3, 1),
        ("encode_mb", 10.0, 2.0),
        ("ml_mb", 5.0, 2.0),
        ("patho_mb", 10.0, 1.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    bad = [s for s in args.only if s not in ("train", "encode", "patho")]
    bad += [lib for lib in args.libs if lib not in LIBS]
    if bad:
        p.error(f"unknown section or library: {bad}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker), os.path.dirname(args.worker_out))
        Path(args.worker_out).write_text(json.dumps(result))
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]]
    )
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    try:
        inp = prepare_inputs(args, tmp)
        used = {"tiktoken"}
        if "train" in args.only:
            used |= {TRAINERS[k][0] for k in TRAINERS}
        if "encode" in args.only or "patho" in args.only:
            used |= {lib for libs in ENCODERS.values() for lib in libs}
        idle = run_idle(
            [lib for lib in LIBS if lib in used and lib.split("-")[0] in args.libs], args.timeout
        )
        sections = []
        if "train" in args.only:
            sections.append(section_train(args, inp, idle))
        if "encode" in args.only:
            sections.append(section_encode(args, inp, idle))
        if "patho" in args.only:
            sections.append(section_patho(args, inp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    versions = ", ".join(
        f"{LIBS[lib][2]} {r.result.get('version', '?')}" for lib, r in idle.items()
    )
    head = [
        f"## bench_tokenizer ({started:%Y-%m-%d})",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; total {time.perf_counter() - t0:.0f} s",
        f"- machine: {machine_line()}",
        f"- command: `{command}`",
        f"- versions: {versions}",
    ]
    if args.quick:
        head.append("- **quick smoke test** (~10 MB, small vocab): not comparable to full runs")
    report = "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"
    print(report)
    if not args.no_append:
        append_results(Path(args.results), report)
        log(f"appended to {args.results}")


if __name__ == "__main__":
    main()
