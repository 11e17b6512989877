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
from smallgpt.tokenizer import (
    EOT,
    Tokenizer,
    _read_tiktoken,
    check_train_sizes,
    openai_vocabulary,
)

PathLike = Union[str, "os.PathLike[str]"]

META_FORMAT = "smallgpt-shards"
META_VERSION = 1
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
#: Fewest tokens per shard: smaller shards only make many files (``--shard-tokens 1`` wrote a
#: file per token) and hold fewer training windows than a shard should.
MIN_SHARD_TOKENS = 1 << 16
#: Most tokens per shard: the llm.c header holds the count as an int32.
MAX_SHARD_TOKENS = 2**31 - 1


class CorpusError(ValueError):
    """Bad corpus input or output folder (message is meant for the user as is)."""


def expand_inputs(inputs: Sequence[PathLike]) -> list[Path]:
    """Files named directly, the text/jsonl/parquet files under directories (sorted), and
    globs. A file named directly is read whatever its suffix (as text unless .jsonl,
    .ndjson or .parquet)."""
    files: list[Path] = []
    for item in inputs:
        s = os.fspath(item)
        if any(c in s for c in "*?[") and not os.path.lexists(s):
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
                raise CorpusError(
                    f"{p}: directory holds no "
                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)} file"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise CorpusError(f"{p}: not a regular file (a device, pipe or socket cannot be read)")
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
    if not _is_text_type(pa, kind):
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


def _is_text_type(pa: Any, kind: Any) -> bool:
    """Whether a parquet column of arrow type ``kind`` reads as strings (or nulls): plain,
    large and view strings, dictionary-encoded strings (pandas categoricals), all-null."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return bool(
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)
        or pa.types.is_null(kind)
    )


def load_any_tokenizer(
    path: PathLike,
    pattern: Optional[str] = None,
    special_tokens: Optional[Sequence[str]] = None,
) -> Tokenizer:
    """Loads our JSON, a Hugging Face ``tokenizer.json`` or a ``.tiktoken`` file.

    ``pattern`` and ``special_tokens`` apply to ``.tiktoken`` files only, which record
    neither: OpenAI's files (by name and size) default to tiktoken's, any other needs
    ``pattern`` and gets ``special_tokens`` (default ``<|endoftext|>``) after its ranks.
    """
    p = Path(path)
    if p.is_dir():
        raise CorpusError(f"{p}: is a directory; name the tokenizer file in it")
    if not p.is_file():
        raise CorpusError(f"{p}: tokenizer file not found")
    if p.suffix == ".tiktoken":
        return _load_tiktoken(p, pattern, special_tokens)
    if pattern is not None or special_tokens is not None:
        raise CorpusError(
            f"{p}: a JSON tokenizer records its own pattern and special tokens; the pattern "
            "and special tokens options apply only to .tiktoken files and to training"
        )
    try:
        head = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CorpusError(f"{p}: unknown tokenizer format (not JSON or .tiktoken)") from None
    if isinstance(head, dict) and head.get("format") == "smallgpt-tokenizer":
        return Tokenizer.load(p)
    if isinstance(head, dict) and "model" in head:
        return Tokenizer.from_huggingface(p)
    raise CorpusError(f"{p}: unknown tokenizer format")


def _load_tiktoken(
    p: Path, pattern: Optional[str], special_tokens: Optional[Sequence[str]]
) -> Tokenizer:
    tokens = _read_tiktoken(p)
    openai = openai_vocabulary(p, len(tokens))
    if openai is not None and special_tokens is not None:
        raise CorpusError(
            f"{p} is OpenAI's {openai}, whose special tokens are fixed; "
            "special tokens can only be given for other .tiktoken files"
        )
    if pattern is None and openai is None:
        raise CorpusError(
            f"{p}: a .tiktoken file does not record its pre-tokenizer: pass the pattern it "
            "was trained with (--pattern / pattern=: gpt2, cl100k/gpt4, o200k or a regex)"
        )
    if openai is None and special_tokens is None:
        special_tokens = [EOT]
    return Tokenizer._from_ranks(tokens, p, pattern, special_tokens)


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
    pattern: Optional[str] = None,
    special_tokens: Optional[Sequence[str]] = None,
    max_token_length: Optional[int] = None,
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
    ``vocab.bpe``), or ``vocab_size`` to train a new one on the inputs first (with
    ``pattern``, default ``"gpt4"``, ``special_tokens``, default ``[<|endoftext|>]``, which
    must include ``<|endoftext|>``, and ``max_token_length``). ``pattern`` and
    ``special_tokens`` also apply to a ``.tiktoken`` tokenizer file (see
    :func:`load_any_tokenizer`), and to nothing else.

    Each text file (``.txt``, ``.text``, ``.md``, or any file named directly whose suffix is
    not one of the others) is one document, or several split on ``doc_separator``; each line
    of a ``.jsonl``/``.ndjson`` file is one, taken from ``text_field``, and so is each row of
    a ``.parquet``
    file (column ``text_field``; needs ``pyarrow``). Empty documents, and null values of
    ``text_field`` in JSON lines and parquet, are dropped. Every
    document is preceded by the end-of-text token. The last ``ceil(val_fraction * documents)``
    documents form the validation split; a single document is split by characters instead
    (validation = its last ``val_fraction`` of characters, nanoGPT's split).

    Returns the metadata written to ``meta.json``. Raises :class:`CorpusError` (a
    ``ValueError``) for bad input, ``KeyboardInterrupt`` if interrupted (no shard is left).
    """
    _check_options(tokenizer, gpt2_dir, vocab_size, pattern, special_tokens, max_token_length,
                   val_fraction, shard_tokens, dtype, workers, errors)
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
            max_token_length=max_token_length, val_fraction=val_fraction,
            shard_tokens=shard_tokens, dtype=dtype, workers=workers, errors=errors,
            progress=progress,
        )


