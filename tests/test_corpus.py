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
from smallgpt.corpus import MIN_SHARD_TOKENS, CorpusError, tokenize_corpus
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
                           val_fraction=0.3, shard_tokens=MIN_SHARD_TOKENS)
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


def test_jsonl_nulls_are_dropped_and_lone_surrogates_follow_errors(tmp_path, small_tok):
    lines = ['{"text": "first"}', '{"text": null}', '{"text": "a\\ud800b \\ud83d\\ude00"}',
             '{"text": "a \\\\ud800 literal"}', '{"text": "last"}']
    (tmp_path / "d.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:3: .*lone surrogate.*errors=\"replace\""):
        tokenize_corpus([tmp_path / "d.jsonl"], tmp_path / "o1", tokenizer=small_tok)
    out = tmp_path / "o2"
    meta = tokenize_corpus([tmp_path / "d.jsonl"], out, tokenizer=small_tok, val_fraction=0,
                           errors="replace")
    assert decode_split(out, "train") == ["first", "a\ufffdb \U0001f600", "a \\ud800 literal",
                                          "last"]
    assert meta["splits"]["train"]["documents"] == 4
    (tmp_path / "d.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field \"text\" is not a string"):
        tokenize_corpus([tmp_path / "d.jsonl"], tmp_path / "o3", tokenizer=small_tok)


def test_every_documented_suffix_is_read_from_directories(tmp_path, small_tok):
    (tmp_path / "in").mkdir()
    for i, suffix in enumerate([".txt", ".text", ".md", ".jsonl", ".ndjson", ".csv"]):
        text = f"document {i}"
        if suffix in (".jsonl", ".ndjson"):
            text = json.dumps({"text": text})
        (tmp_path / "in" / f"{i}{suffix}").write_text(text)
    meta = tokenize_corpus([tmp_path / "in"], tmp_path / "out", tokenizer=small_tok,
                           val_fraction=0)
    assert decode_split(tmp_path / "out", "train") == [f"document {i}" for i in range(5)]
    assert [Path(p).suffix for p in meta["inputs"]] == [".txt", ".text", ".md", ".jsonl",
                                                         ".ndjson"]


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
    # Dictionary-encoded strings (pandas categoricals) are strings too.
    pq.write_table(pa.table({"body": pa.array(docs + [None]).dictionary_encode()}),
                   tmp_path / "cat.parquet")
    tokenize_corpus([tmp_path / "cat.parquet"], tmp_path / "o4", tokenizer=small_tok,
                    text_field="body", val_fraction=0)
    assert decode_split(tmp_path / "o4", "train") == docs
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


