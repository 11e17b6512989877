"""Command-line entry points: smallgpt-tokenize, smallgpt-train, smallgpt-sample, smallgpt-eval,
smallgpt-export."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


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
