"""``smallgpt-export``: write a run (or checkpoint) as a Hugging Face GPT-2 folder.

Example::

    smallgpt-export out/my-run --huggingface exported/
    python -c "from transformers import AutoTokenizer, GPT2LMHeadModel; \\
        GPT2LMHeadModel.from_pretrained('exported'); AutoTokenizer.from_pretrained('exported')"

The folder holds ``config.json`` + ``model.safetensors`` (``GPT2LMHeadModel.from_pretrained``
loads them) and the tokenizer: ``vocab.json`` + ``merges.txt`` when it is GPT-2's own
vocabulary (what the hub's ``gpt2`` folder has), ``tokenizer.json`` otherwise, each with a
``tokenizer_config.json`` so that ``AutoTokenizer.from_pretrained`` loads it. A run folder
gives ``ckpt_best.pt`` (else ``ckpt_latest.pt``); name a checkpoint file to choose another.

Only GPT-2-shaped models can be exported (learned positions, biases, a GPT-2 activation and
no option GPT-2 lacks); others are refused with the option named. The folder appears whole or
not at all: it is written into a temporary folder next to ``OUT`` and renamed. A non-empty
``OUT`` is refused unless ``--overwrite``, which replaces only a model folder (never one that
holds the source, a smallgpt run, or other files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from smallgpt._io import WriteError, remove_stale_temporaries, write_error
from smallgpt.cli import OneLineParser, fail

if TYPE_CHECKING:
    from smallgpt.model import GPTConfig
    from smallgpt.tokenizer import Tokenizer

__all__ = ["ExportError", "export_huggingface", "gpt2_incompatibilities", "is_gpt2_tokenizer",
           "main"]

PROG = "smallgpt-export"
PathLike = Union[str, "os.PathLike[str]"]

# GPT-2's vocabulary: tiktoken's r50k pattern, <|endoftext|> = 50256, and the SHA-256 of its
# 50256 ordinary tokens' bytes (each preceded by its length, 2 bytes little-endian), in id order.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")
GPT2_TOKENS_SHA256 = "3b27ee95684e28911415c6bcd8537b0d5b950f05a84053d4e6c63a26990f9617"
EOT = "<|endoftext|>"

class ExportError(ValueError):
    """The model cannot be exported, or ``OUT`` cannot be written (one-line reason)."""


def gpt2_incompatibilities(config: GPTConfig) -> List[str]:
    """What GPT-2 cannot represent in ``config`` (see
    :meth:`smallgpt.model.GPTConfig.gpt2_incompatibilities`)."""
    return config.gpt2_incompatibilities()


def is_gpt2_tokenizer(tok: Tokenizer) -> bool:
    """True when ``tok`` is GPT-2's vocabulary exactly (tokens, ids, pattern, specials)."""
    if tok.pattern != GPT2_PATTERN or tok.special_tokens != {EOT: 50256} \
            or tok.n_ordinary != 50256:
        return False
    h = hashlib.sha256()
    for i in range(tok.n_ordinary):
        b = tok.token_bytes(i)
        h.update(len(b).to_bytes(2, "little") + b)
    return h.hexdigest() == GPT2_TOKENS_SHA256


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(tok: Tokenizer, folder: Path, block_size: int) -> List[str]:
    """The tokenizer files transformers reads; returns their names."""
    from smallgpt.tokenizer import _bytes_to_unicode

    specials: Dict[str, Any] = {"model_max_length": block_size}
    if tok.eot_id is not None:
        specials.update(bos_token=EOT, eos_token=EOT)
    if is_gpt2_tokenizer(tok):
        b2u = _bytes_to_unicode()

        def u(i: int) -> str:
            return "".join(b2u[x] for x in tok.token_bytes(i))

        vocab = {u(i): i for i in range(tok.n_ordinary)}
        vocab[EOT] = 50256
        _write_json(folder / "vocab.json", vocab)
        merges = "".join(f"{u(left)} {u(right)}\n" for left, right in tok.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "GPT2Tokenizer", "unk_token": EOT, "add_prefix_space": False,
            **specials})
        return ["vocab.json", "merges.txt", "tokenizer_config.json"]
    tok.save_huggingface(folder / "tokenizer.json")
    _write_json(folder / "tokenizer_config.json",
                {"tokenizer_class": "PreTrainedTokenizerFast", **specials})
    return ["tokenizer.json", "tokenizer_config.json"]


