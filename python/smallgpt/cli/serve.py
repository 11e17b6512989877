"""``smallgpt-serve``: an OpenAI-compatible server and a playground page for one model.

Examples::

    smallgpt-serve out/shakespeare-cpu                  # http://127.0.0.1:8000/ (the page)
    smallgpt-serve gpt2/ --port 8080 --max-batch 64
    SMALLGPT_API_KEY=secret smallgpt-serve out/run --host 0.0.0.0

``MODEL`` is what ``smallgpt-sample --checkpoint`` takes: a run folder, a checkpoint file, or
a Hugging Face GPT-2 folder (its tokenizer from ``vocab.json`` + ``merges.txt`` in it, or
``--gpt2-vocab DIR``). The API is OpenAI's: ``/v1/models``, ``/v1/completions`` (streamed with
``"stream": true``), plus ``/v1/tokenize`` and ``/v1/detokenize``; see
:mod:`smallgpt.serve.app`. Needs ``pip install 'smallgpt[serve]'``.

It listens on 127.0.0.1 unless ``--host`` says otherwise; another host without an API key is
served with a warning. SIGTERM or Ctrl-C lets the requests in flight finish, then exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

from smallgpt.cli import OneLineParser, fail, int_in

PROG = "smallgpt-serve"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Serve a model over OpenAI's completions API, "
                      "with continuous batching and a playground page at /.")
    p.add_argument("model", metavar="MODEL",
                   help="run folder, checkpoint file or Hugging Face GPT-2 folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="default 8000")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and cache (auto: float32 on CPUs, where decoding a few "
                   "sequences is not faster in bf16; bf16 or fp16 on GPUs)")
    p.add_argument("--api-key", default=os.environ.get("SMALLGPT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $SMALLGPT_API_KEY)")
    p.add_argument("--max-batch", type=int_in(1, 4096), default=32, metavar="N",
                   help="sequences decoded together at most (1: one request at a time; "
                   "default 32)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model's id in the API (default: the folder's name)")
    p.add_argument("--gpt2-vocab", metavar="DIR",
                   help="encoder.json + vocab.bpe for a Hugging Face folder without them")
    p.add_argument("--threads", type=int_in(1), default=None, metavar="N",
                   help="torch threads (default: torch's choice)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every request (default: on)")
    return p


def _missing_extra() -> Optional[str]:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return (f"the server needs FastAPI and uvicorn ({e.name} is missing): "
                "pip install 'smallgpt[serve]'")
    return None


def default_name(path: Path) -> str:
    """The API's model id: the run or model folder's name."""
    path = path.resolve()
    return (path.parent.name if path.is_file() else path.name) or "smallgpt"


def _dtype(name: str, device: Any) -> Any:
    import torch

    from smallgpt.train.hardware import resolve_dtype

    if name == "auto" and device.type == "cpu":
        return torch.float32
    return resolve_dtype(name, device)


def _build(args: argparse.Namespace) -> Any:
    """The app (model loaded, engine made), or raises ``ValueError``-like errors."""
    import torch

    from smallgpt.checkpoint import load_model
    from smallgpt.serve.app import create_app
    from smallgpt.serve.engine import Engine
    from smallgpt.train.hardware import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = _dtype(args.dtype, device)
    loaded = load_model(args.model, args.gpt2_vocab)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files (vocab.json + merges.txt or "
                         "tokenizer.json): pass --gpt2-vocab DIR")
    model = loaded.model.to(device=device, dtype=dtype).eval()
    engine = Engine(model, loaded.tokenizer, max_batch=args.max_batch)
    metrics = loaded.source.parent / "metrics.jsonl" if loaded.kind == "smallgpt" else None
    name = args.model_name or default_name(Path(args.model))
    cfg = model.config
    print(f"{PROG}: {name}: {model.num_params() / 1e6:.2f}M parameters, context "
          f"{cfg.block_size}, {str(dtype).replace('torch.', '')} on {device}; up to "
          f"{args.max_batch} sequences per step", file=sys.stderr, flush=True)
    return create_app(engine, loaded.tokenizer, model_name=name, api_key=args.api_key,
                      metrics_path=metrics)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``smallgpt-serve``; returns the exit status."""
    args = _parser().parse_args(argv)
    missing = _missing_extra()
    if missing:
        return fail(PROG, missing, 1)
    if not Path(args.model).exists():
        return fail(PROG, f"model not found: {args.model}")
    if args.gpt2_vocab is not None and not Path(args.gpt2_vocab).is_dir():
        return fail(PROG, f"--gpt2-vocab folder not found: {args.gpt2_vocab}")
    if args.api_key is not None and not args.api_key.strip():
        return fail(PROG, "--api-key is empty")
    from smallgpt.checkpoint import CheckpointError
    from smallgpt.train.hardware import HardwareError

    try:
        app = _build(args)
    except (CheckpointError, HardwareError, ValueError) as e:
        return fail(PROG, e)
    if args.host not in _LOOPBACK and not args.api_key:
        print(f"{PROG}: warning: listening on {args.host} without --api-key: anyone who can "
              "reach this machine can use the model", file=sys.stderr, flush=True)
    import uvicorn

    url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}/"
    print(f"{PROG}: the playground is at {url}; the API at {url}v1", file=sys.stderr,
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, access_log=args.access_log,
                    log_level="info")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
