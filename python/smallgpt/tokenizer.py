"""The friendly tokenizer API over the Rust core (`smallgpt._bpe`).

All heavy work (pre-tokenization, counting, merging, encoding, batch encoding) runs in Rust
with the GIL released; this module converts arguments, reads and writes files, and keeps the
tiktoken-style special-token rules.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import AbstractSet, Any, Collection, Iterable, Literal, Optional, Sequence, Union

from smallgpt import _bpe
from smallgpt._io import atomic_write_text

PathLike = Union[str, "os.PathLike[str]"]
SpecialSet = Union[Literal["all"], AbstractSet[str], Collection[str]]

FORMAT_NAME = "smallgpt-tokenizer"
FORMAT_VERSION = 1
EOT = "<|endoftext|>"
#: Most ids a vocabulary can have (special tokens included): ids are 32-bit.
MAX_VOCAB_SIZE: int = _bpe.MAX_VOCAB_SIZE
#: Longest token, in bytes, that the encoder holds (and training makes).
MAX_TOKEN_LENGTH: int = _bpe.MAX_TOKEN_LENGTH

# Documents are fed to Rust in batches of about this many characters, so an iterable of texts
# is streamed (never collected whole in Python) while each batch is counted in parallel.
_TRAIN_BATCH_CHARS = 8 << 20

# Special tokens of OpenAI's published vocabularies (tiktoken's values), by file-name stem.
_OPENAI_SPECIALS: dict[str, dict[str, int]] = {
    "r50k_base": {EOT: 50256},
    "gpt2": {EOT: 50256},
    "cl100k_base": {
        EOT: 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {EOT: 199999, "<|endofprompt|>": 200018},
}
# Number of ranks in each of those files: a file of another size is not OpenAI's.
_OPENAI_SIZES = {"r50k_base": 50256, "gpt2": 50256, "cl100k_base": 100256, "o200k_base": 199998}
_OPENAI_PATTERNS = {
    "r50k_base": "gpt2",
    "gpt2": "gpt2",
    "cl100k_base": "cl100k",
    "o200k_base": "o200k",
}


def openai_vocabulary(path: PathLike, n_ranks: int) -> Optional[str]:
    """The name of OpenAI's vocabulary that a ``.tiktoken`` file is, or None: its name must
    be OpenAI's (``cl100k_base.tiktoken``, ...) and it must have that many ranks."""
    stem = Path(path).name.split(".")[0]
    return stem if _OPENAI_SIZES.get(stem) == n_ranks else None


def _read_text(path: PathLike) -> str:
    """A UTF-8 text file's contents; a file that is not UTF-8 is a ``ValueError`` naming it."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte offset {e.start})") from None


def _read_json(path: PathLike) -> Any:
    """A JSON file's value; malformed JSON is a ``ValueError`` naming the file."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON file: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: not a JSON file (nested too deeply)") from None


