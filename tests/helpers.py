"""Helpers shared by the training tests: a learnable synthetic shard folder and tiny configs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from smallgpt.config import TrainConfig, merge_dict
from smallgpt.data import write_meta, write_shard

VOCAB = 48


def device_under_test() -> str:
    """The device of the tests marked ``device`` (generation, sampling, evaluation,
    fine-tuning): ``$SMALLGPT_TEST_DEVICE``, default ``cpu``. ``benches/gpu_check.sh`` runs
    them with ``cuda``; conftest stops the session when that device is missing."""
    return os.environ.get("SMALLGPT_TEST_DEVICE", "cpu").strip() or "cpu"


def on_cuda() -> bool:
    """True when the device-aware tests run on a GPU (their tolerances are looser there:
    other kernels sum in another order)."""
    return device_under_test().startswith("cuda")


def synthetic_tokens(n: int, seed: int) -> np.ndarray:
    """A learnable stream: a sparse random Markov chain over VOCAB-1 symbols, eot = VOCAB-1."""
    rng = np.random.default_rng(seed)
    nxt = np.random.default_rng(0).integers(0, VOCAB - 1, size=(VOCAB - 1, 2))
    out = np.empty(n, dtype=np.int64)
    out[0] = VOCAB - 1
    cur = 0
    for i in range(1, n):
        cur = nxt[cur, rng.integers(0, 2)]
        out[i] = cur
    return out


def make_synthetic_shards(root: Path) -> Path:
    """A shard folder of :func:`synthetic_tokens` (train 6000, val 700 tokens, 3 bytes each)."""
    splits = {}
    for split, n, seed in (("train", 6000, 1), ("val", 700, 2)):
        toks = synthetic_tokens(n, seed)
        write_shard(root / f"{split}_000000.bin", toks)
        splits[split] = {"documents": 1, "tokens": n, "bytes": 3 * (n - 1),
                         "shards": [f"{split}_000000.bin"]}
    write_meta(root, {"format": "smallgpt-shards", "version": 1, "tokenizer": "tokenizer.json",
                      "vocab_size": VOCAB, "eot_id": VOCAB - 1, "dtype": "uint16",
                      "splits": splits})
    (root / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return root


def tiny_cfg(out: Path, data: Path, **extra: Any) -> TrainConfig:
    cfg = TrainConfig()
    merge_dict(cfg, {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
        "data": {"path": str(data), "batch_size": 4, "vocab_multiple": 16},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        "out": str(out), "max_steps": 6, "eval_interval": 3, "log_interval": 1,
        "save_interval": 3, "keep_last": 2, "progress": False, "plot": False, "device": "cpu",
        "threads": 1,  # results may depend on the thread count; keep it fixed across runs
        # Tests about numbers pin the dtype: "auto" picks bf16 on CPUs with AVX512-BF16/AMX.
        "dtype": "float32",
    })
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            setattr(getattr(cfg, section), name, value)
        else:
            setattr(cfg, key, value)
    return cfg


def read_metrics(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Evil:
    """Pickles to a call of os.system: loading it with weights_only=False would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))
