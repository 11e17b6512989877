"""Corpus → tokenizer + token shards (the engine behind ``smallgpt-tokenize``).

Reading, splitting, encoding and shard writing run in Rust (`smallgpt._bpe.tokenize_corpus`),
in parallel with the GIL released; this module resolves inputs, picks or trains the
tokenizer, guards the output folder and writes ``meta.json``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from smallgpt import _bpe
from smallgpt._io import atomic_write_text
from smallgpt.tokenizer import EOT, Tokenizer

PathLike = Union[str, "os.PathLike[str]"]

META_FORMAT = "smallgpt-shards"
META_VERSION = 1
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class CorpusError(ValueError):
    """Bad corpus input or output folder (message is meant for the user as is)."""


def expand_inputs(inputs: Sequence[PathLike]) -> list[Path]:
    """Files named directly, the text/jsonl files under directories (sorted), and globs."""
    files: list[Path] = []
    for item in inputs:
        s = os.fspath(item)
        if any(c in s for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True) if Path(m).is_file())
            if not matches:
                raise CorpusError(f"no file matches {s!r}")
            files.extend(matches)
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
            )
            if not found:
                raise CorpusError(f"{p}: directory holds no .txt, .jsonl or .parquet file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"{p}: no such file or directory")
    if not files:
        raise CorpusError("no input files")
    return files


def _sources(
    files: Sequence[Path], doc_separator: Optional[str], text_field: str,
    parquet_dir: Optional[Path] = None,
) -> list[tuple[str, str, Optional[str]]]:
    out: list[tuple[str, str, Optional[str]]] = []
    for i, f in enumerate(files):
        suffix = f.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            out.append((str(f), "jsonl", text_field))
        elif suffix in PARQUET_SUFFIXES:
            assert parquet_dir is not None
            converted = parquet_dir / f"{i:06d}.jsonl"
            _parquet_to_jsonl(f, text_field, converted)
            out.append((str(converted), "jsonl", "text"))
        else:
            out.append((str(f), "text", doc_separator))
    return out


def _parquet_to_jsonl(path: Path, field: str, dest: Path) -> None:
    """Writes the string column ``field`` of a parquet file as JSON lines (one document per
    row; nulls are dropped like empty documents). The Rust pipeline reads JSON lines, so
    parquet goes through this temporary file, streamed batch by batch."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(
            f"{path}: reading .parquet needs pyarrow (pip install 'smallgpt[parquet]')"
        ) from None
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    if field not in schema.names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {field!r} holds {kind}, not strings")
    dumps = json.dumps
    try:
        with open(dest, "w", encoding="utf-8") as out:
            for batch in pf.iter_batches(columns=[field], batch_size=8192):
                out.writelines(
                    dumps({"text": doc}, ensure_ascii=False) + "\n"
                    for doc in batch.column(0).to_pylist() if doc
                )
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{path}: could not read the parquet file ({e})") from None


def load_any_tokenizer(path: PathLike) -> Tokenizer:
    """Loads our JSON, a Hugging Face ``tokenizer.json`` or a ``.tiktoken`` file."""
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"{p}: tokenizer file not found")
    if p.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(p)
    try:
        head = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorpusError(f"{p}: unknown tokenizer format (not JSON or .tiktoken)") from None
    if isinstance(head, dict) and head.get("format") == "smallgpt-tokenizer":
        return Tokenizer.load(p)
    if isinstance(head, dict) and "model" in head:
        return Tokenizer.from_huggingface(p)
    raise CorpusError(f"{p}: unknown tokenizer format")


def _existing_outputs(out: Path) -> list[Path]:
    return sorted(
        [*out.glob("train_*.bin"), *out.glob("val_*.bin"), *out.glob("meta.json")]
    )


