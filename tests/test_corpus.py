"""smallgpt-tokenize / tokenize_corpus: round trips, determinism, shard format, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smallgpt import Tokenizer
from smallgpt.corpus import CorpusError, tokenize_corpus
from smallgpt.data import read_shard

EOT = "<|endoftext|>"
CLI = [sys.executable, "-m", "smallgpt.cli.tokenize"]


def decode_split(out: Path, split: str) -> list[str]:
    """Documents of a split, decoded from its shards in order."""
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.load(out / meta["tokenizer"])
    ids = np.concatenate([read_shard(out / s) for s in meta["splits"][split]["shards"]])
    text = tok.decode(ids.tolist()) if len(ids) else ""
    assert text.startswith(EOT) or not text
    return text.split(EOT)[1:]


@pytest.fixture(scope="module")
def small_tok(sample_texts) -> Tokenizer:
    return Tokenizer.train(list(sample_texts.values()), vocab_size=700)


def test_txt_files_round_trip(tmp_path, small_tok, sample_texts):
    docs = list(sample_texts.values())
    for i, d in enumerate(docs):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "in" / "empty.txt").write_text("")
    meta = tokenize_corpus([tmp_path / "in"], tmp_path / "out", tokenizer=small_tok,
                           val_fraction=0.3, shard_tokens=5000)
    assert meta["splits"]["train"]["documents"] == 4 and meta["splits"]["val"]["documents"] == 2
    assert len(meta["splits"]["train"]["shards"]) > 1
    got = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    assert got == docs  # byte-exact, order kept, empty file dropped
    total_bytes = sum(s["bytes"] for s in meta["splits"].values())
    assert total_bytes == sum(len(d.encode()) for d in docs)
    assert meta["dtype"] == "uint16" and meta["eot_id"] == small_tok.eot_id


def test_separator_and_jsonl(tmp_path, small_tok):
    docs = ["first doc\n", "  second, with spaces  ", "\u0645\u0631\u062d\u0628\u0627 😀", "x"]
    (tmp_path / "a.txt").write_text("\n<SEP>\n".join(docs[:2] + [""] + docs[2:]))
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"content": d, "id": 1}) + "\n")
        f.write(json.dumps({"content": ""}) + "\n\n")
    out = tmp_path / "out"
    meta = tokenize_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"], out, tokenizer=small_tok,
                           doc_separator="\n<SEP>\n", text_field="content", val_fraction=0.25)
    assert decode_split(out, "train") + decode_split(out, "val") == docs + docs
    assert meta["splits"]["val"]["documents"] == 2


def test_parquet_round_trip(tmp_path, small_tok):
    import pyarrow as pa  # in the [test] extra; without it, see the next test
    import pyarrow.parquet as pq

    docs = ["one\n", "  two  ", "\u65e5\u672c\u8a9e \U0001f600", "four", "five \r\n x"]
    table = pa.table({"id": list(range(7)), "body": docs[:2] + [None, ""] + docs[2:]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)  # several row groups
    out = tmp_path / "out"
    meta = tokenize_corpus([tmp_path / "d.parquet", tmp_path / "d.parquet"], out,
                           tokenizer=small_tok, text_field="body", val_fraction=0.2)
    assert decode_split(out, "train") + decode_split(out, "val") == docs + docs
    assert meta["inputs"] == [str(tmp_path / "d.parquet")] * 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "tokenizer.json", *meta["splits"]["train"]["shards"],
         *meta["splits"]["val"]["shards"]]
    ), "the temporary JSON lines must be gone"
    for field, expect in [("nope", "no column 'nope'"), ("id", "not strings")]:
        with pytest.raises(CorpusError, match=expect):
            tokenize_corpus([tmp_path / "d.parquet"], tmp_path / "o2", tokenizer=small_tok,
                            text_field=field)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="not a readable parquet file"):
        tokenize_corpus([tmp_path / "bad.parquet"], tmp_path / "o3", tokenizer=small_tok)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, small_tok, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CorpusError, match=r"needs pyarrow \(pip install 'smallgpt\[parquet\]'\)"):
        tokenize_corpus([tmp_path / "d.parquet"], tmp_path / "o", tokenizer=small_tok)


def test_single_document_gets_nanogpt_split(tmp_path, small_tok, sample_texts):
    text = sample_texts["english"]
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    tokenize_corpus([tmp_path / "one.txt"], tmp_path / "out", tokenizer=small_tok,
                    val_fraction=0.1)
    n = int(len(text) * 0.9)
    assert decode_split(tmp_path / "out", "train") == [text[:n]]
    assert decode_split(tmp_path / "out", "val") == [text[n:]]


def test_output_independent_of_workers(tmp_path, small_tok, sample_texts):
    big = "\n".join(sample_texts.values()) * 12  # > 1 MB: cut into segments
    (tmp_path / "big.txt").write_text(big, encoding="utf-8")
    (tmp_path / "small.txt").write_text("tiny", encoding="utf-8")
    outs = []
    for w in (1, 2):
        out = tmp_path / f"out{w}"
        tokenize_corpus([tmp_path / "big.txt", tmp_path / "small.txt"], out, tokenizer=small_tok,
                        workers=w, shard_tokens=300_000, val_fraction=0.5)
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))})
    assert outs[0] == outs[1] and len(outs[0]) >= 3
    ids = np.concatenate([read_shard(tmp_path / "out1" / n) for n in sorted(outs[0])
                          if n.startswith("train")])
    assert ids[1:].tolist() == small_tok.encode_ordinary(big)


def test_trains_tokenizer_and_gpt2(tmp_path, sample_texts, gpt2_files):
    (tmp_path / "t.txt").write_text(sample_texts["english"], encoding="utf-8")
    meta = tokenize_corpus([tmp_path / "t.txt"], tmp_path / "a", vocab_size=500,
                           pattern="gpt2")
    tok = Tokenizer.load(tmp_path / "a" / "tokenizer.json")
    assert meta["vocab_size"] == tok.vocab_size == 500
    assert tok.merges == Tokenizer.train([sample_texts["english"]], vocab_size=500,
                                         pattern="gpt2").merges
    meta = tokenize_corpus([tmp_path / "t.txt"], tmp_path / "b", gpt2_dir=gpt2_files[0].parent)
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
    big = Tokenizer.from_tiktoken(_fake_big_vocab(tmp_path), pattern="gpt2",
                                  special_tokens={EOT: 70000})
    meta = tokenize_corpus([tmp_path / "t.txt"], tmp_path / "c", tokenizer=big)
    assert meta["dtype"] == "uint32"
    assert read_shard(tmp_path / "c" / "train_000000.bin").dtype == np.uint32
    with pytest.raises(CorpusError, match="does not fit"):
        tokenize_corpus([tmp_path / "t.txt"], tmp_path / "d", tokenizer=big, dtype="uint16")


def _fake_big_vocab(tmp_path: Path) -> Path:
    import base64

    p = tmp_path / "big.tiktoken"
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_corrupt_shard_is_reported(tmp_path, small_tok):
    (tmp_path / "t.txt").write_text("hello world " * 100)
    tokenize_corpus([tmp_path / "t.txt"], tmp_path / "o", tokenizer=small_tok, val_fraction=0)
    shard = tmp_path / "o" / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="train_000000.bin"):
        read_shard(shard)
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        read_shard(shard)


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kw)


def test_cli_happy_path(tmp_path, sample_texts):
    (tmp_path / "d").mkdir()
    for name, text in sample_texts.items():
        (tmp_path / "d" / f"{name}.txt").write_text(text, encoding="utf-8")
    r = run_cli(str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--vocab-size", "400",
                "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    assert "train: 4 documents" in r.stderr and "val: 2 documents" in r.stderr
    assert (tmp_path / "o" / "meta.json").exists()


@pytest.mark.parametrize(
    "case",
    ["missing", "utf8", "empty", "exists", "badtok", "unknownfmt"],
)
def test_cli_bad_input(tmp_path, case, small_tok):
    good = tmp_path / "good.txt"
    good.write_text("some text here")
    out = tmp_path / "out"
    args = [str(good), "--out", str(out), "--vocab-size", "300"]
    expect = ""
    if case == "missing":
        args[0] = str(tmp_path / "nope.txt")
        expect = "nope.txt"
    elif case == "utf8":
        (tmp_path / "bad.txt").write_bytes(b"ok ok \xc3\x28 more")
        args[0] = str(tmp_path / "bad.txt")
        expect = "bad.txt: invalid UTF-8 at byte offset 6"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args[0] = str(tmp_path / "empty.txt")
        expect = "no (non-empty) document"
    elif case == "exists":
        assert run_cli(*args).returncode == 0
        expect = "--overwrite"
    elif case == "badtok":
        args[3:] = ["--tokenizer", str(tmp_path / "missing.json")]
        expect = "missing.json"
    elif case == "unknownfmt":
        (tmp_path / "weird.json").write_text('{"hello": 1}')
        args[3:] = ["--tokenizer", str(tmp_path / "weird.json")]
        expect = "unknown tokenizer format"
    r = run_cli(*args)
    assert r.returncode == 2, r
    assert r.stderr.startswith("smallgpt-tokenize: error:") and expect in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    if case != "exists":
        assert not list(out.glob("*.bin")) if out.exists() else True
    if case == "utf8":
        r = run_cli(*args, "--errors", "replace")
        assert r.returncode == 0, r.stderr


def test_overwrite_replaces(tmp_path):
    (tmp_path / "t.txt").write_text("abc " * 1000)
    args = [str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--vocab-size", "300",
            "--quiet"]
    assert run_cli(*args).returncode == 0
    assert run_cli(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_leaves_no_complete_shard(tmp_path, sig):
    # Varied numbers keep the encoder off its cache, so the run lasts long enough to be
    # interrupted while shards are still being written.
    text = "".join(f"The quick brown fox {i} jumps over {i * 7919 % 100003} lazy dogs.\n"
                   for i in range(1_500_000))  # ~80 MB
    (tmp_path / "big.txt").write_text(text)
    gpt2 = Path(__file__).parent / "fixtures" / "gpt2"
    out = tmp_path / "out"
    p = subprocess.Popen([*CLI, str(tmp_path / "big.txt"), "--out", str(out), "--gpt2",
                          str(gpt2), "--shard-tokens", "100000", "--workers", "1"],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.tmp")):
        time.sleep(0.05)
    assert list(out.glob("*.tmp")), "no shard in progress seen"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert not list(out.glob("*.bin")) and not (out / "meta.json").exists()
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert not list(out.glob("*.tmp"))
