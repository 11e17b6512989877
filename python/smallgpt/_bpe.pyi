"""Type stubs for the Rust extension `smallgpt._bpe` (see rust/src/py.rs)."""

from typing import Optional, Sequence

GPT2_PATTERN: str
CL100K_PATTERN: str
O200K_PATTERN: str
MAX_TOKEN_LENGTH: int
MAX_VOCAB_SIZE: int
MAX_THREADS: int

class CoreTokenizer:
    @staticmethod
    def from_merges(
        merges: Sequence[tuple[int, int]],
        pattern: str,
        special_tokens: Sequence[tuple[str, int]],
        byte_order: Optional[Sequence[int]] = None,
    ) -> CoreTokenizer: ...
    @staticmethod
    def from_tokens(
        tokens: Sequence[bytes], pattern: str, special_tokens: Sequence[tuple[str, int]]
    ) -> CoreTokenizer: ...
    def encode_ordinary(self, text: str) -> list[int]: ...
    def encode(
        self, text: str, allowed: set[str], disallowed: Optional[set[str]] = None
    ) -> list[int]: ...
    def encode_strict(self, text: str) -> list[int]: ...
    def encode_flat(
        self, text: str, allowed: set[str], disallowed: Optional[set[str]] = None
    ) -> bytes: ...
    def encode_batch(
        self,
        texts: Sequence[str],
        allowed: set[str],
        disallowed: Optional[set[str]] = None,
        num_threads: Optional[int] = None,
    ) -> list[list[int]]: ...
    def encode_batch_flat(
        self,
        texts: Sequence[str],
        allowed: set[str],
        disallowed: Optional[set[str]] = None,
        num_threads: Optional[int] = None,
    ) -> tuple[bytes, bytes]: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def token_bytes(self) -> list[bytes]: ...
    def merges(self) -> list[tuple[int, int]]: ...
    def byte_order(self) -> list[int]: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def pattern(self) -> str: ...
    @property
    def special_tokens(self) -> dict[str, int]: ...

class Trainer:
    def __init__(self, pattern: str, num_threads: Optional[int] = None) -> None: ...
    def feed(self, texts: Sequence[str]) -> None: ...
    def feed_files(self, paths: Sequence[str], errors: str = "strict") -> None: ...
    def feed_sources(
        self, sources: Sequence[tuple[str, str, Optional[str]]], errors: str = "strict"
    ) -> None: ...
    def n_pieces(self) -> int: ...
    def train(
        self,
        num_merges: int,
        min_frequency: int = 2,
        max_token_length: Optional[int] = None,
        progress: bool = False,
    ) -> list[tuple[int, int]]:
        """Learns merges from the counts fed so far and consumes them (feed again to train
        again)."""
        ...

def pretokenize(pattern: str, text: str, regex_only: bool = False) -> list[str]: ...
def pretokenize_chunked(pattern: str, text: str, target: int) -> list[str]: ...
def resolve_pattern(name: str) -> str: ...
def read_text(path: str, errors: str = "strict") -> str: ...
def tokenize_corpus(
    tokenizer: CoreTokenizer,
    eot: int,
    sources: Sequence[tuple[str, str, Optional[str]]],
    out_dir: str,
    val_fraction: float,
    shard_tokens: int,
    dtype_bits: int,
    errors: str = "strict",
    progress: bool = False,
    num_threads: Optional[int] = None,
) -> dict[str, tuple[int, int, int, list[str]]]: ...
