"""Tokens as a server shows them: their bytes, OpenAI's token strings, and streamed text.

OpenAI's completions API names every token by a string. A token that is not valid UTF-8 on
its own (one byte of a multi-byte character) is written ``bytes:\\xe2\\x80`` there, and so it
is here; every other token is its text.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, List

from smallgpt.generate import _first_stop, _stop_prefix_len

if TYPE_CHECKING:
    from smallgpt.tokenizer import Tokenizer

__all__ = ["TextStream", "TokenTable"]


class TokenTable:
    """Every token's bytes and OpenAI-style string, looked up once at start-up (a step of a
    busy server names hundreds of tokens)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.bytes: List[bytes] = [tokenizer.decode_bytes([i])
                                   for i in range(tokenizer.vocab_size)]
        self.strings: List[str] = [token_string(b) for b in self.bytes]

    def __len__(self) -> int:
        return len(self.bytes)


def token_string(raw: bytes) -> str:
    """A token's text, or ``bytes:\\xNN...`` when its bytes are not valid UTF-8 alone."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextStream:
    """Turns one sequence's tokens into text as they come.

    Bytes are decoded incrementally as UTF-8 (a character split across tokens appears once
    complete). With stop strings, text that could be the start of one is held back until it
    is known not to be; the text ends right before the first stop string (as
    :func:`smallgpt.generate.stream_text` does). ``chars`` counts the characters decoded so
    far, held-back ones included: a token's ``text_offset``.
    """

    def __init__(self, table: TokenTable, stops: tuple[str, ...] = ()) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        self._pending = ""
        self.chars = 0

    def push(self, token: int) -> tuple[str, bool]:
        """The text released by ``token``, and whether a stop string was completed (the text
        then ends before it)."""
        piece = self._utf8.decode(self._table.bytes[token])
        self.chars += len(piece)
        if not self._stops:
            return piece, False
        pending = self._pending + piece
        hit = _first_stop(pending, self._stops)
        if hit >= 0:
            self._pending = ""
            return pending[:hit], True
        hold = _stop_prefix_len(pending, self._stops)
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        """Whatever is held back, at the end of the sequence."""
        rest = self._pending + self._utf8.decode(b"", final=True)
        self._pending = ""
        return rest