def _check_options(
    tokenizer: Any, gpt2_dir: Any, vocab_size: Optional[int], pattern: Optional[str],
    special_tokens: Optional[Sequence[str]], max_token_length: Optional[int],
    val_fraction: float, shard_tokens: int, dtype: str, workers: Optional[int], errors: str,
) -> None:
    """Raises :class:`CorpusError` for options that cannot work, before any file is read."""
    if sum(x is not None for x in (tokenizer, gpt2_dir, vocab_size)) != 1:
        raise CorpusError("give exactly one of: a tokenizer, a GPT-2 folder, or a vocab size")
    if not 0.0 <= val_fraction < 1.0:  # also false for NaN
        raise CorpusError(f"val fraction must be in [0, 1), got {val_fraction}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or not (
        MIN_SHARD_TOKENS <= shard_tokens <= MAX_SHARD_TOKENS
    ):
        raise CorpusError(
            f"shard tokens must be an int from {MIN_SHARD_TOKENS:,} to {MAX_SHARD_TOKENS:,}, "
            f"got {shard_tokens!r}"
        )
    if dtype not in ("auto", "uint16", "uint32"):
        raise CorpusError(f"dtype must be auto, uint16 or uint32, not {dtype!r}")
    if workers is not None and not 1 <= workers <= _bpe.MAX_THREADS:
        raise CorpusError(f"workers must be from 1 to {_bpe.MAX_THREADS}, got {workers}")
    if errors not in ("strict", "replace"):
        raise CorpusError(f"errors must be 'strict' or 'replace', not {errors!r}")
    if vocab_size is None:
        if max_token_length is not None:
            raise CorpusError("max token length applies only when training (a vocab size)")
        if (gpt2_dir is not None or isinstance(tokenizer, Tokenizer)) and (
            pattern is not None or special_tokens is not None
        ):
            raise CorpusError(
                "the pattern and special tokens apply only to training and .tiktoken files"
            )
        return
    specials = list(special_tokens) if special_tokens is not None else [EOT]
    try:
        check_train_sizes(vocab_size, len(specials), max_token_length, "vocab size")
    except ValueError as e:
        raise CorpusError(str(e)) from None
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise CorpusError(f"a vocabulary of {vocab_size} ids does not fit in uint16")
    if EOT not in specials:
        raise CorpusError(f"the special tokens must include {EOT} (it separates documents)")
    if len(set(specials)) != len(specials) or "" in specials:
        raise CorpusError("special tokens must be distinct and non-empty")


