"""Helpers for the serve tests: a tiny run folder, live servers on free ports.

Servers are waited for by polling (``server.started``, or ``GET /health``), never by
sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, List, Optional

import smallgpt

FIXTURES = Path(__file__).parent / "fixtures"
# The smallgpt that this process imported (the source tree or the installed package).
PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt2_tokenizer() -> Any:
    from smallgpt.tokenizer import Tokenizer

    return Tokenizer.from_gpt2(FIXTURES / "gpt2" / "encoder.json", FIXTURES / "gpt2" / "vocab.bpe")


def tiny_model(position: str = "rope", seed: int = 0, block_size: int = 64,
               **options: Any) -> Any:
    """A random 2-layer GPT (GPT-2's vocabulary padded to 50304) whose head is scaled up, so
    that its next-token distributions are peaked: greedy decoding then never meets a near-tie
    that rounding could flip."""
    import torch

    from smallgpt.model import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50304, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                    position=position, tie_embeddings=False, **options)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def make_run(folder: Path, position: str = "rope") -> Path:
    """A run folder as smallgpt-train leaves it: ckpt_best.pt with the tokenizer inside, and
    a metrics.jsonl with training and validation points."""
    from smallgpt.checkpoint import Checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(position)
    tok = gpt2_tokenizer()
    Checkpoint(model.config, model.state_dict(), tokenizer=tok.to_json_str(), step=100).save(
        folder / "ckpt_best.pt")
    lines = []
    for step in range(0, 101, 10):
        rec = {"step": step, "loss": 10.0 - step / 20}
        if step % 50 == 0:
            rec.update(val_loss=10.0 - step / 25, val_bpb=3.0 - step / 100)
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


class ThreadServer:
    """uvicorn serving ``app`` in a thread of this process, on a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def serve_process(args: List[str], env: Optional[dict] = None) -> tuple:
    """``python -m smallgpt.cli.serve ARGS --port P`` as a subprocess; returns (proc, url) once
    it answers /health."""
    port = free_port()
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PKG_ROOT, full_env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "smallgpt.cli.serve", *args, "--port",
                             str(port), "--no-access-log"], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def wait_ready(url: str, proc: Optional[subprocess.Popen] = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"no answer from {url} in {timeout} s")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())
