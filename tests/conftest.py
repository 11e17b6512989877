"""Shared fixtures: the committed GPT-2 files and text slices, and the optional ../shared data."""

from __future__ import annotations

from pathlib import Path

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