def tokenize_corpus(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    tokenizer: Union[Tokenizer, PathLike, None] = None,
    gpt2_dir: Optional[PathLike] = None,
    vocab_size: Optional[int] = None,
    pattern: str = "gpt4",
    special_tokens: Sequence[str] = (EOT,),
    val_fraction: float = 0.005,
    shard_tokens: int = 100_000_000,
    doc_separator: Optional[str] = None,
    text_field: str = "text",
    dtype: str = "auto",
    workers: Optional[int] = None,
    overwrite: bool = False,
    errors: str = "strict",
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenizes text files into llm.c shards plus ``tokenizer.json`` and ``meta.json``.

    Exactly one tokenizer source: ``tokenizer`` (a :class:`Tokenizer` or a file in any
    format :func:`load_any_tokenizer` reads), ``gpt2_dir`` (``encoder.json`` +
    ``vocab.bpe``), or ``vocab_size`` to train a new one on the inputs first.

    Each ``.txt`` file is one document (or several, split on ``doc_separator``); each line of
    a ``.jsonl`` file is one, taken from ``text_field``, and so is each row of a ``.parquet``
    file (column ``text_field``; needs ``pyarrow``). Empty documents are dropped. Every
    document is preceded by the end-of-text token. The last ``ceil(val_fraction * documents)``
    documents form the validation split; a single document is split by characters instead
    (validation = its last ``val_fraction`` of characters, nanoGPT's split).

    Returns the metadata written to ``meta.json``. Raises :class:`CorpusError` (a
    ``ValueError``) for bad input, ``KeyboardInterrupt`` if interrupted (no shard is left).
    """
    if sum(x is not None for x in (tokenizer, gpt2_dir, vocab_size)) != 1:
        raise CorpusError("give exactly one of: a tokenizer, a GPT-2 folder, or a vocab size")
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise CorpusError(f"shard tokens must be positive, got {shard_tokens}")
    if dtype not in ("auto", "uint16", "uint32"):
        raise CorpusError(f"dtype must be auto, uint16 or uint32, not {dtype!r}")
    if workers is not None and workers < 1:
        raise CorpusError(f"workers must be at least 1, got {workers}")
    files = expand_inputs(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    existing = _existing_outputs(out) if out.exists() else []
    if existing and not overwrite:
        raise CorpusError(f"{out} already holds shards ({existing[0].name}); pass --overwrite")
    with contextlib.ExitStack() as stack:
        parquet_dir = None
        if any(f.suffix.lower() in PARQUET_SUFFIXES for f in files):
            out.mkdir(parents=True, exist_ok=True)
            parquet_dir = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".parquet-", dir=out)
            ))
        sources = _sources(files, doc_separator, text_field, parquet_dir)
        return _tokenize(
            files, sources, out, existing, tokenizer=tokenizer, gpt2_dir=gpt2_dir,
            vocab_size=vocab_size, pattern=pattern, special_tokens=special_tokens,
            val_fraction=val_fraction, shard_tokens=shard_tokens, dtype=dtype,
            workers=workers, errors=errors, progress=progress,
        )


def _tokenize(
    files: Sequence[Path],
    sources: Any,
    out: Path,
    existing: Sequence[Path],
    *,
    tokenizer: Union[Tokenizer, PathLike, None],
    gpt2_dir: Optional[PathLike],
    vocab_size: Optional[int],
    pattern: str,
    special_tokens: Sequence[str],
    val_fraction: float,
    shard_tokens: int,
    dtype: str,
    workers: Optional[int],
    errors: str,
    progress: bool,
) -> dict[str, Any]:

    tok: Tokenizer
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = load_any_tokenizer(tokenizer)
    elif gpt2_dir is not None:
        g = Path(gpt2_dir)
        # OpenAI's names, or the same two files as Hugging Face's gpt2 folder names them.
        pairs = [(g / e, g / b) for e, b in (("encoder.json", "vocab.bpe"),
                                             ("vocab.json", "merges.txt"))]
        found = [pair for pair in pairs if pair[0].is_file() and pair[1].is_file()]
        if not found:
            raise CorpusError(f"{g}: needs encoder.json and vocab.bpe (or vocab.json and "
                              "merges.txt)")
        tok = Tokenizer.from_gpt2(*found[0])
    else:
        assert vocab_size is not None
        trainer = _bpe.Trainer(pattern, workers)
        trainer.feed_sources(sources, errors)
        n_special = len(special_tokens)
        if vocab_size < 256 + n_special:
            raise CorpusError(f"vocab size must be at least {256 + n_special}, got {vocab_size}")
        merges = trainer.train(vocab_size - 256 - n_special, 2, None, progress)
        first = 256 + len(merges)
        specials = [(s, first + i) for i, s in enumerate(special_tokens)]
        tok = Tokenizer(_bpe.CoreTokenizer.from_merges(merges, pattern, specials))
    eot = tok.eot_id
    if eot is None:
        raise CorpusError(f"the tokenizer has no {EOT} token to separate documents")
    bits = 16 if (dtype == "uint16" or (dtype == "auto" and tok.vocab_size <= 65536)) else 32
    if tok.vocab_size > (1 << bits):
        raise CorpusError(f"vocabulary of {tok.vocab_size} ids does not fit in uint{bits}")

    out.mkdir(parents=True, exist_ok=True)
    # Old outputs go only once the new run is sure to start; new shards appear as *.tmp and are
    # renamed at the very end, so an interrupted run never leaves a shard that looks complete.
    for p in existing:
        p.unlink()
    # The tokenizer's JSON (tens of milliseconds for a large vocabulary) is built on a thread
    # while Rust encodes with the GIL released; it is written after the shards, as before.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tok_json = pool.submit(tok.to_json_str)
        stats = _run(tok, eot, sources, out, val_fraction, shard_tokens, bits, errors,
                     progress, workers)
        tok_text = tok_json.result()
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "tokenizer": "tokenizer.json",
        "vocab_size": tok.vocab_size,
        "eot_id": eot,
        "dtype": f"uint{bits}",
        "splits": {
            name: {"documents": d, "tokens": t, "bytes": b, "shards": shards}
            for name, (d, t, b, shards) in sorted(stats.items())
        },
        "inputs": [str(f) for f in files],
    }
    atomic_write_text(out / "tokenizer.json", tok_text)
    _write_json(out / "meta.json", meta)
    return meta


def _run(tok: Tokenizer, eot: int, sources: Any, out: Path, val_fraction: float,
         shard_tokens: int, bits: int, errors: str, progress: bool,
         workers: Optional[int]) -> dict[str, Any]:
    return _bpe.tokenize_corpus(
        tok._core, eot, sources, str(out), val_fraction, shard_tokens, bits, errors, progress,
        workers,
    )


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
