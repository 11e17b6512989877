"""smallgpt-serve under load: continuous batching against one request at a time.

Two servers of the same model run side by side, ``smallgpt-serve MODEL`` (up to
``--max-batch`` sequences per decoding step, default 64) and ``smallgpt-serve MODEL
--max-batch 1`` (one request at a time, what a server without batching does). For 1, 4, 16
and 64 concurrent streaming clients, each sending requests back to back for ``--seconds``,
the bench measures the tokens per second all clients receive together and the time to the
first token of each request (p50, p99). Cells are interleaved (every repeat runs every
concurrency on both servers) and reported as mean ± sd over ``--repeats``.

Models (on the CPU, fp32):

* the quickstart model: ``smallgpt-train`` with no arguments (the shakespeare-cpu preset,
  32 s, 1 layer x 128, context 64) into a scratch folder; ``--quickstart random`` builds that
  shape with random weights instead (no training: for smoke tests);
* a ``gpt2-124m``-shaped model (12 layers x 768, context 1024, GPT-2's vocabulary) with random
  weights.

Targets (issue 22): at 16 clients, >= 4x the tokens/s of one-at-a-time; first-token p99 under
1 s at 16 clients for the quickstart model on two cores.

The clients are raw asyncio HTTP/1.0 connections in this process (one per request), so the
load generator costs little next to the server it measures. Tokens are counted from the
server's running usage figures (``stream_options.continuous_usage_stats``), so tokens of
requests cut off at the end of a window count too; a request still waiting for its first
token when the window closes enters the first-token figures with the time it had waited (a
lower bound, marked ">=").

    python benches/bench_serve.py                    # full run (~10 minutes on 2 cores)
    python benches/bench_serve.py --quick --no-record    # smoke test (~1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

from harness import append_run, fmt_mean, md_table, mean_spread  # noqa: E402

CONCURRENCY = (1, 4, 16, 64)
QS_TOKENS = 40  # new tokens per request: prompts of <= 16 tokens, context 64
GPT2_TOKENS = 64  # prompts of <= 32 tokens


# ------------------------------------------------------------------ models


def quickstart_model(work: Path, mode: str) -> Path:
    """A run folder of the quickstart model (trained for 32 s, or random weights)."""
    out = work / "quickstart"
    if mode == "train":
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
        subprocess.run([sys.executable, "-m", "smallgpt.cli.train", "--out", str(out),
                        "--overwrite"], check=True, env=env, stdout=subprocess.DEVNULL)
        return out
    from smallgpt.checkpoint import Checkpoint
    from smallgpt.config import load_preset
    from smallgpt.data import default_cache_dir, prepare_shakespeare
    from smallgpt.model import GPT, GPTConfig
    from smallgpt.tokenizer import Tokenizer

    shards = prepare_shakespeare(default_cache_dir())
    tok = Tokenizer.load(shards / "tokenizer.json")
    shape = dict(load_preset("shakespeare-cpu")["model"], vocab_size=tok.vocab_size)
    model = GPT(GPTConfig(**shape))
    out.mkdir(parents=True, exist_ok=True)
    Checkpoint(model.config, model.state_dict(), tokenizer=tok.to_json_str()).save(
        out / "ckpt_best.pt")
    return out


def gpt2_model(work: Path) -> Path:
    """A checkpoint of GPT-2 small's shape with random weights and GPT-2's vocabulary."""
    import torch

    from smallgpt.checkpoint import Checkpoint
    from smallgpt.model import GPT, GPTConfig
    from smallgpt.tokenizer import Tokenizer

    fx = ROOT / "tests" / "fixtures" / "gpt2"
    tok = Tokenizer.from_gpt2(fx / "encoder.json", fx / "vocab.bpe")
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # 12 x 768, context 1024, vocabulary 50304
    out = work / "gpt2-124m"
    out.mkdir(parents=True, exist_ok=True)
    Checkpoint(model.config, model.state_dict(), tokenizer=tok.to_json_str()).save(
        out / "ckpt_best.pt")
    return out


def prompts(model: Path, n: int, limit: int, seed: int) -> List[str]:
    """Snippets of the bundled Tiny Shakespeare of at most ``limit`` tokens (with the
    <|endoftext|> the server puts in front)."""
    from smallgpt.checkpoint import load_model

    tok = load_model(model).tokenizer
    assert tok is not None
    words = (ROOT / "python" / "smallgpt" / "assets" / "tinyshakespeare.txt").read_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(words) - limit)
        k = limit
        while len(tok.encode(" ".join(words[i : i + k]))) + 1 > limit:
            k -= 1
        out.append(" ".join(words[i : i + k]))
    return out


# ------------------------------------------------------------------ servers


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen

    def health(self) -> Dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=30) as r:
            return json.loads(r.read())

    def wait_idle(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = self.health()
            if s["running"] == 0 and s["waiting"] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not go idle: {s}")
            time.sleep(0.05)


def start_server(name: str, model: Path, max_batch: int, threads: Optional[int]) -> Server:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "smallgpt.cli.serve", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--no-access-log", "--device", "cpu",
           "--dtype", "float32"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    server = Server(name, port, proc)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            server.health()
            return server
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start") from None
            time.sleep(0.1)


# ------------------------------------------------------------------ clients


@dataclass
class Cell:
    tokens: int = 0
    ttft: List[float] = field(default_factory=list)
    censored: int = 0  # requests with no first token when the window closed
    requests: int = 0


async def _request(port: int, body: bytes, cell: Cell, deadline: float) -> None:
    """One streamed completion; adds its tokens and first-token time to ``cell``."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    first: Optional[float] = None
    last = b""
    try:
        writer.write(b"POST /v1/completions HTTP/1.0\r\nHost: bench\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            status = head.split(b"\r\n")[0].decode()
            raise RuntimeError(f"{status}: {(await reader.read()).decode()}")
        buf = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), max(0.0, deadline -
                                                                  time.perf_counter()))
            if not data:
                break
            if first is None:
                first = time.perf_counter() - t0
            buf += data
            events = buf.split(b"\n\n")
            buf = events.pop()
            for e in events:  # (a chunked body puts its chunk sizes before the events)
                at = e.find(b"data: {")
                if at >= 0:
                    last = e[at:]
        cell.requests += 1
    except asyncio.TimeoutError:
        pass  # the window closed: count what arrived
    finally:
        writer.close()
        if first is not None:
            cell.ttft.append(first)
        else:
            cell.ttft.append(time.perf_counter() - t0)
            cell.censored += 1
        if last:
            cell.tokens += json.loads(last[6:])["usage"]["completion_tokens"]