def _read_tiktoken(path: PathLike) -> list[bytes]:
    """The tokens of a ``.tiktoken`` file, indexed by rank."""
    ranked: dict[int, bytes] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranked[int(rank)] = base64.b64decode(token, validate=True)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank line") from None
    if sorted(ranked) != list(range(len(ranked))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranked) - 1}")
    return [ranked[i] for i in range(len(ranked))]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (used by encoder.json and HF byte-level)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def check_train_sizes(
    vocab_size: Any, n_special: int, max_token_length: Any = None, what: str = "vocab_size"
) -> None:
    """Raises ``ValueError`` unless a vocabulary of ``vocab_size`` ids (``n_special`` of them
    special) and tokens of at most ``max_token_length`` bytes can be trained and encoded."""
    low = 256 + n_special
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < low:
        raise ValueError(
            f"{what} must be an int >= 256 + {n_special} special tokens = {low}, "
            f"got {vocab_size!r}"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(
            f"{what} must be at most {MAX_VOCAB_SIZE:,} (token ids are 32-bit), got {vocab_size:,}"
        )
    if max_token_length is not None and (
        isinstance(max_token_length, bool)
        or not isinstance(max_token_length, int)
        or not 2 <= max_token_length <= MAX_TOKEN_LENGTH
    ):
        raise ValueError(
            f"max_token_length must be an int from 2 to {MAX_TOKEN_LENGTH} (the longest token "
            f"the encoder holds), got {max_token_length!r}"
        )


def _special_pairs(special_tokens: Any) -> list[tuple[str, int]]:
    if not isinstance(special_tokens, dict):
        raise ValueError("special_tokens must map each special token string to its id")
    return [(str(k), int(v)) for k, v in special_tokens.items()]


class Tokenizer:
    """A byte-level BPE tokenizer (train, encode, decode, save, load, interop).

    Build one with :meth:`train`, :meth:`load`, :meth:`from_gpt2`, :meth:`from_tiktoken` or
    :meth:`from_huggingface`. Ids are tiktoken-style ranks: encoding merges, within each
    pre-tokenized piece, the adjacent pair whose concatenation has the lowest id.
    """

    def __init__(self, core: _bpe.CoreTokenizer) -> None:
        self._core = core
        self._special_tokens: dict[str, int] = dict(core.special_tokens)
        # The hottest call goes straight to Rust, which checks its argument the same way: a
        # Python method around it cost ~0.4 us a call, a third of encoding a short line.
        self.encode_ordinary = core.encode_ordinary  # type: ignore[method-assign]

    # ----------------------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        texts: Optional[Iterable[str]] = None,
        *,
        files: Optional[Sequence[PathLike]] = None,
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = (EOT,),
        min_frequency: int = 2,
        max_token_length: Optional[int] = None,
        progress: bool = False,
        errors: Literal["strict", "replace"] = "strict",
        num_threads: Optional[int] = None,
    ) -> Tokenizer:
        """Learns a vocabulary of ``vocab_size`` ids (256 bytes + merges + special tokens).

        Args:
            texts: documents, any iterable of ``str``; streamed to Rust in batches.
            files: paths of UTF-8 text files, each one document; read and counted in Rust.
            vocab_size: total number of ids, special tokens included, at most
                ``MAX_VOCAB_SIZE`` (2**31 - 1: ids are 32-bit). Training may stop earlier
                (``min_frequency``, or no pair left to merge), giving a smaller vocabulary.
            pattern: ``"gpt2"``, ``"cl100k"`` (alias ``"gpt4"``), ``"o200k"`` or a regex.
            special_tokens: strings that get the ids after the merges, in this order.
            min_frequency: stop when the best pair occurs fewer times than this.
            max_token_length: never create a token longer than this many bytes (2 to
                ``MAX_TOKEN_LENGTH`` = 65535, the encoder's limit and the default).
            progress: show a progress bar of the merges on stderr.
            errors: ``"strict"`` raises ``ValueError`` on invalid UTF-8 in ``files`` (naming
                the file and byte offset); ``"replace"`` substitutes U+FFFD.
            num_threads: threads for counting (default: all cores). The result is the same
                for any number.

        Raises:
            ValueError: vocab_size too small, bad arguments, invalid pattern or UTF-8.
            FileNotFoundError: a file in ``files`` does not exist.
            OSError: a file in ``files`` is a directory, a pipe or a device, or unreadable.
            TypeError: an item of ``texts`` is not a ``str``, or ``special_tokens`` is not
                a sequence of ``str``.
        """
        if texts is None and files is None:
            raise ValueError("pass texts (an iterable of str) or files (a list of paths)")
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of str, not a single string")
        if isinstance(special_tokens, str) or not all(isinstance(t, str) for t in special_tokens):
            raise TypeError("special_tokens must be a sequence of str (not a single str)")
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError("special_tokens contains duplicates")
        check_train_sizes(vocab_size, len(special_tokens), max_token_length)
        if not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")
        # Counts are 64-bit: a larger threshold could never be met anyway.
        min_frequency = min(min_frequency, 2**63)
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', not {errors!r}")

        trainer = _bpe.Trainer(pattern, num_threads)
        if files is not None:
            if isinstance(files, (str, os.PathLike)):
                files = [files]
            trainer.feed_files([os.fspath(f) for f in files], errors)
        if texts is not None:
            batch: list[str] = []
            size = 0
            for t in texts:
                if not isinstance(t, str):
                    raise TypeError(f"texts must contain str, got {type(t).__name__}")
                batch.append(t)
                size += len(t)
                if size >= _TRAIN_BATCH_CHARS:
                    trainer.feed(batch)
                    batch, size = [], 0
            if batch:
                trainer.feed(batch)
        num_merges = vocab_size - 256 - len(special_tokens)
        merges = trainer.train(num_merges, max(min_frequency, 1), max_token_length, progress)
        first_special = 256 + len(merges)
        specials = [(s, first_special + i) for i, s in enumerate(special_tokens)]
        return cls(_bpe.CoreTokenizer.from_merges(merges, pattern, specials))

    # ----------------------------------------------------------------------------- encoding

    def _special_sets(
        self, allowed_special: SpecialSet, disallowed_special: SpecialSet
    ) -> tuple[set[str], set[str]]:
        for name, arg in (("allowed_special", allowed_special),
                          ("disallowed_special", disallowed_special)):
            if isinstance(arg, str) and arg != "all":
                raise TypeError(f"{name} must be 'all' or a set of str, not the str {arg!r}")
        allowed = set(self._special_tokens) if allowed_special == "all" else set(allowed_special)
        if disallowed_special == "all":
            disallowed = set(self._special_tokens) - allowed
        else:
            disallowed = set(disallowed_special)
        unknown = (allowed | disallowed) - set(self._special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        return allowed, disallowed

    def encode_ordinary(self, text: str) -> list[int]:
        """Encodes text, treating special-token text as ordinary text.

        (Instances call the Rust method directly; this definition documents it.)
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self._core.encode_ordinary(text)

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """Encodes text like tiktoken's ``Encoding.encode``.

        Special tokens in ``allowed_special`` (or all, with ``"all"``) become their ids.
        Text of a special token in ``disallowed_special`` (by default every special token
        that is not allowed) raises ``ValueError``; pass ``disallowed_special=()`` to encode
        it as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if disallowed_special == "all" and not allowed_special:
            # The default, and by far the most common call: no sets to build.
            return self._core.encode_strict(text)
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        return self._core.encode(text, allowed, disallowed or None)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
        num_threads: Optional[int] = None,
    ) -> list[list[int]]:
        """Encodes many texts in parallel (Rust threads, GIL released); same as ``encode``."""
        # Rust checks `texts` (TypeError for a str or a non-str item) while collecting it.
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        return self._core.encode_batch(texts, allowed, disallowed or None, num_threads)

    def encode_ordinary_batch(
        self, texts: Sequence[str], *, num_threads: Optional[int] = None
    ) -> list[list[int]]:
        """Encodes many texts in parallel, ignoring special tokens."""
        return self.encode_batch(texts, disallowed_special=(), num_threads=num_threads)

    def encode_batch_to_numpy(
        self,
        texts: Sequence[str],
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
        num_threads: Optional[int] = None,
    ) -> tuple[Any, Any]:
        """Encodes many texts in parallel into flat numpy arrays: ``(ids, offsets)``.

        ``ids`` (uint32) holds every text's ids back to back and text ``i`` is
        ``ids[offsets[i]:offsets[i + 1]]`` (``offsets`` is int64, ``len(texts) + 1`` long).
        The same ids as ``encode_batch``, several times faster for large batches because no
        Python int is made per token. Both arrays are read-only views of ``bytes`` objects
        (``.copy()`` them to write).
        """
        import numpy as np

        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        ids, offsets = self._core.encode_batch_flat(texts, allowed, disallowed or None, num_threads)
        return np.frombuffer(ids, dtype="<u4"), np.frombuffer(offsets, dtype="<i8")

    def encode_to_numpy(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
    ) -> Any:
        """``encode`` returning a read-only uint32 numpy array (as tiktoken's)."""
        import numpy as np

        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        ids = self._core.encode_flat(text, allowed, disallowed or None)
        return np.frombuffer(ids, dtype="<u4")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids. Raises ``ValueError`` on an unknown id."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        try:
            return self._core.decode_bytes(list(ids))
        except (OverflowError, TypeError) as e:
            raise ValueError(f"token ids must be ints in [0, {self.vocab_size}): {e}") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decodes ids to text; invalid UTF-8 sequences are replaced by U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of a single token."""
        return self.decode_bytes([token_id])

    # ----------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """One past the largest id (ordinary and special tokens)."""
        return self._core.vocab_size

    @property
    def n_ordinary(self) -> int:
        """Number of ordinary (byte and merged) tokens."""
        return self._core.n_tokens

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The (left_id, right_id) pair each token from id 256 on was made of, in id order."""
        return [tuple(m) for m in self._core.merges()]  # type: ignore[misc]

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex."""
        return self._core.pattern

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token strings and their ids."""
        return dict(self._special_tokens)

    @property
    def eot_id(self) -> Optional[int]:
        """The id of ``<|endoftext|>``, or None if this tokenizer has none."""
        return self._special_tokens.get(EOT)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={self.n_ordinary - 256}, "
            f"special_tokens={len(self._special_tokens)})"
        )

    # ----------------------------------------------------------------------------- our format

    def to_json_str(self) -> str:
        """The tokenizer as the JSON text that :meth:`save` writes."""
        byte_order = list(self._core.byte_order())
        head: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self._special_tokens,
        }
        if byte_order != list(range(256)):
            head["byte_order"] = byte_order
        body = json.dumps(head, indent=2, ensure_ascii=False)[:-2]
        # One merge per line keeps the file readable and diffable.
        merges = ",\n".join(f"    [{a}, {b}]" for a, b in self._core.merges())
        return f'{body},\n  "merges": [\n{merges}\n  ]\n}}\n'

    @classmethod
    def from_json_str(cls, text: str, source: str = "<string>") -> Tokenizer:
        """Builds a tokenizer from the JSON text of :meth:`to_json_str`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not a JSON file: {e}") from None
        except RecursionError:
            raise ValueError(f"{source}: not a JSON file (nested too deeply)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{source}: not a smallgpt tokenizer file")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: tokenizer format version {data.get('version')!r} is not supported "
                f"(this smallgpt reads version {FORMAT_VERSION})"
            )
        try:
            merges = [(int(a), int(b)) for a, b in data["merges"]]
            specials = _special_pairs(data.get("special_tokens", {}))
            pattern = data["pattern"]
            byte_order = data.get("byte_order")
            return cls(_bpe.CoreTokenizer.from_merges(merges, pattern, specials, byte_order))
        except KeyError as e:
            raise ValueError(f"{source}: malformed tokenizer file: no {e} entry") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{source}: malformed tokenizer file: {e}") from None

    def save(self, path: PathLike) -> None:
        """Writes the tokenizer as one readable, versioned JSON file (atomically)."""
        atomic_write_text(path, self.to_json_str())

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Reads a file written by :meth:`save`."""
        return cls.from_json_str(_read_text(path), source=os.fspath(path))

    # ----------------------------------------------------------------------------- interop

    @classmethod
    def from_gpt2(cls, encoder_json: PathLike, vocab_bpe: PathLike) -> Tokenizer:
        """Loads OpenAI's GPT-2 files; ids equal tiktoken's ``gpt2`` encoding."""
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        # str.translate + latin-1 turns a whole token into bytes at C speed (a generator
        # over characters made loading take a quarter of a second); the alphabet is checked
        # once per file instead of per character.
        table = {ord(c): b for c, b in byte_decoder.items()}

        def to_bytes(s: str) -> bytes:
            return s.translate(table).encode("latin-1")

        def check_alphabet(text: str, path: PathLike) -> None:
            bad = set(text) - byte_decoder.keys()
            if bad:
                raise ValueError(
                    f"{path}: not a byte-level BPE file (unexpected {sorted(bad)[0]!r})"
                )

        encoder = _read_json(encoder_json)
        if not isinstance(encoder, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in encoder.values()
        ):
            raise ValueError(f"{encoder_json}: not a GPT-2 encoder.json (token -> id)")
        lines = _read_text(vocab_bpe).split("\n")
        if not lines or not lines[0].startswith("#version"):
            raise ValueError(f"{vocab_bpe}: missing '#version' header")
        check_alphabet("".join(lines[1:]).replace(" ", "").replace("\r", ""), vocab_bpe)
        check_alphabet(
            "".join(k for k in encoder if k not in (EOT, "<|startoftext|>")), encoder_json
        )
        # Byte tokens come in GPT-2's printable-first order; merged tokens follow vocab.bpe.
        order = sorted(range(256), key=lambda b: ord(_bytes_to_unicode()[b]))
        tokens = [bytes([b]) for b in order]
        for line in lines[1:]:
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{vocab_bpe}: bad merge line {line!r}")
            tokens.append(to_bytes(parts[0]) + to_bytes(parts[1]))
        specials = {}
        for s, i in encoder.items():
            b = to_bytes(s) if s not in (EOT, "<|startoftext|>") else None
            if b is None:
                specials[s] = int(i)
            elif i >= len(tokens) or tokens[i] != b:
                raise ValueError(f"{encoder_json} does not match {vocab_bpe} at token {s!r}")
        if len(encoder) - len(specials) != len(tokens):
            raise ValueError(f"{encoder_json} and {vocab_bpe} have different sizes")
        try:
            core = _bpe.CoreTokenizer.from_tokens(tokens, "gpt2", list(specials.items()))
        except (ValueError, OverflowError) as e:
            raise ValueError(f"{encoder_json}: {e}") from None
        return cls(core)

    @classmethod
    def from_tiktoken(
        cls,
        path: PathLike,
        *,
        pattern: Optional[str] = None,
        special_tokens: Union[dict[str, int], Sequence[str], None] = None,
    ) -> Tokenizer:
        """Loads a ``.tiktoken`` rank file (``base64-token rank`` per line).

        The file holds neither the pattern nor the special tokens. OpenAI's files
        (``r50k_base``, ``cl100k_base``, ``o200k_base``) are recognised by name *and* number
        of ranks, and both default to tiktoken's; for any other file ``pattern`` is required
        and ``special_tokens`` defaults to none. ``special_tokens`` is a dict of ids, or a
        sequence of strings that get the ids after the ranks, in order (as
        :meth:`train` numbers them, so ``[EOT]`` restores a trained tokenizer saved with
        :meth:`save_tiktoken`).

        Raises:
            ValueError: a malformed line (file and line named), ranks that are not
                ``0..n-1``, an inconsistent vocabulary, a missing or invalid pattern.
        """
        tokens = _read_tiktoken(path)
        return cls._from_ranks(tokens, path, pattern, special_tokens)

    @classmethod
    def _from_ranks(
        cls,
        tokens: list[bytes],
        path: PathLike,
        pattern: Optional[str],
        special_tokens: Union[dict[str, int], Sequence[str], None],
    ) -> Tokenizer:
        stem = openai_vocabulary(path, len(tokens))
        if pattern is None:
            if stem is None:
                name = Path(path).name.split(".")[0]
                known = _OPENAI_SIZES.get(name)
                why = f"; it has {len(tokens)} ranks, OpenAI's {name} {known}" if known else ""
                raise ValueError(
                    f"{path}: pass pattern=... (a .tiktoken file does not record its regex{why})"
                )
            pattern = _OPENAI_PATTERNS[stem]
        if special_tokens is None:
            special_tokens = dict(_OPENAI_SPECIALS[stem]) if stem else {}
        elif not isinstance(special_tokens, dict):
            names = [special_tokens] if isinstance(special_tokens, str) else list(special_tokens)
            if not all(isinstance(n, str) for n in names):
                raise TypeError("special_tokens must be a dict or a sequence of str")
            special_tokens = {n: len(tokens) + i for i, n in enumerate(names)}
        try:
            specials = _special_pairs(special_tokens)
            return cls(_bpe.CoreTokenizer.from_tokens(tokens, pattern, specials))
        except OverflowError as e:
            raise ValueError(f"{path}: special token id out of range ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save_tiktoken(self, path: PathLike) -> None:
        """Writes the ordinary tokens as a ``.tiktoken`` rank file (special tokens and the
        pattern are not part of that format)."""
        lines = (
            f"{base64.b64encode(t).decode('ascii')} {i}\n"
            for i, t in enumerate(self._core.token_bytes())
        )
        atomic_write_text(path, "".join(lines))

    def save_huggingface(self, path: PathLike) -> None:
        """Writes a Hugging Face ``tokenizer.json`` that encodes identically.

        Rank semantics are expressed with HF's BPE model as ``ignore_merges`` (a piece that is
        a token is taken whole) plus one merge for every way each token splits into two
        tokens, ordered by the token's id, so the lowest-id concatenation is merged first.

        HF reads the split regex with another engine (Oniguruma), so the regex is written in
        the form that engine reads the same way: for the named patterns that form is tested
        to split text identically. A custom pattern is written as it is, unless it holds a
        construct Oniguruma reads differently (a possessive interval such as ``{1,3}+``,
        which it takes as a greedy repeat, or a ``^``/``$`` anchor, which it takes per line):
        then ``ValueError`` is raised and nothing is written. (HF's ``encode`` turns
        special-token text into special ids, like ``encode(..., allowed_special="all")``.)
        """
        hf_pattern = _to_hf_regex(self.pattern)
        b2u = _bytes_to_unicode()
        tokens = self._core.token_bytes()

        def u(b: bytes) -> str:
            return "".join(b2u[x] for x in b)

        merges = _every_split(tokens)
        data = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": i,
                    "content": s,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
                for s, i in sorted(self._special_tokens.items(), key=lambda kv: kv[1])
            ],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": hf_pattern},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": False,
                        "trim_offsets": True,
                        "use_regex": False,
                    },
                ],
            },
            "post_processor": None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": True,
                "vocab": {u(t): i for i, t in enumerate(tokens)},
                "merges": [[u(tokens[lr]), u(tokens[rr])] for _, lr, rr in merges],
            },
        }
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1))

    @classmethod
    def from_huggingface(cls, path: PathLike) -> Tokenizer:
        """Loads a byte-level BPE ``tokenizer.json`` (ours, GPT-2-style, or tiktoken-style).

        The ids must be ranks (each merged token's id above its parts'), as in every
        byte-level BPE tokenizer.json made by training or conversion. The split regex is
        taken from the pre-tokenizer (a ``Split`` with ``Isolated`` behaviour, or GPT-2's
        ``ByteLevel`` regex); a normalizer, if any, is not applied.

        Raises:
            ValueError: not JSON, not a byte-level BPE model, or entries of the wrong type
                (the file is named).
        """
        data = _read_json(path)
        try:
            return cls._from_hf_data(data)
        except KeyError as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json (no {e} entry)") from None
        except (AttributeError, TypeError) as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        except OverflowError as e:
            raise ValueError(f"{path}: token id out of range ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def _from_hf_data(cls, data: Any) -> Tokenizer:
        """The tokenizer of a parsed tokenizer.json (errors do not name the file)."""
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"model type {model.get('type')!r} is not BPE")
        u2b = {c: b for b, c in _bytes_to_unicode().items()}
        specials = {
            t["content"]: int(t["id"]) for t in data.get("added_tokens") or [] if t.get("special")
        }
        vocab = model["vocab"]
        by_id: dict[int, bytes] = {}
        for s, i in vocab.items():
            if s in specials:
                continue
            try:
                by_id[int(i)] = bytes(u2b[c] for c in s)
            except KeyError:
                raise ValueError(f"token {s!r} is not byte-level") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"ordinary token ids are not 0..{len(by_id) - 1}")
        pattern = _pattern_of_hf_pretokenizer(data.get("pre_tokenizer"))
        tokens = [by_id[i] for i in range(len(by_id))]
        return cls(_bpe.CoreTokenizer.from_tokens(tokens, pattern, list(specials.items())))


