"""One adapter per library: its trainer and its encoder, built from the shared files.

Each builder imports its library (so that the import is not timed) and returns the function a
worker times. Every library goes through its fastest natural API: file paths where it reads
files itself (ours, gigabpe, HF tokenizers), otherwise an iterator of ~1 MiB newline-aligned
chunks (rustbpe, bpeasy); every encoder runs with ``encode_ordinary`` semantics (special-token
text is plain text).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from .common import (
    BPEASY_MAX_TOKEN_LENGTH,
    CL100K_PAT,
    CL100K_SPECIALS,
    EOT,
    GPT2_SPECIALS,
    GPT2_TRAIN_PAT,
    gpt2_ranks,
    gpt2_tiktoken_pattern,
    newline_chunks,
    read_tiktoken_ranks,
)

TrainFn = Callable[[List[str], int], int]  # (files, vocab_size) -> final vocab size


def _ours_trainer(pattern: str) -> TrainFn:
    from smallgpt import Tokenizer

    def train(files: List[str], vocab_size: int) -> int:
        return Tokenizer.train(files=files, vocab_size=vocab_size, pattern=pattern).vocab_size

    return train


def _gigabpe_trainer() -> TrainFn:
    import gigabpe

    def train(files: List[str], vocab_size: int) -> int:
        vocab, _merges = gigabpe.train_bpe(
            files, vocab_size, special_tokens=[EOT], pretokenizer="bytelevel"
        )
        return len(vocab)

    return train


def _rustbpe_trainer() -> TrainFn:
    import rustbpe

    def train(files: List[str], vocab_size: int) -> int:
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(newline_chunks(files), vocab_size, pattern=GPT2_TRAIN_PAT)
        return int(tok.vocab_size)

    return train


def _bpeasy_trainer() -> TrainFn:
    import bpeasy

    def train(files: List[str], vocab_size: int) -> int:
        vocab = bpeasy.train_bpe(
            newline_chunks(files), GPT2_TRAIN_PAT, BPEASY_MAX_TOKEN_LENGTH, vocab_size
        )
        return len(vocab)

    return train


def _hf_trainer() -> TrainFn:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    def train(files: List[str], vocab_size: int) -> int:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train(files, trainer)
        return tok.get_vocab_size()

    return train


_TRAINER_BUILDERS: Dict[str, Callable[[], TrainFn]] = {
    "ours-gpt2": lambda: _ours_trainer("gpt2"),
    "ours-cl100k": lambda: _ours_trainer("cl100k"),
    "gigabpe": _gigabpe_trainer,
    "rustbpe": _rustbpe_trainer,
    "bpeasy": _bpeasy_trainer,
    "hf": _hf_trainer,
}


def make_trainer(key: str) -> TrainFn:
    """Imports the library of trainer ``key`` (see ``common.TRAINERS``) and returns
    ``train(files, vocab_size) -> final vocab size``."""
    if key not in _TRAINER_BUILDERS:
        raise ValueError(f"unknown trainer {key!r}")
    return _TRAINER_BUILDERS[key]()


@dataclass
class Encoder:
    one: Callable[[str], Any]  # one document -> ids
    batch: Callable[[List[str]], Any]  # documents -> ids per document, all cores


def _ours_encoder(lib: str, vocab: str, cl100k_path: str, gpt2_dir: str) -> Encoder:
    from smallgpt import Tokenizer

    if vocab == "cl100k":
        tok = Tokenizer.from_tiktoken(cl100k_path)
    else:
        tok = Tokenizer.from_gpt2(
            os.path.join(gpt2_dir, "encoder.json"), os.path.join(gpt2_dir, "vocab.bpe")
        )
    if lib == "ours-lists":
        return Encoder(tok.encode_ordinary, tok.encode_ordinary_batch)
    # Flat arrays, as quicktok's batch call returns.
    return Encoder(
        tok.encode_ordinary,
        lambda docs: tok.encode_batch_to_numpy(docs, disallowed_special=()),
    )


def _reference_vocab(vocab: str, cl100k_path: str,
                     gpt2_dir: str) -> Tuple[Dict[bytes, int], Dict[str, int], str]:
    """Ranks, special tokens and split pattern as the anchors take them."""
    if vocab == "cl100k":
        return read_tiktoken_ranks(cl100k_path), CL100K_SPECIALS, CL100K_PAT
    return gpt2_ranks(gpt2_dir), GPT2_SPECIALS, gpt2_tiktoken_pattern()


def _quicktok_encoder(ranks: Dict[bytes, int], specials: Dict[str, int], tmp: str) -> Encoder:
    import quicktok
    from quicktok import _import_core

    # quicktok reads its own binary vocabulary; write it from the same .tiktoken ranks
    # with quicktok's importer (the result is byte-identical to its bundled cl100k).
    _import_core.write_files(tmp, "cl100k_bench", ranks, specials, "cl100k", False)
    bundled = os.path.join(os.path.dirname(quicktok.__file__), "data")
    _import_core.ensure_tables(tmp, bundled, "cl100k", False)
    qt = quicktok.Tokenizer("cl100k_bench", tmp)
    return Encoder(qt.encode_ordinary, lambda docs: qt.encode_batch(docs, 0, False))


def make_encoder(lib: str, vocab: str, cl100k_path: str, gpt2_dir: str, tmp: str) -> Encoder:
    """Builds ``lib``'s encoder for ``vocab`` ("cl100k" or "gpt2") from the shared files;
    ``tmp`` is a scratch directory (quicktok writes its vocabulary there)."""
    if lib in ("ours", "ours-lists"):
        return _ours_encoder(lib, vocab, cl100k_path, gpt2_dir)
    if lib not in ("tiktoken", "riptoken", "quicktok"):
        raise ValueError(f"unknown encoder {lib!r}")
    if lib == "quicktok" and vocab != "cl100k":
        raise ValueError("quicktok has no scanner for the GPT-2 pattern")
    ranks, specials, pattern = _reference_vocab(vocab, cl100k_path, gpt2_dir)
    if lib == "tiktoken":
        import tiktoken

        threads = os.cpu_count() or 1
        enc = tiktoken.Encoding(
            f"{vocab}-bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        return Encoder(
            enc.encode_ordinary, lambda docs: enc.encode_ordinary_batch(docs, num_threads=threads)
        )
    if lib == "riptoken":
        import riptoken

        core = riptoken.CoreBPE(ranks, specials, pattern)
        return Encoder(core.encode_ordinary, core.encode_ordinary_batch)
    return _quicktok_encoder(ranks, specials, tmp)
