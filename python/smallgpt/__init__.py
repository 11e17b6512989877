"""smallgpt: train your own GPT, from a laptop CPU to a GPU cluster.

The tokenizer needs no PyTorch; the model, trainer and samplers import it on first use.
"""

from __future__ import annotations

from typing import Any

from smallgpt.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["Tokenizer", "GPT", "GPTConfig", "__version__"]

_LAZY = {"GPT": "smallgpt.model", "GPTConfig": "smallgpt.model"}


def __getattr__(name: str) -> Any:
    # Importing torch takes seconds; tokenizer-only users should not pay for it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smallgpt' has no attribute {name!r}")