def _resolve_tokenizer(
    sources: Any,
    tokenizer: Union[Tokenizer, PathLike, None],
    gpt2_dir: Optional[PathLike],
    vocab_size: Optional[int],
    pattern: Optional[str],
    special_tokens: Optional[Sequence[str]],
    max_token_length: Optional[int],
    workers: Optional[int],
    errors: str,
    progress: bool,
) -> Tokenizer:
    """The tokenizer of a run: given, loaded from a file or GPT-2's files, or trained on the
    sources."""
    tok: Tokenizer
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = load_any_tokenizer(tokenizer, pattern, special_tokens)
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
        pattern = pattern or "gpt4"
        names = list(special_tokens) if special_tokens is not None else [EOT]
        trainer = _bpe.Trainer(pattern, workers)
        trainer.feed_sources(sources, errors)
        merges = trainer.train(vocab_size - 256 - len(names), 2, max_token_length, progress)
        first = 256 + len(merges)
        specials = [(s, first + i) for i, s in enumerate(names)]
        tok = Tokenizer(_bpe.CoreTokenizer.from_merges(merges, pattern, specials))
    return tok


def _tokenize(
    files: Sequence[Path],
    sources: Any,
    out: Path,
    existing: Sequence[Path],
    *,
    tokenizer: Union[Tokenizer, PathLike, None],
    gpt2_dir: Optional[PathLike],
    vocab_size: Optional[int],
    pattern: Optional[str],
    special_tokens: Optional[Sequence[str]],
    max_token_length: Optional[int],
    val_fraction: float,
    shard_tokens: int,
    dtype: str,
    workers: Optional[int],
    errors: str,
    progress: bool,
) -> dict[str, Any]:

    tok = _resolve_tokenizer(sources, tokenizer, gpt2_dir, vocab_size, pattern,
                             special_tokens, max_token_length, workers, errors, progress)
    eot = tok.eot_id
    if eot is None:
        raise CorpusError(f"the tokenizer has no {EOT} token to separate documents")
    bits = 16 if (dtype == "uint16" or (dtype == "auto" and tok.vocab_size <= 65536)) else 32
    if tok.vocab_size > (1 << bits):
        raise CorpusError(f"vocabulary of {tok.vocab_size} ids does not fit in uint{bits}")

    out.mkdir(parents=True, exist_ok=True)
    # Old outputs go only once the new run is sure to start. meta.json first says that the
    # folder is being written, and only at the very end that it is complete: shards appear as
    # *.tmp and are renamed at the end, but a kill (or a full disk) between those renames and
    # the final meta.json must not leave a folder that a loader takes for finished (or for a
    # plain llm.c folder, which has no meta.json).
    _write_json(out / "meta.json", {"format": META_FORMAT, "version": META_VERSION,
                                    "complete": False, "writer": "smallgpt-tokenize"})
    for p in existing:
        if p.name != "meta.json":
            p.unlink()
    (out / "tokenizer.json").unlink(missing_ok=True)
    try:
        # The tokenizer's JSON (tens of milliseconds for a large vocabulary) is built on a
        # thread while Rust encodes with the GIL released; it is written after the shards.
        with ThreadPoolExecutor(max_workers=1) as pool:
            tok_json = pool.submit(tok.to_json_str)
            stats = _run(tok, eot, sources, out, val_fraction, shard_tokens, bits, errors,
                         progress, workers)
            tok_text = tok_json.result()
    except BaseException:
        # Nothing of this run is left (the Rust side removed its *.tmp shards): neither is its
        # marker, so the folder can be written again without --overwrite.
        (out / "meta.json").unlink(missing_ok=True)
        raise
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "complete": True,
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
