"""What every section shares: the default files, the libraries compared, text helpers."""

from __future__ import annotations

import array
import base64
import hashlib
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "benches" / "bench_tokenizer.py"  # workers are this script with --worker
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CORPUS = SHARED / "corpus"
DEFAULT_CL100K = SHARED / "tiktoken" / "cl100k_base.tiktoken"
DEFAULT_GPT2_DIR = REPO / "tests" / "fixtures" / "gpt2"
DEFAULT_RESULTS = REPO / "benches" / "RESULTS.md"
BENCH = "bench_tokenizer"  # the bench's name in RESULTS.md

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
# vocabulary -> the encoders compared on it (quicktok has no scanner for the GPT-2 pattern)
ENCODERS: Dict[str, List[str]] = {
    "cl100k": ["ours", "ours-lists", "tiktoken", "quicktok", "riptoken"],
    "gpt2": ["ours", "ours-lists", "tiktoken", "riptoken"],
}


def label(lib: str) -> str:
    """The library's name in the tables."""
    return LIBS[lib][0]


def lib_version(key: str) -> str:
    try:
        return metadata.version(LIBS[key][2])
    except metadata.PackageNotFoundError:
        return "?"


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


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def ratio(x: float) -> str:
    return f"{x:.2f}×"
