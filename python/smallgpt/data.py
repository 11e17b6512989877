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

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from smallgpt._io import atomic_write_bytes

if TYPE_CHECKING:
    import torch

__all__ = [
    "HEADER_INTS",
    "HEADER_BYTES",
    "MAGIC_U16",
    "MAGIC_U32",
    "write_shard",
    "read_shard",
    "write_meta",
    "load_meta",
    "data_identity",
    "identity_differences",
    "split_files",
    "ShardDataset",
    "accumulation_steps",
    "default_cache_dir",
    "prepare_shakespeare",
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
    atomic_write_bytes(path, [header.tobytes(), memoryview(body).cast("B")])
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
    atomic_write_bytes(path, [(json.dumps(meta, indent=2) + "\n").encode("utf-8")])
    return path


def load_meta(data_dir: PathLike) -> Dict[str, Any]:
    """Read ``meta.json`` of a shard folder.

    A folder without ``meta.json`` (e.g. plain llm.c FineWeb shards) is accepted: the meta is
    reconstructed from the ``*_NNNNNN.bin`` file names, with unknown ``bytes``/``vocab_size``.
    ``smallgpt-tokenize`` writes ``meta.json`` first with ``"complete": false`` and last in
    full, so a folder it did not finish is told apart from such a folder, and refused.

    Raises:
        FileNotFoundError: if the folder does not exist or holds no shards.
        ValueError: if ``meta.json`` is not valid JSON, lacks ``splits``, or marks a folder
            that ``smallgpt-tokenize`` did not finish.
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
        if isinstance(meta, dict) and meta.get("complete") is False:
            raise ValueError(
                f"{data_dir} was left unfinished by an interrupted smallgpt-tokenize (its "
                "meta.json says the folder is still being written); run smallgpt-tokenize "
                "again with --overwrite")
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


def data_identity(data_dir: PathLike, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What identifies a shard folder's contents, cheaply: the tokenizer file's SHA-256, and
    each shard's size and a SHA-256 of its header and of its first and last 64 KiB.

    A checkpoint records it, so that a resume can tell whether the folder was re-tokenized
    (another tokenizer with the same vocabulary size, other text) since the run started.
    Reads at most 128 KiB per shard, whatever its size.
    """
    data_dir = Path(data_dir)
    meta = meta if meta is not None else load_meta(data_dir)
    ident: Dict[str, Any] = {"tokenizer": None, "shards": {}}
    tok = data_dir / str(meta.get("tokenizer", "tokenizer.json"))
    if tok.is_file():
        ident["tokenizer"] = hashlib.sha256(tok.read_bytes()).hexdigest()
    for split in ("train", "val"):
        info = meta["splits"].get(split) or {}
        for name in info.get("shards", []):
            path = data_dir / name
            h = hashlib.sha256()
            size = path.stat().st_size
            with open(path, "rb") as f:
                h.update(f.read(1 << 16))
                if size > 1 << 17:
                    f.seek(size - (1 << 16))
                    h.update(f.read(1 << 16))
            ident["shards"][name] = [size, h.hexdigest()]
    return ident


def identity_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two :func:`data_identity` results, in words (empty: the same)."""
    out = []
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append("the tokenizer differs")
    a, b = old.get("shards", {}), new.get("shards", {})
    changed = sorted(n for n in set(a) & set(b) if list(a[n]) != list(b[n]))
    gone, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    for what, names in (("changed", changed), ("missing", gone), ("new", added)):
        if names:
            out.append(f"{what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return out


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


Window = Tuple[int, int, int]  # (shard, start, number of predicted tokens)


class ShardDataset:
    """Batches of ``(x, y)`` windows from a split of a shard folder, global batch first.

    ``batch_size`` is the **global** batch: the sequences of one optimizer step over all
    ``world_size`` ranks and all micro-steps. Each rank reads ``micro_batch_size`` sequences
    per forward/backward pass and ``accum_steps = batch_size / (micro_batch_size *
    world_size)`` passes per step. The global batch of a step is chosen the same way whatever
    the world size, and its rows are dealt to ranks and micro-steps in a fixed order, so one
    process with accumulation and eight processes without it see the same sequences in every
    optimizer step (and a run can resume on another number of processes without changing its
    data order).

    Two modes:

    * ``"random"``: every row is a window starting at a uniformly random position of the split
      (shards weighted by the number of windows they hold), drawn from one RNG seeded with
      ``seed``.
    * ``"sequential"``: one pass after another over the split in order, with non-overlapping
      windows of ``block_size`` tokens.

    ``y`` is ``x`` shifted by one token; batches are ``torch.int64`` tensors. :meth:`state_dict`
    / :meth:`load_state_dict` capture the cursor and RNG state between optimizer steps.
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
        micro_batch_size: int = 0,
    ) -> None:
        if mode not in ("random", "sequential"):
            raise ValueError(f"unknown sampling mode {mode!r} (use 'random' or 'sequential')")
        if block_size < 1 or batch_size < 1 or micro_batch_size < 0:
            raise ValueError("block_size and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.accum_steps = accumulation_steps(batch_size, micro_batch_size, world_size)
        self.micro_batch_size = batch_size // (self.accum_steps * world_size)
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
        windows = np.maximum(sizes - block_size, 0) if mode == "random" else \
            np.maximum((sizes - 1) // block_size, 0)
        if windows.sum() == 0:
            raise ValueError(
                f"{split} split of {self.data_dir} is too small ({int(sizes.sum())} tokens) "
                f"for block_size {block_size}"
            )
        self._cum = np.cumsum(windows)
        self._rng = np.random.default_rng(seed)
        self._cursor = 0  # global window index of the next sequential batch
        self.epoch = 0
        self._eval_counts: Dict[int, int] = {}  # max_tokens -> eval_token_count

    @property
    def num_tokens(self) -> int:
        """Total tokens in the split."""
        return int(self.shards.sizes.sum())

    def max_token(self, chunk: int = 1 << 24) -> int:
        """Largest token id in the split (reads every shard once, ``chunk`` tokens at a time)."""
        best = 0
        for a in self.shards.arrays:
            for i in range(0, len(a), chunk):
                best = max(best, int(a[i : i + chunk].max()))
        return best

    def _gather(self, window_ids: np.ndarray) -> np.ndarray:
        """Rows of ``block_size + 1`` tokens for global window ids."""
        stride = 1 if self.mode == "random" else self.block_size
        rows = np.empty((len(window_ids), self.block_size + 1), dtype=np.int64)
        shard_idx = np.searchsorted(self._cum, window_ids, side="right")
        for i, (w, s) in enumerate(zip(window_ids, shard_idx)):
            local = int(w) - (int(self._cum[s - 1]) if s > 0 else 0)
            start = local * stride
            rows[i] = self.shards.arrays[s][start : start + self.block_size + 1]
        return rows

    def _next_global_ids(self) -> np.ndarray:
        total = int(self._cum[-1])
        if self.mode == "random":
            return self._rng.integers(0, total, size=self.batch_size)
        ids = (self._cursor + np.arange(self.batch_size)) % total
        self._cursor += self.batch_size
        if self._cursor >= total:
            self.epoch += self._cursor // total
            self._cursor %= total
        return ids

    def step_batches(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:  # noqa: F821
        """This rank's ``accum_steps`` micro-batches of the next optimizer step.

        Rank ``r`` reads rows ``[r * n, (r + 1) * n)`` of the global batch (``n = batch_size /
        world_size``), in micro-batches of ``micro_batch_size`` rows.
        """
        import torch

        ids = self._next_global_ids()
        n = self.batch_size // self.world_size
        mine = self._gather(ids[self.rank * n : (self.rank + 1) * n])
        t = torch.from_numpy(mine)
        m = self.micro_batch_size
        return [(t[i : i + m, :-1], t[i : i + m, 1:]) for i in range(0, n, m)]

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: F821
        """This rank's whole share of the next global batch as one ``(x, y)`` pair."""
        import torch

        parts = self.step_batches()
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def eval_windows(self, max_tokens: int = 0) -> List[Window]:
        """Consecutive windows over the whole split (all ranks), cut where needed.

        Every token except the very first of each shard is predicted exactly once. With
        ``max_tokens > 0`` only the first windows are kept, as many as it takes to predict
        ``max_tokens`` tokens: so the windows of a smaller budget are always a prefix of those
        of a larger one, and a whole-split pass also yields the smaller sample's figures.
        """
        T = self.block_size
        windows: List[Window] = []
        predicted = 0
        for s, arr in enumerate(self.shards.arrays):
            start = 0
            while start < len(arr) - 1:
                if 0 < max_tokens <= predicted:
                    return windows
                length = min(T, len(arr) - 1 - start)
                windows.append((s, start, length))
                predicted += length
                start += length
        return windows

    def iter_eval(
        self, max_tokens: int = 0, batch_size: int = 0, equal_batches: bool = False
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # noqa: F821
        """One deterministic pass over this rank's windows of :meth:`eval_windows`.

        Yields ``(x, y, index)``: ``index`` holds each row's position in the global window
        list (so a caller can also sum over a prefix). Windows are dealt round-robin to the
        ranks; a short final window is padded with target ``-1``, which the loss ignores.
        With ``equal_batches`` every rank yields the same number of batches (a rank with fewer
        windows gets a last batch of padding rows, index ``-1``): FSDP needs every rank to run
        the same forward passes. Does not touch the training cursor or RNG.
        """
        import torch

        T = self.block_size
        bs = batch_size or self.micro_batch_size
        windows = self.eval_windows(max_tokens)
        mine = list(range(self.rank, len(windows), self.world_size))
        most = math.ceil(len(windows) / self.world_size) if equal_batches else len(mine)
        n_batches = math.ceil(most / bs)
        for b in range(n_batches):
            chunk = mine[b * bs : (b + 1) * bs] or [-1]
            x = torch.zeros((len(chunk), T), dtype=torch.int64)
            y = torch.full((len(chunk), T), -1, dtype=torch.int64)
            for r, w in enumerate(chunk):
                if w < 0:
                    continue
                s, start, length = windows[w]
                seg = torch.from_numpy(
                    self.shards.arrays[s][start : start + length + 1].astype(np.int64)
                )
                x[r, :length] = seg[:-1]
                y[r, :length] = seg[1:]
            yield x, y, torch.tensor(chunk, dtype=torch.int64)

    def eval_token_count(self, max_tokens: int = 0) -> int:
        """Number of predicted tokens in a full :meth:`iter_eval` pass over all ranks."""
        # The trainer asks at every step until an evaluation is timed: count each budget once.
        if max_tokens not in self._eval_counts:
            self._eval_counts[max_tokens] = sum(n for _, _, n in self.eval_windows(max_tokens))
        return self._eval_counts[max_tokens]

    def state_dict(self) -> Dict[str, Any]:
        """Cursor, epoch and RNG state (between optimizer steps), enough to resume exactly."""
        return {
            "mode": self.mode,
            "cursor": self._cursor,
            "epoch": self.epoch,
            "rng": self._rng.bit_generator.state,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._cursor = int(state["cursor"])
        self.epoch = int(state.get("epoch", 0))
        self._rng.bit_generator.state = state["rng"]


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-steps per optimizer step: ``batch_size / (micro_batch_size * world_size)``.

    ``micro_batch_size = 0`` means one micro-step (``batch_size / world_size`` rows per rank).

    Raises:
        ValueError: when the global batch does not divide into equal micro-batches.
    """
    if micro_batch_size == 0:
        if batch_size % world_size:
            raise ValueError(f"data.batch_size ({batch_size}) is not divisible by the "
                             f"{world_size} processes; set it to a multiple of {world_size}")
        return 1
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ValueError(
            f"data.batch_size ({batch_size}) is not divisible by data.micro_batch_size "
            f"({micro_batch_size}) x {world_size} process(es) = {per_step}"
        )
    return batch_size // per_step


# ---------------------------------------------------------------- the bundled quickstart data


def default_cache_dir() -> Path:
    """``$SMALLGPT_CACHE`` or ``$XDG_CACHE_HOME/smallgpt`` or ``~/.cache/smallgpt``."""
    if os.environ.get("SMALLGPT_CACHE"):
        return Path(os.environ["SMALLGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smallgpt"


def prepare_shakespeare(cache_dir: PathLike, vocab_size: int = 512) -> Path:
    """Tokenize the bundled Tiny Shakespeare into a shard folder (once) and return it.

    The first 90% of the characters are the training split and the last 10% the validation
    split, as in nanoGPT. A byte-level BPE tokenizer of ``vocab_size`` tokens (GPT-4 split
    pattern, one ``<|endoftext|>`` special token) is trained on the training split. The
    folder name includes the vocabulary size and a hash of the text, so the cache is reused
    until either changes; a folder left without ``meta.json`` (an interrupted first run) is
    rebuilt.
    """
    from smallgpt.corpus import tokenize_corpus
    from smallgpt.tokenizer import Tokenizer

    text_path = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt"
    text = text_path.read_text(encoding="utf-8")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    out = Path(cache_dir).expanduser() / f"tinyshakespeare-bpe{vocab_size}-{digest}"
    if (out / "meta.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # The tokenizer sees only the training split; the shards come from the same Rust
        # pipeline as `smallgpt-tokenize` (which splits a single document nanoGPT's way).
        tok = Tokenizer.train([text[: int(len(text) * 0.9)]], vocab_size=vocab_size,
                              pattern="gpt4", special_tokens=("<|endoftext|>",))
        tokenize_corpus([text_path], tmp, tokenizer=tok, val_fraction=0.1, overwrite=True)
        if out.exists() and not (out / "meta.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # our own cache, left half-made
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def tokenize_corpus(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Corpus files → tokenizer + shards; see :func:`smallgpt.corpus.tokenize_corpus`."""
    from smallgpt.corpus import tokenize_corpus as run

    return run(*args, **kwargs)