# Arguments replacing `--vocab-size 300`, and what the one-line error must say.
BAD_FLAGS = {
    "vocab_huge": (["--vocab-size", "1099511627776"], "at most 2,147,483,647"),
    "vocab_small": (["--vocab-size", "5"], ">= 256 + 1 special tokens"),
    "vocab_dtype": (["--vocab-size", "70000", "--dtype", "uint16"], "does not fit in uint16"),
    "no_eot": (["--vocab-size", "300", "--special-tokens"], "must include <|endoftext|>"),
    "dup_special": (["--vocab-size", "300", "--special-tokens", "<|endoftext|>",
                     "<|endoftext|>"], "distinct"),
    "max_len_low": (["--vocab-size", "300", "--max-token-length", "1"], "from 2 to 65,535"),
    "max_len_high": (["--vocab-size", "300", "--max-token-length", "65536"], "from 2 to 65,535"),
    "max_len_gpt2": (["--gpt2", "GPT2", "--max-token-length", "9"], "only when training"),
    "pattern_gpt2": (["--gpt2", "GPT2", "--pattern", "gpt2"], "only to training and .tiktoken"),
    "bad_pattern": (["--vocab-size", "300", "--pattern", "(unclosed"], "invalid pre-tokeniz"),
    "shard_1": (["--vocab-size", "300", "--shard-tokens", "1"], "from 65,536 to"),
    "shard_huge": (["--vocab-size", "300", "--shard-tokens", "3000000000"], "to 2,147,483,647"),
    "workers_0": (["--vocab-size", "300", "--workers", "0"], "from 1 to 1,024"),
    "workers_huge": (["--vocab-size", "300", "--workers", "100000"], "from 1 to 1,024"),
    "val_nan": (["--vocab-size", "300", "--val-fraction", "nan"], "below 1, got nan"),
    "val_big": (["--vocab-size", "300", "--val-fraction", "1.5"], "below 1, got 1.5"),
    "val_neg": (["--vocab-size", "300", "--val-fraction", "-0.1"], "at least 0"),
    "val_text": (["--vocab-size", "300", "--val-fraction", "half"], "not a number"),
    "empty_sep": (["--vocab-size", "300", "--doc-separator", ""], "--doc-separator is empty"),
    "tok_dir": (["--tokenizer", "TMP"], "is a directory"),
    "tok_binary": (["--tokenizer", "TMP/bin.json"], "unknown tokenizer format"),
    "tok_json_pattern": (["--tokenizer", "TMP/tok.json", "--pattern", "gpt2"],
                         "records its own pattern"),
    "tiktoken_no_pattern": (["--tokenizer", "TMP/mine.tiktoken"], "--pattern"),
    "tiktoken_bad_line": (["--tokenizer", "TMP/bad.tiktoken", "--pattern", "gpt2"],
                          "bad.tiktoken:1: not a tiktoken rank line"),
    "gpt2_bad_encoder": (["--gpt2", "TMP/g"], "encoder.json: not a JSON file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_cli_bad_flags_are_one_line_errors(tmp_path, case, small_tok, gpt2_files):
    (tmp_path / "good.txt").write_text("some text here")
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\x00\xff")
    small_tok.save(tmp_path / "tok.json")
    small_tok.save_tiktoken(tmp_path / "mine.tiktoken")
    (tmp_path / "bad.tiktoken").write_text("YQ== 0 extra\n")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "encoder.json").write_text("{bad")
    (tmp_path / "g" / "vocab.bpe").write_bytes(gpt2_files[1].read_bytes())
    flags, expect = BAD_FLAGS[case]
    flags = [f.replace("TMP", str(tmp_path)).replace("GPT2", str(gpt2_files[0].parent))
             for f in flags]
    r = run_cli(str(tmp_path / "good.txt"), "--out", str(tmp_path / "out"), *flags)
    assert r.returncode == 2, r
    assert r.stderr.startswith("smallgpt-tokenize: error:") and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case",
    ["missing", "utf8", "empty", "exists", "badtok", "unknownfmt", "devnull", "surrogate"],
)
def test_cli_bad_input(tmp_path, case, small_tok):
    good = tmp_path / "good.txt"
    good.write_text("some text here")
    out = tmp_path / "out"
    args = [str(good), "--out", str(out), "--vocab-size", "300"]
    expect = ""
    if case == "devnull":
        args[0] = "/dev/null"
        expect = "/dev/null: not a regular file"
    elif case == "surrogate":
        (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800"}\n')
        args[0] = str(tmp_path / "s.jsonl")
        expect = "s.jsonl:1: a \\u escape of a lone surrogate"
    elif case == "missing":
        args[0] = str(tmp_path / "nope.txt")
        expect = "nope.txt"
    elif case == "utf8":
        (tmp_path / "bad.txt").write_bytes(b"ok ok \xc3\x28 more")
        args[0] = str(tmp_path / "bad.txt")
        expect = "bad.txt: invalid UTF-8 at byte offset 6 (pass --errors replace to"
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
    if case in ("utf8", "surrogate"):
        assert "--errors replace" in r.stderr
        r = run_cli(*args, "--errors", "replace")
        assert r.returncode == 0, r.stderr


def test_cli_doc_separator_keeps_non_ascii_and_escapes(tmp_path, gpt2_files):
    docs = ["première §", "zweite", "третий \\n"]
    (tmp_path / "in.txt").write_text("§\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    r = run_cli(str(tmp_path / "in.txt"), "--out", str(out), "--gpt2",
                str(gpt2_files[0].parent), "--doc-separator", "§\\n", "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert decode_split(out, "train") == docs


def test_unescape_is_shared_and_documented():
    from smallgpt.cli import unescape

    assert unescape("§\\n") == "§\n"
    assert unescape("a\\tb\\r\\n\\0\\\\n") == "a\tb\r\n\0\\n"
    assert unescape("C:\\dir\\x41 \\u00e9 日本") == "C:\\dir\\x41 \\u00e9 日本"
    assert unescape("trailing\\") == "trailing\\"


def test_cli_tiktoken_file_takes_pattern_and_special_tokens(tmp_path, small_tok):
    # A tokenizer saved as .tiktoken (no pattern, no special tokens) is usable again with
    # --pattern, and gets <|endoftext|> after its ranks, as training numbered it...
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 50)
    small_tok.save_tiktoken(tmp_path / "mine.tiktoken")
    r = run_cli(str(tmp_path / "t.txt"), "--out", str(tmp_path / "a"), "--tokenizer",
                str(tmp_path / "mine.tiktoken"), "--pattern", "gpt4", "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["eot_id"] == small_tok.eot_id and meta["vocab_size"] == small_tok.vocab_size
    assert decode_split(tmp_path / "a", "train") == ["the cat sat on the mat\n" * 50]
    # ...and a small file that is merely named like OpenAI's gets no cl100k special tokens
    # (before, its <|endoftext|> was id 100257 in a 700-id vocabulary: uint32 shards).
    small_tok.save_tiktoken(tmp_path / "cl100k_base.tiktoken")
    r = run_cli(str(tmp_path / "t.txt"), "--out", str(tmp_path / "b"), "--tokenizer",
                str(tmp_path / "cl100k_base.tiktoken"), "--pattern", "gpt4")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert (meta["eot_id"], meta["vocab_size"], meta["dtype"]) == (699, 700, "uint16")


def test_cli_max_token_length_and_huge_repeated_pieces(tmp_path):
    # One 300 KB piece: training used to make a 65536-byte token and fail after training.
    (tmp_path / "a.txt").write_text("a" * 300_000)
    for flags, longest in ([], 65535), (["--max-token-length", "100"], 100):
        out = tmp_path / f"out{longest}"
        r = run_cli(str(tmp_path / "a.txt"), "--out", str(out), "--vocab-size", "2000",
                    "--quiet", *flags)
        assert r.returncode == 0, r.stderr
        tok = Tokenizer.load(out / "tokenizer.json")
        lengths = [len(tok.token_bytes(i)) for i in range(tok.n_ordinary)]
        assert max(lengths) <= longest and max(lengths) > longest // 2
        train = decode_split(out, "train") + decode_split(out, "val")
        assert "".join(train) == "a" * 300_000


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
    assert not list(out.glob("*.bin"))
    if sig == signal.SIGKILL:  # the marker stays, and says the folder is unfinished
        assert json.loads((out / "meta.json").read_text())["complete"] is False
    else:
        assert not (out / "meta.json").exists()
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
        assert not list(out.glob("*.tmp"))