def _every_split(tokens: list[bytes]) -> list[tuple[int, int, int]]:
    """``(id, left, right)`` for every way each token is two tokens, in id order (then by
    the parts' ids): as HF merges, the lowest-id concatenation is merged first."""
    ranks = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        splits = [
            (ranks[t[:k]], ranks[t[k:]])
            for k in range(1, len(t))
            if t[:k] in ranks and t[k:] in ranks
        ]
        merges.extend((i, lr, rr) for lr, rr in sorted(splits))
    return merges


# Hugging Face's `tokenizers` compiles split regexes with Oniguruma's Ruby syntax, where
# `X{1,3}+` is `(X{1,3})+`, a greedy run of any length, not a possessive `X{1,3}`: cl100k's
# `\p{N}{1,3}+` would take "1766" whole instead of "176" + "6". Alone at the end of its
# alternative, a possessive interval matches what the greedy interval matches (nothing after
# it could make the engine backtrack into it), so dropping the `+` gives the same pieces.
# GPT-2's and o200k's patterns are read alike by both engines (`\s++$` can only stop before
# a non-space or at the end, where a per-line `$` and an end-of-text `$` agree).
_HF_FORMS = {
    _bpe.GPT2_PATTERN: _bpe.GPT2_PATTERN,
    _bpe.CL100K_PATTERN: _bpe.CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}"),
    _bpe.O200K_PATTERN: _bpe.O200K_PATTERN,
}
_FROM_HF_FORMS = {hf: ours for ours, hf in _HF_FORMS.items()}