async def _client(port: int, texts: List[str], max_tokens: int, cell: Cell, deadline: float,
                  seed: int) -> None:
    i = 0
    while time.perf_counter() < deadline:
        body = json.dumps({"prompt": texts[(seed + i) % len(texts)], "max_tokens": max_tokens,
                           "temperature": 0.8, "top_k": 50, "stream": True, "seed": seed + i,
                           "stream_options": {"include_usage": True,
                                              "continuous_usage_stats": True}}).encode()
        await _request(port, body, cell, deadline)
        i += 1


def run_cell(server: Server, clients: int, seconds: float, texts: List[str],
             max_tokens: int) -> Tuple[float, Cell]:
    """``clients`` streaming clients for ``seconds``; tokens/s and the cell's figures."""
    server.wait_idle()
    cell = Cell()

    async def main() -> float:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(_client(server.port, texts, max_tokens, cell, deadline, 1000 * c)
                               for c in range(clients)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    return cell.tokens / elapsed, cell


# ------------------------------------------------------------------ the bench


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def bench_model(label: str, model: Path, args: argparse.Namespace, texts: List[str],
                max_tokens: int) -> str:
    servers = [start_server("batched", model, args.max_batch, args.threads),
               start_server("one at a time", model, 1, args.threads)]
    rates: Dict[Tuple[str, int], List[float]] = {}
    ttfts: Dict[Tuple[str, int], List[float]] = {}
    censored: Dict[Tuple[str, int], int] = {}
    try:
        for s in servers:  # warm-up: first requests pay for lazy initialisation
            run_cell(s, 2, min(2.0, args.seconds), texts, max_tokens)
        for rep in range(args.repeats):
            for clients in args.concurrency:
                for s in (servers if rep % 2 == 0 else servers[::-1]):
                    rate, cell = run_cell(s, clients, args.seconds, texts, max_tokens)
                    key = (s.name, clients)
                    rates.setdefault(key, []).append(rate)
                    ttfts.setdefault(key, []).extend(cell.ttft)
                    censored[key] = censored.get(key, 0) + cell.censored
                    print(f"{label} | {s.name} | {clients} clients | {rate:.1f} tok/s | "
                          f"{cell.requests} requests | first token p50 "
                          f"{percentile(cell.ttft, 50):.3f} s", flush=True)
    finally:
        for s in servers:
            s.proc.terminate()
            s.proc.wait(60)
    return _table(label, args, rates, ttfts, censored)


def _table(label: str, args: argparse.Namespace, rates: Dict, ttfts: Dict,
           censored: Dict) -> str:
    rows = []
    for clients in args.concurrency:
        b, o = rates[("batched", clients)], rates[("one at a time", clients)]

        rows.append([clients, fmt_mean(b, 1), fmt_mean(o, 1),
                     f"**{mean_spread(b)[0] / mean_spread(o)[0]:.1f}x**",
                     _first(ttfts, censored, "batched", clients),
                     _first(ttfts, censored, "one at a time", clients)])
    header = ["clients", "batched tok/s", "one-at-a-time tok/s", "speed-up",
              "first token p50 / p99 (s), batched", "first token p50 / p99 (s), one at a time"]
    return f"### {label}\n\n" + md_table(header, rows)


def _first(ttfts: Dict, censored: Dict, name: str, clients: int) -> str:
    t = ttfts[(name, clients)]
    mark = ">= " if censored[(name, clients)] else ""
    return f"{percentile(t, 50):.3f} / {mark}{percentile(t, 99):.3f}"


def _verdict(label: str, args: argparse.Namespace, table: str) -> str:
    """The issue's targets, read back from the table's 16-client row."""
    if 16 not in args.concurrency:
        return ""
    row = next(line for line in table.splitlines() if line.startswith("| 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    speedup = float(cells[3].strip("*x"))
    p99 = float(cells[4].split("/")[1].replace(">=", ""))
    lines = [f"{label}: 16 clients: {speedup:.1f}x one-at-a-time (target >= 4x: "
             f"{'met' if speedup >= 4 else 'NOT met'})"]
    if label.startswith("quickstart"):
        lines.append(f"{label}: 16 clients: first-token p99 {p99:.3f} s (target < 1 s: "
                     f"{'met' if p99 < 1 else 'NOT met'})")
    return "\n".join(f"- {x}" for x in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each cell")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--max-batch", type=int, default=64, help="the batched server's limit")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server")
    p.add_argument("--quickstart", choices=["train", "random"], default="train")
    p.add_argument("--models", nargs="+", choices=["quickstart", "gpt2-124m"],
                   default=["quickstart", "gpt2-124m"])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: random quickstart only, 1 repeat, 2 s cells, 1 and 4 "
                   "clients")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.repeats, args.concurrency = 2.0, 1, [1, 4]
        args.quickstart, args.models = "random", ["quickstart"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tables, verdicts = [], []
        if "quickstart" in args.models:
            label = f"quickstart ({'trained 32 s' if args.quickstart == 'train' else 'random'})"
            model = quickstart_model(work, args.quickstart)
            t = bench_model(label, model, args, prompts(model, 64, 16, 0), max_tokens=QS_TOKENS)
            tables.append(t)
            verdicts.append(_verdict(label, args, t))
        if "gpt2-124m" in args.models:
            label = "gpt2-124m shape (random weights)"
            model = gpt2_model(work)
            t = bench_model(label, model, args, prompts(model, 64, 32, 1),
                            max_tokens=GPT2_TOKENS)
            tables.append(t)
            verdicts.append(_verdict(label, args, t))
    checked = "\n".join(v for v in verdicts if v) or "- not checked: 16 clients were not run"
    body = "\n\n".join(tables + ["Targets (issue 22):\n\n" + checked])
    body += (f"\n\nEach cell: {args.seconds:g} s of streaming clients sending requests back to "
             f"back (sampling at temperature 0.8, top-k 50; up to {QS_TOKENS} new tokens per "
             f"request after a prompt of <= 16 tokens for the quickstart model, {GPT2_TOKENS} "
             f"after <= 32 for gpt2-124m); mean ± sd over {args.repeats} "
             f"repeats. Batched server: --max-batch {args.max_batch}.")
    append_run("bench_serve", "continuous batching vs one request at a time", body,
               threads=args.threads, record=not args.no_record)


if __name__ == "__main__":
    main()
