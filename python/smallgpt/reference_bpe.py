"""The specification of smallgpt's byte-level BPE, in plain Python.

This module is deliberately short and slow: it defines what the Rust core
(`smallgpt._bpe`) must compute, and the property tests check that both agree.

Training
    Text is split into pieces by a regex (the pre-tokenizer). Each piece is a sequence of
    byte ids 0..255. A pair's count is the number of adjacent occurrences over all pieces
    (overlapping ones included: ``aaa`` holds ``aa`` twice). Each step merges the pair with the
    highest count, ties going to the smallest ``(left_id, right_id)``; merge k gets id 256 + k
    and replaces occurrences left to right. A pair whose bytes together are already a token
    (or are longer than ``max_token_length``, by default ``MAX_TOKEN_LENGTH``, the encoder's
    limit) is never merged: every token has distinct bytes.
    Training stops after ``vocab_size - 256`` merges or when the best pair occurs fewer than
    ``min_frequency`` times.

Encoding (tiktoken's rank semantics)
    A piece that is a token is that token. Otherwise, starting from its bytes, the adjacent
    pair whose concatenation is the token with the lowest id is merged (leftmost first on
    ties) until no adjacent pair concatenates to a token. Because token bytes are distinct,
    the encoder needs only the bytes of each token; that is why a pair that the trainer
    refused (its bytes already a token) is still joined into that existing token here.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import regex

# The longest token the encoder holds (it keeps part lengths in 16 bits).
MAX_TOKEN_LENGTH = 65535

GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "r50k": GPT2_PATTERN,
    "cl100k": CL100K_PATTERN,
    "gpt4": CL100K_PATTERN,
    "o200k": O200K_PATTERN,
}


def resolve_pattern(pattern: str) -> str:
    """The regex of a pattern name; any other string is itself the regex."""
    return PATTERNS.get(pattern, pattern)


def pretokenize(text: str, pattern: str = "gpt4") -> list[str]:
    """Splits text into the pieces BPE works on (empty matches are dropped)."""
    return [m.group() for m in regex.finditer(resolve_pattern(pattern), text) if m.group()]


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replaces occurrences of ``pair`` in ``ids`` by ``new_id``, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt4",
    min_frequency: int = 2,
    max_token_length: Optional[int] = None,
) -> list[tuple[int, int]]:
    """Learns up to ``vocab_size - 256`` merges; returns them as (left_id, right_id) pairs."""
    if max_token_length is None:
        max_token_length = MAX_TOKEN_LENGTH
    words = Counter(p.encode("utf-8") for t in texts for p in pretokenize(t, pattern))
    pieces = {tuple(w): c for w, c in words.items()}
    vocab = {i: bytes([i]) for i in range(256)}
    known = set(vocab.values())
    merges: list[tuple[int, int]] = []
    while 256 + len(merges) < vocab_size:
        counts: Counter = Counter()
        for ids, c in pieces.items():
            for pair in zip(ids, ids[1:]):
                counts[pair] += c
        allowed = [
            (c, pair)
            for pair, c in counts.items()
            if vocab[pair[0]] + vocab[pair[1]] not in known
            and len(vocab[pair[0]] + vocab[pair[1]]) <= max_token_length
        ]
        if not allowed:
            break
        count, pair = min(allowed, key=lambda cp: (-cp[0], cp[1]))
        if count < min_frequency:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        known.add(vocab[new_id])
        merged: Counter = Counter()
        for ids, c in pieces.items():
            merged[tuple(merge(list(ids), pair, new_id))] += c
        pieces = merged
    return merges


def encode_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encodes one piece under rank semantics (see the module docstring)."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return [ranks[p] for p in parts]
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def ranks_from_merges(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """The bytes -> id map of the tokens that ``merges`` build over the 256 byte tokens."""
    vocab = [bytes([i]) for i in range(256)]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    return {b: i for i, b in enumerate(vocab)}


def encode(text: str, merges: list[tuple[int, int]], pattern: str = "gpt4") -> list[int]:
    """Encodes text with the tokens that ``merges`` define."""
    ranks = ranks_from_merges(merges)
    return [i for p in pretokenize(text, pattern) for i in encode_piece(p.encode("utf-8"), ranks)]


def decode(ids: list[int], merges: list[tuple[int, int]]) -> bytes:
    """The bytes of a sequence of ids."""
    vocab = [bytes([i]) for i in range(256)]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    return b"".join(vocab[i] for i in ids)
