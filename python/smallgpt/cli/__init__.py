"""Command-line entry points: smallgpt-tokenize, smallgpt-train, smallgpt-sample, smallgpt-eval,
smallgpt-export."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn, Optional


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def fail(prog: str, message: object, code: int = 2) -> int:
    """Prints ``prog: error: message`` (first line only) and returns the exit status."""
    text = str(message).strip().splitlines()
    print(f"{prog}: error: {text[0] if text else type(message).__name__}", file=sys.stderr)
    return code


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}

#: The escapes :func:`unescape` understands, for help texts.
ESCAPES_HELP = r"\n, \t, \r, \0 and \\ are understood"


def unescape(text: str) -> str:
    r"""Turns the escapes people type in a shell into the characters they mean.

    ``\n`` (newline), ``\t`` (tab), ``\r`` (carriage return), ``\0`` (NUL) and ``\\`` (one
    backslash) are replaced; a backslash before anything else is kept as typed, and every
    other character, non-ASCII included, is left alone. So ``'§\n'`` is ``"§"`` plus a
    newline, ``'\\n'`` is a backslash and ``n``, and ``'C:\dir'`` stays as it is.
    """
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type``: an int from ``low`` to ``high`` (inclusive; no upper bound if
    None), with a one-line error naming the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            where = f"at least {low:,}" if high is None else f"from {low:,} to {high:,}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {value:,}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse ``type``: a finite number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value
