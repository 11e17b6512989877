"""``smallgpt-sample``: generate text from a trained model.

Examples::

    smallgpt-sample --checkpoint out/shakespeare-cpu --prompt "ROMEO:" --max-new-tokens 200
    smallgpt-sample --checkpoint out/shakespeare-cpu/ckpt_latest.pt --temperature 0.8 --top-k 50
    echo "Once upon a time" | smallgpt-sample --checkpoint run/ --seed 1 --stop "\\n\\n"
    smallgpt-sample --checkpoint gpt2-hf/ --gpt2-vocab gpt2-files/ --num-beams 4 --prompt "Hi"

``--checkpoint`` is a run folder written by ``smallgpt-train`` (``ckpt_best.pt`` is used when
present, else ``ckpt_latest.pt``), one checkpoint file, or a Hugging Face GPT-2 folder
(``config.json`` + ``model.safetensors``/``pytorch_model.bin``) together with ``--gpt2-vocab
DIR`` holding OpenAI's ``encoder.json`` and ``vocab.bpe``.

The prompt comes from ``--prompt``, ``--prompt-file`` or standard input (when it is not a
terminal). It is preceded by the ``<|endoftext|>`` token when the tokenizer has one, as every
training document is; generation ends at the next ``<|endoftext|>``. Text is streamed to
standard output as it is produced; the same ``--seed`` prints the same text, streamed or not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from smallgpt.cli import unescape

PROG = "smallgpt-sample"


class _UsageError(ValueError):
    """Bad input: reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Generate text from a smallgpt checkpoint or a Hugging Face GPT-2 folder.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR_OR_FILE",
                   help="run folder of smallgpt-train, a .pt checkpoint, or a HF GPT-2 folder")
    p.add_argument("--gpt2-vocab", metavar="DIR",
                   help="folder with encoder.json and vocab.bpe (for a HF GPT-2 checkpoint)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (default: standard input)")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature; 0 is greedy decoding (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, metavar="P", help="in [0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    p.add_argument("--num-beams", type=int, default=1, metavar="B",
                   help="beam search with B beams (deterministic, not streamed)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="L")
    p.add_argument("--num-samples", type=int, default=1, metavar="N")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--stop", nargs="+", action="extend", default=None, metavar="STR",
                   help="stop when one of these strings appears (it is not printed); "
                   "\\n, \\t, \\r, \\0 and \\\\ are understood")
    p.add_argument("--device", default=None, metavar="D",
                   help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    p.add_argument("--no-stream", action="store_true", help="print the text once complete")
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache (slower)")
    return p


def _check_args(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 0:
        raise _UsageError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if not a.temperature >= 0:
        raise _UsageError(f"--temperature must be >= 0, got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        raise _UsageError(f"--top-k must be >= 1, got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise _UsageError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.min_p is not None and not 0 <= a.min_p <= 1:
        raise _UsageError(f"--min-p must be in [0, 1], got {a.min_p}")
    if not a.repetition_penalty > 0:
        raise _UsageError(f"--repetition-penalty must be > 0, got {a.repetition_penalty}")
    if a.num_beams < 1:
        raise _UsageError(f"--num-beams must be >= 1, got {a.num_beams}")
    if a.num_samples < 1:
        raise _UsageError(f"--num-samples must be >= 1, got {a.num_samples}")
    if a.num_beams > 1 and a.num_samples > a.num_beams:
        raise _UsageError("--num-samples cannot exceed --num-beams with beam search")
    if a.stop is not None:
        a.stop = [unescape(s) for s in a.stop]
        if any(s == "" for s in a.stop):
            raise _UsageError("--stop strings must not be empty")


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise _UsageError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise _UsageError(f"device {name!r} requested but MPS is not available")
    return dev


def load_for_sampling(
    checkpoint: str | os.PathLike, gpt2_vocab: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a run folder, a checkpoint file or a HF GPT-2 folder.

    See :func:`smallgpt.checkpoint.load_model`. Raises ``ValueError`` on bad input. The model
    is in eval mode on the CPU.
    """
    from smallgpt.checkpoint import CheckpointError, load_model

    try:
        loaded = load_model(checkpoint, gpt2_vocab)
    except CheckpointError as e:
        raise _UsageError(str(e)) from None
    if loaded.tokenizer is None:
        if loaded.kind == "huggingface":
            raise _UsageError(f"{checkpoint} is a Hugging Face GPT-2 folder without tokenizer "
                              "files: pass --gpt2-vocab DIR with encoder.json and vocab.bpe")
        raise _UsageError(f"{loaded.source} has no tokenizer and there is no tokenizer.json "
                          "next to it")
    return loaded.model, loaded.tokenizer


def _read_prompt(a: argparse.Namespace) -> str:
    if a.prompt is not None:
        return a.prompt
    if a.prompt_file is not None:
        try:
            return Path(a.prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _UsageError(f"prompt file not found: {a.prompt_file}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise _UsageError(f"cannot read prompt file {a.prompt_file}: {e}") from None
    if sys.stdin is not None and not sys.stdin.isatty():
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(data, str):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _UsageError(f"standard input is not UTF-8 text (invalid byte at offset "
                              f"{e.start})") from None
    return ""


def _run(a: argparse.Namespace) -> None:
    # Cheap checks first: bad flags are reported before torch is imported (seconds).
    _check_args(a)
    if not Path(a.checkpoint).exists():
        raise _UsageError(f"checkpoint not found: {a.checkpoint}")
    if a.gpt2_vocab is not None and not Path(a.gpt2_vocab).is_dir():
        raise _UsageError(f"--gpt2-vocab folder not found: {a.gpt2_vocab}")
    prompt = _read_prompt(a)

    import torch

    from smallgpt.generate import generate_text, stream_text

    device = _device(a.device)
    model, tok = load_for_sampling(a.checkpoint, a.gpt2_vocab)
    model.to(device)

    ids = tok.encode(prompt, allowed_special="all") if prompt else []
    bos = tok.eot_id
    if bos is not None:
        ids = [bos] + ids
    if not ids:
        raise _UsageError("the prompt is empty and the tokenizer has no <|endoftext|> token "
                          "to start from; give --prompt")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    options: dict[str, Any] = dict(
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, seed=a.seed, use_cache=not a.no_cache,
        stop=a.stop, eos_token_id=bos, decode_bytes=tok.decode_bytes,
        vocab_limit=tok.vocab_size,
    )
    out = sys.stdout
    if a.num_samples == 1 and a.num_beams == 1 and not a.no_stream:
        out.write(prompt)
        out.flush()
        for piece in stream_text(model, idx, a.max_new_tokens, **options):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        return
    texts = generate_text(model, idx, a.max_new_tokens, num_samples=a.num_samples,
                          num_beams=a.num_beams, length_penalty=a.length_penalty, **options)
    for i, text in enumerate(texts):
        if i:
            out.write("---------------\n")
        out.write(prompt + text + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smallgpt-sample``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        _run(args)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def _broken_pipe() -> int:
    # The reader (e.g. `head`) went away: stop quietly, and keep Python from complaining
    # about the closed stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
