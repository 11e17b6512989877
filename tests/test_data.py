"""Shard format and the trainer's batch loader (smallgpt.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smallgpt.data import (
    HEADER_BYTES,
    MAGIC_U16,
    MAGIC_U32,
    ShardDataset,
    load_meta,
    read_shard,
    write_meta,
    write_shard,
)


def make_folder(root: Path, train: list, val: list, vocab: int = 1000) -> Path:
    """A shard folder with the given lists of per-shard token arrays."""
    splits = {}
    for split, shards in (("train", train), ("val", val)):
        names = []
        for i, toks in enumerate(shards):
            name = f"{split}_{i:06d}.bin"
            write_shard(root / name, toks)
            names.append(name)
        n = sum(len(t) for t in shards)
        splits[split] = {"documents": 1, "tokens": n, "bytes": 2 * n, "shards": names}
    write_meta(root, {"format": "smallgpt-shards", "version": 1, "tokenizer": "tokenizer.json",
                      "vocab_size": vocab, "eot_id": 0, "dtype": "uint16", "splits": splits})
    return root


def test_roundtrip_uint16(tmp_path: Path) -> None:
    toks = np.arange(0, 65536, 7)
    p = write_shard(tmp_path / "a.bin", toks)
    header = np.fromfile(p, dtype="<i4", count=256)
    assert header[0] == MAGIC_U16 and header[1] == 1 and header[2] == len(toks)
    assert p.stat().st_size == HEADER_BYTES + 2 * len(toks)
    back = read_shard(p)
    assert back.dtype == np.uint16
    assert isinstance(back, np.memmap)
    np.testing.assert_array_equal(back, toks)
    assert not (tmp_path / "a.bin.tmp").exists()


def test_roundtrip_uint32_auto_and_forced(tmp_path: Path) -> None:
    toks = np.array([0, 70000, 2**32 - 1, 5], dtype=np.int64)
    p = write_shard(tmp_path / "big.bin", toks)
    header = np.fromfile(p, dtype="<i4", count=256)
    assert header[0] == MAGIC_U32 and header[1] == 7 and header[2] == 4
    np.testing.assert_array_equal(read_shard(p), toks)
    q = write_shard(tmp_path / "forced.bin", [1, 2, 3], dtype="uint32")
    assert read_shard(q).dtype == np.uint32


def test_empty_shard(tmp_path: Path) -> None:
    p = write_shard(tmp_path / "e.bin", [])
    assert len(read_shard(p)) == 0


@pytest.mark.parametrize(
    "bad, dtype, match",
    [([-1, 2], None, "negative"), ([70000], "uint16", "does not fit"), ([1], "int8", "dtype"),
     ([1.5], None, "integers")],
)
def test_write_rejects(tmp_path: Path, bad: list, dtype: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_shard(tmp_path / "x.bin", np.array(bad), dtype=dtype)
    assert not (tmp_path / "x.bin").exists()


def _corrupt(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


def test_read_validates(tmp_path: Path) -> None:
    p = write_shard(tmp_path / "s.bin", np.arange(100))
    good = p.read_bytes()

    _corrupt(p, 0, 12345)
    with pytest.raises(ValueError, match=r"s\.bin.*magic"):
        read_shard(p)
    p.write_bytes(good)
    _corrupt(p, 4, 3)
    with pytest.raises(ValueError, match=r"s\.bin.*version"):
        read_shard(p)
    p.write_bytes(good[:-10])
    with pytest.raises(ValueError, match=r"s\.bin.*truncated"):
        read_shard(p)
    p.write_bytes(good + b"\0\0")
    with pytest.raises(ValueError, match=r"s\.bin.*trailing"):
        read_shard(p)
    p.write_bytes(good[:100])
    with pytest.raises(ValueError, match=r"s\.bin.*header"):
        read_shard(p)
    with pytest.raises(FileNotFoundError):
        read_shard(tmp_path / "missing.bin")


def test_meta_fallback_and_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_meta(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_meta(tmp_path)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(10))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    meta = load_meta(tmp_path)
    assert meta["splits"]["train"]["shards"] == ["fineweb_train_000001.bin"]
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        load_meta(tmp_path)


def test_random_batches_are_windows(tmp_path: Path) -> None:
    a, b = np.arange(0, 500), np.arange(1000, 1300)
    make_folder(tmp_path, [a, b], [np.arange(50)], vocab=2000)
    ds = ShardDataset(tmp_path, "train", block_size=16, batch_size=64, seed=3)
    x, y = ds.next_batch()
    assert x.shape == (64, 16) and y.shape == (64, 16) and x.dtype == torch.int64
    # consecutive tokens, y is x shifted, windows never straddle shards
    assert torch.all(x[:, 1:] - x[:, :-1] == 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(y[:, -1] == x[:, -1] + 1)
    starts = set(x[:, 0].tolist())
    assert any(s < 500 for s in starts) and any(s >= 1000 for s in starts)


def test_random_resume_exact(tmp_path: Path) -> None:
    make_folder(tmp_path, [np.arange(3000)], [np.arange(50)])
    ds = ShardDataset(tmp_path, "train", 8, 4, seed=1)
    for _ in range(3):
        ds.next_batch()
    state = json.loads(json.dumps(ds.state_dict()))  # must survive serialisation
    want = [ds.next_batch()[0] for _ in range(3)]
    ds2 = ShardDataset(tmp_path, "train", 8, 4, seed=1)
    ds2.load_state_dict(state)
    got = [ds2.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_sequential_pass_and_ranks(tmp_path: Path) -> None:
    # 2 shards with 10 and 5 full windows of 4 tokens (+1 target token each).
    make_folder(tmp_path, [np.arange(41), np.arange(1000, 1021)], [np.arange(9)])
    seen = []
    dss = [ShardDataset(tmp_path, "train", 4, 6, mode="sequential", rank=r, world_size=2)
           for r in range(2)]
    for _ in range(2):
        for ds in dss:
            x = ds.next_batch()[0]
            assert x.shape == (3, 4)  # half of the global batch of 6
            seen.extend(x[:, 0].tolist())
    assert len(seen) == 12 and len(set(seen)) == 12  # ranks read disjoint windows
    # after 15 windows the pass wraps into the next epoch
    ds = ShardDataset(tmp_path, "train", 4, 5, mode="sequential")
    firsts = [ds.next_batch()[0][:, 0].tolist() for _ in range(3)]
    assert sorted(sum(firsts, [])) == sorted(list(range(0, 40, 4)) + list(range(1000, 1020, 4)))
    assert ds.epoch == 1 and ds.next_batch()[0][0, 0] == 0
    st = ds.state_dict()
    ds3 = ShardDataset(tmp_path, "train", 4, 5, mode="sequential")
    ds3.load_state_dict(st)
    assert torch.equal(ds3.next_batch()[0], ds.next_batch()[0])


def test_iter_eval_covers_every_token_once(tmp_path: Path) -> None:
    make_folder(tmp_path, [np.arange(100)], [np.arange(23), np.arange(500, 510)])
    ds = ShardDataset(tmp_path, "val", block_size=8, batch_size=2, mode="sequential")
    targets = []
    for x, y, _ in ds.iter_eval():
        assert x.shape[1] == 8
        mask = y != -1
        assert torch.all(y[:, :-1][mask[:, 1:]] == x[:, 1:][mask[:, 1:]])
        targets.extend(y[mask].tolist())
    assert sorted(targets) == list(range(1, 23)) + list(range(501, 510))
    assert ds.eval_token_count() == len(targets)
    # two ranks split the windows, together they cover the same tokens
    both = []
    for r in range(2):
        dr = ShardDataset(tmp_path, "val", 8, 2, mode="sequential", rank=r, world_size=2)
        for _, y, _ in dr.iter_eval():
            both.extend(y[y != -1].tolist())
    assert sorted(both) == sorted(targets)
    # a prefix sample: whole windows, as many as it takes to reach 12 predicted tokens, so
    # the windows of a smaller budget are a prefix of a larger one's
    part = [t for _, y, _ in ds.iter_eval(max_tokens=12) for t in y[y != -1].tolist()]
    assert part == list(range(1, 17)) and ds.eval_token_count(12) == 16
    assert ds.eval_windows(12) == ds.eval_windows(0)[:2]
    # equal_batches: both ranks yield as many batches, padding rows have index -1
    counts = []
    for r in range(2):
        dr = ShardDataset(tmp_path, "val", 8, 2, mode="sequential", rank=r, world_size=2)
        batches = list(dr.iter_eval(batch_size=3, equal_batches=True))
        counts.append(len(batches))
        for _, y, idx in batches:
            assert torch.all(y[idx < 0] == -1)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_global_batch_is_the_same_for_any_world_size(tmp_path: Path, mode: str) -> None:
    # One process with 4 micro-steps of 2 and 2 processes with 2 micro-steps of 2 read the
    # same 8 windows in every optimizer step.
    make_folder(tmp_path, [np.arange(3000)], [np.arange(50)])
    one = ShardDataset(tmp_path, "train", 8, 8, mode=mode, seed=5, micro_batch_size=2)
    two = [ShardDataset(tmp_path, "train", 8, 8, mode=mode, seed=5, rank=r, world_size=2,
                        micro_batch_size=2) for r in range(2)]
    assert one.accum_steps == 4 and two[0].accum_steps == 2
    for _ in range(3):
        rows_one = sorted(x[i, 0].item() for x, _ in one.step_batches() for i in range(2))
        rows_two = sorted(x[i, 0].item() for ds in two for x, _ in ds.step_batches()
                          for i in range(2))
        assert rows_one == rows_two


def test_accumulation_must_divide(tmp_path: Path) -> None:
    make_folder(tmp_path, [np.arange(3000)], [np.arange(50)])
    with pytest.raises(ValueError, match="not divisible by data.micro_batch_size"):
        ShardDataset(tmp_path, "train", 8, 8, micro_batch_size=3)
    with pytest.raises(ValueError, match="2 processes"):
        ShardDataset(tmp_path, "train", 8, 5, world_size=2)


def test_dataset_errors(tmp_path: Path) -> None:
    make_folder(tmp_path, [np.arange(10)], [np.arange(10)])
    with pytest.raises(ValueError, match="too small"):
        ShardDataset(tmp_path, "train", block_size=64, batch_size=2)
    with pytest.raises(ValueError, match="mode"):
        ShardDataset(tmp_path, "train", 4, 2, mode="shuffle")
    with pytest.raises(FileNotFoundError, match="test"):
        ShardDataset(tmp_path, "test", 4, 2)
    (tmp_path / "val_000000.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match="val_000000.bin"):
        ShardDataset(tmp_path, "val", 4, 2)
