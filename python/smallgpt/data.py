"""Token shards on disk and the batch loader the trainer reads them with.

Shard format (llm.c / modded-nanogpt compatible): a header of 256 little-endian int32 values,
then the tokens.

* ``header[0] = 20240520``, ``header[1] = 1``: uint16 tokens (vocabularies up to 65536)
* ``header[0] = 20240801``, ``header[1] = 7``: uint32 tokens (larger vocabularies)
* ``header[2]`` is the number of tokens that follow.

A data folder holds ``train_*.bin``, ``val_*.bin``, ``tokenizer.json`` and ``meta.json``
(see :func:`load_meta`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "HEADER_INTS",
    "HEADER_BYTES",
    "MAGIC_U16",
    "MAGIC_U32",
    "write_shard",
    "read_shard",
    "write_meta",
    "load_meta",
    "split_files",
    "ShardDataset",
]

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7

_FORMATS = {
    MAGIC_U16: (VERSION_U16, np.dtype("<u2")),
    MAGIC_U32: (VERSION_U32, np.dtype("<u4")),
}

PathLike = Union[str, "os.PathLike[str]"]


def _atomic_write_bytes(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """Write ``chunks`` to ``path`` via ``path.tmp`` + rename so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(path: PathLike, tokens: Any, dtype: Optional[str] = None) -> Path:
    """Write one token shard atomically and return its path.

    Args:
        path: destination file (conventionally ``train_000000.bin``).
        tokens: 1-D sequence / array of non-negative token ids.
        dtype: ``"uint16"``, ``"uint32"`` or ``None`` to pick the smallest type that holds
            the largest id.

    Raises:
        ValueError: on negative ids, ids too large for ``dtype`` or an unknown dtype.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < 0:
        raise ValueError(f"{path}: negative token id {lo}")
    if dtype is None:
        dtype = "uint16" if hi < 2**16 else "uint32"
    if dtype == "uint16":
        magic, version, np_dtype = MAGIC_U16, VERSION_U16, np.dtype("<u2")
    elif dtype == "uint32":
        magic, version, np_dtype = MAGIC_U32, VERSION_U32, np.dtype("<u4")
    else:
        raise ValueError(f"{path}: unknown shard dtype {dtype!r} (use 'uint16' or 'uint32')")
    if hi > np.iinfo(np_dtype).max:
        raise ValueError(f"{path}: token id {hi} does not fit in {dtype}")
    if arr.size >= 2**31:
        raise ValueError(f"{path}: {arr.size} tokens exceed the int32 header count; split it")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, version, arr.size
    body = np.ascontiguousarray(arr.astype(np_dtype, copy=False))
    _atomic_write_bytes(path, [header.tobytes(), memoryview(body).cast("B")])
    return path


def read_shard(path: PathLike) -> np.ndarray:
    """Memory-map a shard and return its tokens (read-only ``uint16``/``uint32`` array).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, on a bad magic number or version, a short header or a
            size that does not match the header's token count (truncated or padded file).
    """
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(
            f"{path}: not a token shard (file is {size} bytes, shorter than the "
            f"{HEADER_BYTES}-byte header)"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens = int(header[0]), int(header[1]), int(header[2])
    if magic not in _FORMATS:
        raise ValueError(
            f"{path}: bad shard magic {magic} (expected {MAGIC_U16} for uint16 or "
            f"{MAGIC_U32} for uint32 shards)"
        )
    want_version, dtype = _FORMATS[magic]
    if version != want_version:
        raise ValueError(
            f"{path}: unsupported shard version {version} for magic {magic} "
            f"(expected {want_version})"
        )
    if n_tokens < 0:
        raise ValueError(f"{path}: corrupt shard header (negative token count {n_tokens})")
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: shard {what}: header says {n_tokens} tokens ({expected} bytes) "
            f"but the file is {size} bytes"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def write_meta(data_dir: PathLike, meta: Dict[str, Any]) -> Path:
    """Write ``meta.json`` atomically into ``data_dir``."""
    path = Path(data_dir) / "meta.json"
    _atomic_write_bytes(path, [(json.dumps(meta, indent=2) + "\n").encode("utf-8")])
    return path


def load_meta(data_dir: PathLike) -> Dict[str, Any]:
    """Read ``meta.json`` of a shard folder.

    A folder without ``meta.json`` (e.g. plain llm.c FineWeb shards) is accepted: the meta is
    reconstructed from the ``*_NNNNNN.bin`` file names, with unknown ``bytes``/``vocab_size``.

    Raises:
        FileNotFoundError: if the folder does not exist or holds no shards.
        ValueError: if ``meta.json`` is not valid JSON or lacks ``splits``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: invalid JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
            raise ValueError(f"{meta_path}: missing 'splits' object")
        return meta
    splits: Dict[str, Any] = {}
    for split in ("train", "val"):
        files = sorted(p.name for p in data_dir.glob(f"*{split}_*.bin"))
        if files:
            splits[split] = {"shards": files}
    if not splits:
        raise FileNotFoundError(f"data folder {data_dir} has no meta.json and no *.bin shards")
    return {"format": "smallgpt-shards", "version": 1, "splits": splits}


