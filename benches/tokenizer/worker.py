"""The worker protocol: every measurement runs in a fresh process.

The parent calls :func:`spawn` with a *spec* (a JSON-able dict, ``kind`` one of ``idle``,
``train``, ``encode``, ``patho``); it runs ``bench_tokenizer.py --worker SPEC --worker-out
PATH`` through :func:`harness.run_measured`, which reports the worker's own peak RSS. The
worker (:func:`worker`) imports only the library it measures, times it, and writes its result
(a JSON dict) to ``PATH``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import harness

from .common import ENTRY, LIBS, ids_digest, lib_version, paragraph_chunks, read_text, utf8_len
from .libs import make_encoder, make_trainer

Spec = Dict[str, Any]
Result = Dict[str, Any]
WARM_UP = "warm-up: Hello, world! 123 \u00e9t\u00e9 \u65e5\u672c\n"


@dataclass
class Run:
    """One worker process: its result, peak RSS (MiB), wall time, and what went wrong."""

    result: Result
    peak_mib: float
    wall_s: float
    error: Optional[str] = None


def spawn(spec: Spec, timeout_s: float, env: Optional[Dict[str, str]] = None) -> Run:
    """Runs one worker process and returns its result and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench_tok_run_") as tmp:
        out_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, str(ENTRY), "--worker", json.dumps(spec), "--worker-out", out_path]
        child_env = dict(os.environ, TIKTOKEN_CACHE_DIR="", **(env or {}))
        m = harness.run_measured(cmd, timeout_s, child_env)
        if m.returncode is None:
            return Run({}, m.peak_mib, m.wall_s, f"timeout > {timeout_s:.0f} s")
        if not m.ok or not os.path.exists(out_path):
            return Run({}, m.peak_mib, m.wall_s, _failure(m))
        return Run(json.loads(Path(out_path).read_text()), m.peak_mib, m.wall_s)


def _failure(m: harness.Measured) -> str:
    """One cell's worth of why a worker failed: a missing library is "not installed"."""
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'$", m.stderr_tail)
    if missing:
        return f"not installed ({missing.group(1)})"
    return f"exit {m.returncode}: {m.stderr_tail}"


def run_idle(libs: Sequence[str], timeout: float) -> Dict[str, Run]:
    """A worker per library that only imports it: the RSS floor beside each peak."""
    out = {}
    for lib in libs:
        out[lib] = spawn({"kind": "idle", "lib": lib}, timeout)
        harness.log(f"[idle] {lib}: {out[lib].peak_mib:.0f} MiB {out[lib].error or ''}")
    return out


def describe(r: Run) -> str:
    return r.error or f"{r.result['seconds']:.3f} s, peak {r.peak_mib:.0f} MiB"


def mbps(r: Run) -> Optional[float]:
    return None if r.error else r.result["bytes"] / r.result["seconds"] / 1e6


def idle_cell(idle: Dict[str, Run], lib: str) -> str:
    return f"{idle[lib].peak_mib:.0f}" if lib in idle and not idle[lib].error else "?"


def load_docs(workload: str, spec: Spec) -> List[str]:
    """English cut into ~``chunk_chars`` documents, or the multilingual files line by line."""
    if workload.startswith("en-"):
        return paragraph_chunks(read_text(spec["en_sample"]), spec["chunk_chars"])
    docs: List[str] = []
    for path in spec["ml_files"]:
        docs.extend(read_text(path).splitlines(keepends=True))
    return docs


def _encode(spec: Spec, scratch: str) -> Result:
    """Times an encoder (kind ``encode``: a workload; ``patho``: one call on one input)."""
    t0 = time.perf_counter()
    enc = make_encoder(spec["lib"], spec["vocab"], spec["cl100k"], spec["gpt2_dir"], scratch)
    load_s = time.perf_counter() - t0
    if spec["kind"] == "patho":
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
    enc.one(WARM_UP)
    if spec["kind"] == "encode" and not spec["workload"].endswith("-call"):
        # A batch call first, for every library alike: thread pools start and lazy
        # imports (numpy, for ours and quicktok) happen before the clock runs.
        enc.batch([WARM_UP] * 8)
    times, out = harness.timed_passes(run, spec["repeats"], spec["budget_s"])
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
        return _encode(spec, scratch)
    raise ValueError(f"unknown worker kind {kind!r}")