#: What a Hugging Face model folder holds: ``--overwrite`` replaces a folder of these only.
_MODEL_FOLDER_FILES = {
    "config.json", "model.safetensors", "pytorch_model.bin", "generation_config.json",
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "README.md", ".gitattributes",
}


def _check_out(out: Path, overwrite: bool, source: PathLike) -> None:
    """Refuse an ``OUT`` that cannot take the export, before anything is read or written.

    ``--overwrite`` replaces a previous export only: never a folder that holds the source
    (the source itself, or a folder above it, however the paths are spelled), a smallgpt run,
    or anything a model folder does not hold.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder")
    real_out, real_src = out.resolve(), Path(source).resolve()
    if real_out == real_src or real_out in real_src.parents:
        raise ExportError(f"{out} holds the model being exported ({source}); choose another "
                          "folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out} is not empty; choose another folder or pass --overwrite")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if p.name not in _MODEL_FOLDER_FILES or not p.is_file())
    if foreign:
        from smallgpt.checkpoint import RunFolder

        run = RunFolder(out)
        is_run = run.metrics.exists() or run.latest.exists() or bool(run.numbered())
        what = "a smallgpt run" if is_run else "files a model folder does not hold"
        raise ExportError(f"--overwrite replaces only a model folder, but {out} holds {what} "
                          f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                          "choose another folder")


def export_huggingface(source: PathLike, out: PathLike, *, overwrite: bool = False,
                       gpt2_vocab: Optional[PathLike] = None) -> List[str]:
    """Write ``source`` (run folder, checkpoint file or Hugging Face folder) to ``out`` as a
    Hugging Face GPT-2 folder; returns the names of the files written.

    Raises:
        CheckpointError: ``source`` is not a loadable model.
        ExportError: GPT-2 cannot represent the model; ``out`` is a file, or not empty
            without ``overwrite``. Nothing is written in these cases.
    """
    from smallgpt.checkpoint import CheckpointError, load_model

    out = Path(out)
    if not Path(source).exists():
        raise CheckpointError(f"checkpoint not found: {source}")
    _check_out(out, overwrite, source)
    loaded = load_model(source, gpt2_vocab)
    problems = gpt2_incompatibilities(loaded.model.config)
    if problems:
        raise ExportError(f"{loaded.source}: GPT-2 cannot represent {'; '.join(problems)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Folders a killed export left here are removed; a live export's are not touched.
    remove_stale_temporaries(out.parent, [out.name, f"{out.name}.old"])
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        names = _write_folder(loaded, tmp)
        _replace_folder(tmp, out)
    except (ExportError, KeyboardInterrupt, SystemExit):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # OSError, SafetensorError: a full disk, a read-only folder
        err = write_error(out, e, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise err from None
    return names


def _write_folder(loaded: Any, folder: Path) -> List[str]:
    model, tok = loaded.model, loaded.tokenizer
    model.save_huggingface(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    eot = tok.eot_id if tok is not None else None
    config.update(bos_token_id=eot, eos_token_id=eot)  # GPT-2's default 50256 otherwise
    _write_json(folder / "config.json", config)
    names = ["config.json", "model.safetensors"]
    if tok is not None:
        try:
            names += _write_tokenizer(tok, folder, model.config.block_size)
        except ValueError as e:  # a pre-tokenizer pattern Hugging Face would read differently
            raise ExportError(f"cannot export the tokenizer: {e}") from None
    return names


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old.{os.getpid()}.tmp"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Export a smallgpt run or checkpoint as a "
                      "Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer).")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (its ckpt_best.pt, else ckpt_latest.pt) or checkpoint file")
    p.add_argument("--huggingface", required=True, metavar="OUT", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--gpt2-vocab", metavar="DIR", help="GPT-2 vocabulary files, when SOURCE is "
                   "a Hugging Face folder without them")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``smallgpt-export``; returns the exit status."""
    args = _parser().parse_args(argv)
    from smallgpt.checkpoint import CheckpointError

    try:
        names = export_huggingface(args.source, args.huggingface, overwrite=args.overwrite,
                                   gpt2_vocab=args.gpt2_vocab)
    except (CheckpointError, ExportError) as e:
        return fail(PROG, e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except WriteError as e:
        return fail(PROG, e, 1)
    except OSError as e:
        return fail(PROG, f"cannot write {args.huggingface}: {e.strerror or e}", 1)
    if "vocab.json" not in names and "tokenizer.json" not in names:
        print(f"{PROG}: warning: {args.source} has no tokenizer; only the model was written",
              file=sys.stderr)
    print(f"{PROG}: wrote {args.huggingface}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