def split_files(
    data_dir: PathLike, split: str, meta: Optional[Dict[str, Any]] = None
) -> List[Path]:
    """Return the shard paths of ``split`` ("train" or "val") in order.

    Raises:
        FileNotFoundError: if the split is absent or a listed shard is missing.
    """
    data_dir = Path(data_dir)
    meta = meta if meta is not None else load_meta(data_dir)
    info = meta["splits"].get(split)
    if not info or not info.get("shards"):
        raise FileNotFoundError(f"data folder {data_dir} has no {split!r} split")
    paths = [data_dir / name for name in info["shards"]]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"shard {p} listed in meta.json is missing")
    return paths


@dataclass
class _Shards:
    """A split's shards as one virtual token stream (each window stays inside one shard)."""

    arrays: List[np.ndarray]

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(a) for a in self.arrays], dtype=np.int64)


class ShardDataset:
    """Batches of ``(x, y)`` windows from a split of a shard folder.

    Two modes:

    * ``"random"``: every batch row is a window starting at a uniformly random position of
      the split (shards weighted by the number of windows they hold). Each DDP rank draws from
      its own RNG stream (``seed``, ``rank``), so ranks see different data.
    * ``"sequential"``: one pass after another over the split in order, with non-overlapping
      windows of ``block_size`` tokens; the rows of a global batch are dealt round-robin to the
      ranks, so each rank reads its own part and together they cover every window once per
      epoch.

    ``y`` is ``x`` shifted by one token. Batches are ``torch.int64`` tensors of shape
    ``(batch_size, block_size)``. :meth:`state_dict` / :meth:`load_state_dict` capture the
    cursor and RNG state so a resumed run continues with exactly the same batches.
    """

    def __init__(
        self,
        data_dir: PathLike,
        split: str,
        block_size: int,
        batch_size: int,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mode not in ("random", "sequential"):
            raise ValueError(f"unknown sampling mode {mode!r} (use 'random' or 'sequential')")
        if block_size < 1 or batch_size < 1:
            raise ValueError("block_size and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        self.split = split
        self.paths = split_files(self.data_dir, split, self.meta)
        self.shards = _Shards([read_shard(p) for p in self.paths])
        self.block_size = block_size
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        sizes = self.shards.sizes
        # A window needs block_size + 1 tokens (x plus the shifted target).
        self._windows_random = np.maximum(sizes - block_size, 0)
        self._windows_seq = np.maximum((sizes - 1) // block_size, 0)
        if mode == "random" and self._windows_random.sum() == 0:
            raise ValueError(
                f"{split} split of {self.data_dir} is too small ({int(sizes.sum())} tokens) "
                f"for block_size {block_size}"
            )
        if mode == "sequential" and self._windows_seq.sum() == 0:
            raise ValueError(
                f"{split} split of {self.data_dir} is too small ({int(sizes.sum())} tokens) "
                f"for block_size {block_size}"
            )
        self._cum_random = np.cumsum(self._windows_random)
        self._cum_seq = np.cumsum(self._windows_seq)
        self._rng = np.random.default_rng([seed, rank])
        self._cursor = 0  # global window index of the next sequential batch
        self.epoch = 0

    @property
    def num_tokens(self) -> int:
        """Total tokens in the split."""
        return int(self.shards.sizes.sum())

    @property
    def max_token(self) -> int:
        """Largest token id in the split (scans the shards; use for validation only)."""
        return max((int(a.max()) for a in self.shards.arrays if len(a)), default=0)

    def _gather(self, cum: np.ndarray, window_ids: np.ndarray, stride: int) -> np.ndarray:
        """Rows of ``block_size + 1`` tokens for global window ids (``stride`` between starts)."""
        rows = np.empty((len(window_ids), self.block_size + 1), dtype=np.int64)
        shard_idx = np.searchsorted(cum, window_ids, side="right")
        for i, (w, s) in enumerate(zip(window_ids, shard_idx)):
            local = int(w) - (int(cum[s - 1]) if s > 0 else 0)
            start = local * stride
            rows[i] = self.shards.arrays[s][start : start + self.block_size + 1]
        return rows

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
        """Return the next ``(x, y)`` batch for this rank."""
        import torch

        if self.mode == "random":
            ids = self._rng.integers(0, int(self._cum_random[-1]), size=self.batch_size)
            rows = self._gather(self._cum_random, ids, stride=1)
        else:
            total = int(self._cum_seq[-1])
            glob = self._cursor + self.rank + self.world_size * np.arange(self.batch_size)
            self._cursor += self.batch_size * self.world_size
            if self._cursor >= total:
                self.epoch += self._cursor // total
                self._cursor %= total
            rows = self._gather(self._cum_seq, glob % total, stride=self.block_size)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:  # noqa: F821
        while True:
            yield self.next_batch()

    def iter_eval(
        self, max_tokens: int = 0
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:  # noqa: F821
        """One deterministic pass over this rank's part of the split for evaluation.

        The split (or its first ``max_tokens`` tokens when ``max_tokens > 0``) is cut into
        consecutive windows; every token except the very first of each shard is predicted
        exactly once (a final short window is padded with target ``-1``, which the loss
        ignores). Windows are dealt round-robin to the ranks. Does not touch the training
        cursor or RNG.
        """
        import torch

        T = self.block_size
        windows: List[Tuple[int, int, int]] = []  # (shard, start, length)
        budget = max_tokens if max_tokens > 0 else None
        for s, arr in enumerate(self.shards.arrays):
            n = len(arr)
            if budget is not None:
                n = min(n, budget)
                budget -= n
            start = 0
            while start < n - 1:
                length = min(T, n - 1 - start)
                windows.append((s, start, length))
                start += length
            if budget is not None and budget <= 0:
                break
        mine = windows[self.rank :: self.world_size]
        for i in range(0, len(mine), self.batch_size):
            chunk = mine[i : i + self.batch_size]
            x = torch.zeros((len(chunk), T), dtype=torch.int64)
            y = torch.full((len(chunk), T), -1, dtype=torch.int64)
            for r, (s, start, length) in enumerate(chunk):
                seg = torch.from_numpy(
                    self.shards.arrays[s][start : start + length + 1].astype(np.int64)
                )
                x[r, :length] = seg[:-1]
                y[r, :length] = seg[1:]
            yield x, y

    def eval_token_count(self, max_tokens: int = 0) -> int:
        """Number of predicted tokens in a full :meth:`iter_eval` pass over all ranks."""
        total = 0
        budget = max_tokens if max_tokens > 0 else None
        for arr in self.shards.arrays:
            n = len(arr)
            if budget is not None:
                n = min(n, budget)
                budget -= n
            total += max(n - 1, 0)
            if budget is not None and budget <= 0:
                break
        return total

    def state_dict(self) -> Dict[str, Any]:
        """Cursor, epoch and RNG state, enough to resume with identical batches."""
        return {
            "mode": self.mode,
            "cursor": self._cursor,
            "epoch": self.epoch,
            "rng": self._rng.bit_generator.state,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._cursor = int(state["cursor"])
        self.epoch = int(state.get("epoch", 0))
        self._rng.bit_generator.state = state["rng"]


def tokenize_corpus(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Corpus files → tokenizer + shards; see :func:`smallgpt.corpus.tokenize_corpus`."""
    from smallgpt.corpus import tokenize_corpus as run

    return run(*args, **kwargs)
