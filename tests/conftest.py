"""Shared fixtures: the committed GPT-2 files and text slices, and the optional ../shared data."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    return FIXTURES / "gpt2" / "encoder.json", FIXTURES / "gpt2" / "vocab.bpe"


@pytest.fixture(scope="session")
def sample_texts() -> dict[str, str]:
    """English and multilingual slices committed under tests/fixtures."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*.txt"))}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable synthetic shard folder (see helpers.synthetic_tokens)."""
    from helpers import make_synthetic_shards

    return make_synthetic_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "tiktoken" / "cl100k_base.tiktoken").exists():
        pytest.skip(f"needs the shared data folder ({SHARED}) with the tiktoken rank files")
    return SHARED


def make_hf_gpt2(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 (n_embd 32, context 64) with GPT-2's vocabulary, saved by
    ``transformers`` with the tokenizer files the hub's gpt2 folder has (``vocab.json`` +
    ``merges.txt``: the committed ``encoder.json`` + ``vocab.bpe`` under those names)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=2)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    shutil.copy(FIXTURES / "gpt2" / "encoder.json", folder / "vocab.json")
    shutil.copy(FIXTURES / "gpt2" / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """See :func:`make_hf_gpt2` (made once per test session)."""
    return make_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"))


def pytest_configure(config: pytest.Config) -> None:
    """A device asked for with $SMALLGPT_TEST_DEVICE must exist: a GPU check on a machine
    whose CUDA is broken must fail, not fall back to the CPU or skip."""
    from helpers import device_under_test

    name = device_under_test()
    if name == "cpu":
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise pytest.UsageError(f"SMALLGPT_TEST_DEVICE={name!r} is not a device") from None
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise pytest.UsageError(f"SMALLGPT_TEST_DEVICE={name!r}, but this machine has no "
                                "such device (CUDA available: "
                                f"{torch.cuda.is_available()})")


@pytest.fixture(autouse=True)
def _keep_tf32_flags() -> Iterator[None]:
    """The trainer turns TF32 matmuls on for CUDA runs (a process-wide flag): put them back
    after each test, so that a later test's fp32 comparison is not made in TF32."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