def _to_hf_regex(pattern: str) -> str:
    """``pattern`` as Hugging Face's regex engine must see it to split text the same way;
    ``ValueError`` for a custom pattern with a construct that engine reads differently."""
    if pattern in _HF_FORMS:
        return _HF_FORMS[pattern]
    problem = _oniguruma_difference(pattern)
    if problem:
        raise ValueError(
            f"cannot export this pattern to Hugging Face: it uses {problem}, which HF's regex "
            "engine (Oniguruma) reads differently, so the tokenizer.json would split text "
            "differently; use a named pattern or rewrite the regex without it"
        )
    return pattern


def _from_hf_regex(regex: str) -> str:
    """The pattern of an exported HF regex (a named pattern's HF form is that pattern)."""
    return _FROM_HF_FORMS.get(regex, regex)


_POSSESSIVE_INTERVAL = re.compile(r"\{\d+(?:,\d*)?\}\+")


def _oniguruma_difference(pattern: str) -> Optional[str]:
    """A construct of ``pattern`` outside character classes that Oniguruma (Ruby syntax)
    reads differently from fancy-regex, or None."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            # `\p{..}`, `\x{..}` and the like: skip the braces with the escape.
            if pattern[i + 1 : i + 2] in "pPxuU" and pattern[i + 2 : i + 3] == "{":
                end = pattern.find("}", i)
                i = end + 1 if end > 0 else len(pattern)
            else:
                i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":  # first in a class, `]` is a literal
                i += 1
            continue
        elif c in "^$":
            return f"the anchor {c!r}"
        elif c == "{":
            m = _POSSESSIVE_INTERVAL.match(pattern, i)
            if m:
                return f"the possessive interval {m.group()!r}"
        i += 1
    return None


def _pattern_of_hf_pretokenizer(pre: Any) -> str:
    """The split regex of a HF byte-level pre-tokenizer configuration."""
    if not isinstance(pre, dict):
        raise ValueError("no pre_tokenizer to take the split pattern from")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            if step.get("behavior", "Isolated") != "Isolated" or step.get("invert"):
                raise ValueError(
                    f"a Split pre-tokenizer with behavior {step.get('behavior')!r}"
                    f"{' inverted' if step.get('invert') else ''} is not supported "
                    "(only 'Isolated')"
                )
            pat = step["pattern"]
            if "Regex" in pat:
                return _from_hf_regex(pat["Regex"])
            if not isinstance(pat["String"], str) or not pat["String"]:
                raise ValueError("a Split pre-tokenizer with an empty string")
            sep = "".join(
                c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in pat["String"]
            )
            # Isolated: the separators and the runs between them are the pieces.
            return f"{sep}|(?:(?!{sep})(?s:.))+"
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt2"  # HF's byte-level regex is GPT-2's
    raise ValueError("unsupported pre_tokenizer (need a Split regex or ByteLevel)")
