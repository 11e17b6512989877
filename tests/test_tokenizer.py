"""Tokenizer API, real vocabularies against tiktoken, persistence and interop, bad input."""

from __future__ import annotations

import base64
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from smallgpt import Tokenizer, _bpe, reference_bpe

EOT = "<|endoftext|>"


def tiktoken_gpt2(gpt2_files) -> tiktoken.Encoding:
    enc_json, vocab_bpe = gpt2_files
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(enc_json))
    return tiktoken.Encoding(
        "gpt2-local", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
    )


def tiktoken_from_file(path: Path, pattern: str, specials: dict[str, int]) -> tiktoken.Encoding:
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
    )


@pytest.fixture(scope="module")
def gpt2(gpt2_files) -> Tokenizer:
    return Tokenizer.from_gpt2(*gpt2_files)


@pytest.fixture(scope="module")
def trained(sample_texts) -> Tokenizer:
    return Tokenizer.train(list(sample_texts.values()), vocab_size=600, pattern="gpt4")


# --------------------------------------------------------------------------- patterns


def test_named_patterns_are_tiktoken_strings():
    src = inspect.getsource(openai_public)
    assert _bpe.GPT2_PATTERN == openai_public.r50k_pat_str == reference_bpe.GPT2_PATTERN
    assert f'r"""{_bpe.CL100K_PATTERN}"""' in src
    assert _bpe.CL100K_PATTERN == reference_bpe.CL100K_PATTERN
    for part in _bpe.O200K_PATTERN.split("|"):
        assert part in src
    assert _bpe.O200K_PATTERN == reference_bpe.O200K_PATTERN
    assert _bpe.resolve_pattern("gpt4") == _bpe.CL100K_PATTERN
    assert _bpe.resolve_pattern(r"\w+") == r"\w+"


# --------------------------------------------------------------------------- real vocabularies


def test_gpt2_matches_tiktoken(gpt2, gpt2_files, sample_texts):
    tt = tiktoken_gpt2(gpt2_files)
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    for name, text in sample_texts.items():
        assert gpt2.encode_ordinary(text) == tt.encode_ordinary(text), name
    s = f"Hello{EOT} world{EOT}"
    assert gpt2.encode(s, allowed_special="all") == tt.encode(s, allowed_special="all")
    assert gpt2.encode(s, disallowed_special=()) == tt.encode(s, disallowed_special=())
    assert gpt2.encode_ordinary(s) == tt.encode_ordinary(s)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_openai_rank_files_match_tiktoken(name, shared_data, sample_texts):
    path = shared_data / "tiktoken" / f"{name}.tiktoken"
    ours = Tokenizer.from_tiktoken(path)
    tt = tiktoken_from_file(path, ours.pattern, ours.special_tokens)
    corpus = sorted((shared_data / "corpus").glob("ml_*.txt"))
    texts = list(sample_texts.values()) + [p.read_text(encoding="utf-8") for p in corpus]
    for text in texts:
        assert ours.encode_ordinary(text) == tt.encode_ordinary(text)
    s = f"a{EOT}b<|endofprompt|>"
    assert ours.encode(s, allowed_special="all") == tt.encode(s, allowed_special="all")
    assert ours.encode(s, allowed_special={EOT}, disallowed_special=()) == tt.encode(
        s, allowed_special={EOT}, disallowed_special=()
    )
    assert ours.encode_batch(texts[:4]) == tt.encode_batch(texts[:4])


def test_long_pieces_are_not_quadratic(gpt2, gpt2_files):
    tt = tiktoken_gpt2(gpt2_files)
    text = "a" * 200_000 + "b" * 1000 + "".join(chr(0x4E00 + i % 500) for i in range(50_000))
    assert gpt2.encode_ordinary(text) == tt.encode_ordinary(text)


# --------------------------------------------------------------------------- API


def test_train_encode_decode(trained, sample_texts):
    assert trained.vocab_size == 600
    assert trained.eot_id == 599 and trained.special_tokens == {EOT: 599}
    assert len(trained.merges) == 600 - 256 - 1
    assert trained.pattern == _bpe.CL100K_PATTERN
    for text in sample_texts.values():
        ids = trained.encode_ordinary(text)
        assert trained.decode(ids) == text
        assert max(ids) < 599
    assert trained.encode_batch(list(sample_texts.values())) == [
        trained.encode(t) for t in sample_texts.values()
    ]


def test_decode_replaces_invalid_utf8(gpt2):
    lead = next(i for i in range(256) if gpt2.token_bytes(i) == b"\xc3")  # half of "é"
    assert gpt2.decode_bytes([lead]) == b"\xc3"
    assert gpt2.decode([lead]) == "\ufffd"
    hi = gpt2.encode_ordinary("hi")
    assert gpt2.decode(hi + [lead] + hi) == "hi\ufffdhi"


def test_special_tokens_rules(trained):
    s = f"x{EOT}y"
    with pytest.raises(ValueError, match="disallowed special token"):
        trained.encode(s)
    assert trained.encode(s, allowed_special="all").count(trained.eot_id) == 1
    assert trained.eot_id not in trained.encode(s, disallowed_special=())
    assert trained.encode_ordinary(s) == trained.encode(s, disallowed_special=())
    with pytest.raises(ValueError, match="not special tokens"):
        trained.encode(s, allowed_special={"<|nope|>"})


def test_files_equal_texts(tmp_path, sample_texts):
    paths = []
    for name, text in sample_texts.items():
        p = tmp_path / f"{name}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    a = Tokenizer.train(list(sample_texts.values()), vocab_size=400)
    b = Tokenizer.train(files=paths, vocab_size=400)
    assert a.merges == b.merges


def test_min_frequency_and_max_token_length(sample_texts):
    text = sample_texts["english"]
    t = Tokenizer.train([text], vocab_size=5000, min_frequency=50, special_tokens=())
    assert 256 < t.vocab_size < 5000
    short = Tokenizer.train([text], vocab_size=500, max_token_length=3)
    assert all(len(short.token_bytes(i)) <= 3 for i in range(short.n_ordinary))


def test_huge_vocab_size_is_a_value_error_not_an_abort():
    # In a child process: before the fix this aborted the interpreter (Rust allocation
    # failure), which would take pytest down with it.
    code = """
import sys
from smallgpt import Tokenizer, _bpe
for size in (2**40, 2**31, 2**64 + 5):
    try:
        Tokenizer.train(["hello world"], vocab_size=size)
    except ValueError as e:
        assert "at most 2,147,483,647" in str(e), e
    else:
        sys.exit("no error for %d" % size)
t = _bpe.Trainer("gpt2")
t.feed(["hello world"])
try:
    t.train(2**40, 1)
except ValueError as e:
    assert "merges asked for" in str(e), e
else:
    sys.exit("no error from the Rust trainer")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_training_never_makes_a_token_the_encoder_cannot_hold():
    assert reference_bpe.MAX_TOKEN_LENGTH == _bpe.MAX_TOKEN_LENGTH == 65535
    tok = Tokenizer.train(["a" * 200_000], vocab_size=2000)
    lengths = [len(tok.token_bytes(i)) for i in range(tok.n_ordinary)]
    assert max(lengths) <= 65535 and max(lengths) >= 2**15
    text = "a" * 200_000 + " b"
    assert tok.decode(tok.encode_ordinary(text)) == text
    capped = Tokenizer.train(["a" * 200_000], vocab_size=2000, max_token_length=1000)
    assert max(len(capped.token_bytes(i)) for i in range(capped.n_ordinary)) <= 1000
    for bad in (1, 65536, 2.0, True):
        with pytest.raises(ValueError, match="max_token_length must be an int from 2 to 65535"):
            Tokenizer.train(["abc"], vocab_size=300, max_token_length=bad)


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path, trained, gpt2, sample_texts):
    for tok in (trained, gpt2):
        path = tmp_path / "tok.json"
        tok.save(path)
        data = json.loads(path.read_text())
        assert data["format"] == "smallgpt-tokenizer" and data["version"] == 1
        back = Tokenizer.load(path)
        assert back.merges == tok.merges and back.special_tokens == tok.special_tokens
        for text in sample_texts.values():
            assert back.encode_ordinary(text) == tok.encode_ordinary(text)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_other_versions(tmp_path, trained):
    data = json.loads(trained.to_json_str())
    data["version"] = 99
    p = tmp_path / "t.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        Tokenizer.load(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON"):
        Tokenizer.load(p)


def test_tiktoken_export(tmp_path, trained, sample_texts):
    path = tmp_path / "mine.tiktoken"
    trained.save_tiktoken(path)
    tt = tiktoken_from_file(path, trained.pattern, trained.special_tokens)
    back = Tokenizer.from_tiktoken(path, pattern="gpt4", special_tokens=trained.special_tokens)
    for text in sample_texts.values():
        assert tt.encode_ordinary(text) == trained.encode_ordinary(text)
        assert back.encode_ordinary(text) == trained.encode_ordinary(text)
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.from_tiktoken(path)


def test_huggingface_export(tmp_path, trained, gpt2, sample_texts):
    import tokenizers

    for tok in (trained, gpt2):
        path = tmp_path / "tokenizer.json"
        tok.save_huggingface(path)
        hf = tokenizers.Tokenizer.from_file(str(path))
        back = Tokenizer.from_huggingface(path)
        for text in sample_texts.values():
            ids = tok.encode_ordinary(text)
            assert hf.encode(text, add_special_tokens=False).ids == ids
            assert back.encode_ordinary(text) == ids
        assert hf.decode(tok.encode_ordinary("héllo wörld")) == "héllo wörld"
        assert back.special_tokens == tok.special_tokens
        assert back.pattern == tok.pattern  # the HF form of a named pattern maps back


def test_huggingface_export_of_numbers_and_custom_patterns(tmp_path):
    import tokenizers

    numbers = " ".join(str(i * 7919 % 100003) for i in range(3000))
    path = tmp_path / "tokenizer.json"
    tok = Tokenizer.train([numbers], vocab_size=1500, pattern="gpt4")
    tok.save_huggingface(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert tok.encode_ordinary("1766") == [tok.encode_ordinary(s)[0] for s in ("176", "6")]
    for text in ("1766", "year 2024: 12345678 items", numbers):
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode_ordinary(text)
    # A custom pattern that Oniguruma reads like fancy-regex is written as it is...
    custom = Tokenizer.train([numbers], vocab_size=400, pattern=r"\d{1,3}|\s+|[^\d\s]+")
    custom.save_huggingface(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.encode(numbers, add_special_tokens=False).ids == custom.encode_ordinary(numbers)
    assert Tokenizer.from_huggingface(path).pattern == custom.pattern
    # ...one with a construct it reads differently is refused, and nothing is written.
    for pattern, construct in [(r"\d{1,3}+|\D+", "'{1,3}+'"), (r"\S+|\s+$|\s", "'$'")]:
        bad = Tokenizer.train(["a 12 b"], vocab_size=260, pattern=pattern)
        with pytest.raises(ValueError, match=re.escape(construct) + ".*Oniguruma"):
            bad.save_huggingface(tmp_path / "refused.json")
        assert not (tmp_path / "refused.json").exists()


# --------------------------------------------------------------------------- bad input


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=256)
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.train(["abc"], vocab_size=300, pattern="(unclosed")
    with pytest.raises(ValueError, match="texts"):
        Tokenizer.train(vocab_size=300)
    with pytest.raises(TypeError):
        Tokenizer.train("a plain string", vocab_size=300)
    with pytest.raises(TypeError):
        Tokenizer.train([b"bytes"], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Tokenizer.train(files=[tmp_path / "missing.txt"], vocab_size=300)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 6"):
        Tokenizer.train(files=[bad], vocab_size=300)
    tok = Tokenizer.train(files=[bad], vocab_size=300, errors="replace", min_frequency=1)
    assert tok.vocab_size > 256


def test_files_that_are_not_regular_files(tmp_path):
    # In a child process with a timeout: opening a FIFO used to wait for a writer forever.
    os.mkfifo(tmp_path / "fifo")
    code = f"""
from smallgpt import Tokenizer
for name, why in [("fifo", "is not a regular file"), ("", "is a directory")]:
    try:
        Tokenizer.train(files=[{str(tmp_path)!r} + "/" + name], vocab_size=300)
    except OSError as e:
        assert why in str(e), e
    else:
        raise SystemExit("no error for " + name)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_argument_types_are_checked_before_training():
    for bad in ("<|endoftext|>", [1, 2]):
        with pytest.raises(TypeError, match="special_tokens must be a sequence of str"):
            Tokenizer.train(["abc"], vocab_size=300, special_tokens=bad)
    tok = Tokenizer.train(["abc"], vocab_size=300)
    with pytest.raises(TypeError, match="allowed_special must be 'all' or a set"):
        tok.encode("abc", allowed_special=EOT)
    with pytest.raises(ValueError, match="num_threads must be from 1 to 1024"):
        Tokenizer.train(["abc"], vocab_size=300, num_threads=10**6)
    with pytest.raises(ValueError, match="num_threads must be from 1 to 1024"):
        tok.encode_batch(["abc"], num_threads=10**6)


def test_bad_ids_and_text(trained):
    with pytest.raises(ValueError, match="unknown token id"):
        trained.decode([10**6])
    with pytest.raises(ValueError):
        trained.decode([-1])
    with pytest.raises(TypeError):
        trained.encode(b"bytes")  # type: ignore[arg-type]


def test_bad_vocabulary_files(tmp_path):
    p = tmp_path / "x.tiktoken"
    p.write_text("not base64 !!\n")
    with pytest.raises(ValueError):
        Tokenizer.from_tiktoken(p, pattern="gpt2")
    p.write_text(base64.b64encode(b"a").decode() + " 0\n")
    with pytest.raises(ValueError, match="byte"):
        Tokenizer.from_tiktoken(p, pattern="gpt2")
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="not BPE"):
        Tokenizer.from_huggingface(j)


def _malformed_tokenizer_files(trained) -> dict[str, object]:
    """Tokenizer files that are JSON (or not) but wrong, by what is wrong."""
    good = json.loads(trained.to_json_str())
    cases: dict[str, object] = {
        "binary": b"\x89PNG\r\n\x1a\n\x00\xff",
        "nested": "[" * 100_000 + "]" * 100_000,
        "a list": [1, 2],
        "no merges": {k: v for k, v in good.items() if k != "merges"},
    }
    for key, value in [("merges", [[-1, 5]]), ("merges", [[10**30, 1]]), ("merges", "ab"),
                       ("merges", [[1, 2, 3]]), ("merges", [[300, 301]]), ("pattern", 5),
                       ("pattern", "(unclosed"), ("special_tokens", {"x": -1}),
                       ("special_tokens", {"x": "y"}), ("special_tokens", [1]),
                       ("byte_order", "xyz"), ("byte_order", [300] * 256),
                       ("byte_order", [0] * 256)]:
        cases[f"{key}={value!r}"] = {**good, key: value}
    return cases


def test_malformed_tokenizer_files_are_value_errors_naming_the_file(tmp_path, trained):
    for what, content in _malformed_tokenizer_files(trained).items():
        p = tmp_path / "tok.json"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=re.escape(str(p))):
            Tokenizer.load(p)
        print(what, "ok")


def test_missing_files_and_directories_keep_their_os_errors(tmp_path, gpt2_files):
    for load in (Tokenizer.load, Tokenizer.from_huggingface,
                 lambda p: Tokenizer.from_tiktoken(p, pattern="gpt2"),
                 lambda p: Tokenizer.from_gpt2(p, gpt2_files[1])):
        with pytest.raises(FileNotFoundError):
            load(tmp_path / "missing.json")
        with pytest.raises(IsADirectoryError):
            load(tmp_path)


def test_malformed_gpt2_files_are_value_errors_naming_the_file(tmp_path, gpt2_files):
    enc_json, vocab_bpe = gpt2_files
    good_vocab = tmp_path / "vocab.bpe"
    good_vocab.write_bytes(vocab_bpe.read_bytes())
    encoder = json.loads(enc_json.read_text(encoding="utf-8"))
    bad = tmp_path / "encoder.json"
    for content in ["{bad", "[1, 2]", json.dumps({**encoder, "a": "x"}),
                    json.dumps({**encoder, EOT: 2**40}), json.dumps({**encoder, EOT: 5})]:
        bad.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            Tokenizer.from_gpt2(bad, good_vocab)
    bad_vocab = tmp_path / "bad.bpe"
    bad_vocab.write_bytes(b"#version: 0.2\n\xff\xfe x\n")
    with pytest.raises(ValueError, match=re.escape(str(bad_vocab))):
        Tokenizer.from_gpt2(enc_json, bad_vocab)


def test_malformed_tiktoken_files(tmp_path):
    p = tmp_path / "x.tiktoken"
    a = base64.b64encode(b"a").decode()
    for lines in ([f"{a} 0 extra"], [f"{a} zero"], ["!!!! 0"], [f"{a}"]):
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{p}:1: not a tiktoken rank line")):
            Tokenizer.from_tiktoken(p, pattern="gpt2")
    p.write_text(f"{a} 5\n")
    with pytest.raises(ValueError, match="ranks are not 0..0"):
        Tokenizer.from_tiktoken(p, pattern="gpt2")
    p.write_bytes(b"\x00\xff\xfe garbage\n")
    with pytest.raises(ValueError, match="not a tiktoken rank line"):
        Tokenizer.from_tiktoken(p, pattern="gpt2")


def test_tiktoken_files_are_openai_only_by_name_and_size(tmp_path, trained):
    # A small file that happens to be called cl100k_base.tiktoken is not OpenAI's: it gets
    # neither cl100k's pattern nor its special tokens (ids 100257.. in a 600-token vocabulary).
    p = tmp_path / "cl100k_base.tiktoken"
    trained.save_tiktoken(p)
    with pytest.raises(ValueError, match="pattern=.*599 ranks, OpenAI's cl100k_base 100256"):
        Tokenizer.from_tiktoken(p)
    tok = Tokenizer.from_tiktoken(p, pattern="gpt4")
    assert tok.special_tokens == {} and tok.vocab_size == 599
    # Names given as a list get the ids after the ranks, as training numbers them.
    tok = Tokenizer.from_tiktoken(p, pattern="gpt4", special_tokens=[EOT])
    assert tok.special_tokens == trained.special_tokens == {EOT: 599}
    with pytest.raises(ValueError, match="out of range"):
        Tokenizer.from_tiktoken(p, pattern="gpt4", special_tokens={EOT: 2**40})


def test_malformed_huggingface_files(tmp_path, trained):
    good_path = tmp_path / "good.json"
    trained.save_huggingface(good_path)
    good = json.loads(good_path.read_text(encoding="utf-8"))
    split = good["pre_tokenizer"]["pretokenizers"][0]
    cases = [
        [1, 2], {"model": [1]}, {"model": "BPE"}, {**good, "model": {"type": "BPE"}},
        {**good, "model": {**good["model"], "vocab": [1, 2]}},
        {**good, "model": {**good["model"], "vocab": {"a": "x"}}},
        {**good, "model": {**good["model"], "vocab": {"a": 2**70}}},
        {**good, "added_tokens": [5]},
        {**good, "pre_tokenizer": {"type": "Sequence", "pretokenizers": 3}},
        {**good, "pre_tokenizer": {**split, "behavior": "Removed"}},
        {**good, "pre_tokenizer": {**split, "invert": True}},
        {**good, "pre_tokenizer": {**split, "pattern": {"Regex": "(unclosed"}}},
        {**good, "pre_tokenizer": {**split, "pattern": {"String": ""}}},
        {**good, "pre_tokenizer": None},
    ]
    p = tmp_path / "tokenizer.json"
    for data in cases:
        p.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=re.escape(str(p))):
            Tokenizer.from_huggingface(p)
    # A Split on a plain string: the separators and the text between them are the pieces.
    p.write_text(json.dumps({**good, "pre_tokenizer": {**split, "pattern": {"String": "a b"}}}))
    tok = Tokenizer.from_huggingface(p)
    assert _bpe.pretokenize(tok.pattern, "xa ba b\nz.") == ["x", "a b", "a b", "\nz."]


def test_numpy_outputs_match_lists_and_keep_special_rules(gpt2):
    tok = gpt2
    texts = ["Hello world", "", "caf\u00e9 \u65e5\u672c 123", "x<|endoftext|>y"]
    ids, offsets = tok.encode_batch_to_numpy(texts, allowed_special="all")
    assert offsets.tolist() == [0, *np.cumsum([len(tok.encode(t, allowed_special="all"))
                                                for t in texts]).tolist()]
    assert ids.tolist() == [i for t in texts for i in tok.encode(t, allowed_special="all")]
    assert tok.encode_to_numpy("Hello world").tolist() == tok.encode("Hello world")
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode_batch_to_numpy(["x<|endoftext|>"])
    with pytest.raises(TypeError):
        tok.encode_batch_to_numpy("not a list")
    empty_ids, empty_offsets = tok.encode_batch_to_numpy([])
    assert empty_ids.size == 0 and empty_offsets.tolist() == [0]


def test_from_gpt2_rejects_characters_outside_the_byte_alphabet(tmp_path, gpt2_files):
    encoder_json, vocab_bpe = gpt2_files
    lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
    lines[1] = "\u4e2d " + lines[1].split()[1]  # not one of GPT-2's 256 byte characters
    bad = tmp_path / "vocab.bpe"
    bad.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="not a byte-level BPE file"):
        Tokenizer.from_gpt2(encoder_json, bad)
    enc = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    enc["\x00x"] = len(enc)
    bad_json = tmp_path / "encoder.json"
    bad_json.write_text(json.dumps(enc), encoding="utf-8")
    with pytest.raises(ValueError, match="not a byte-level BPE file"):
        Tokenizer.from_gpt2(bad_json, vocab_bpe)


def test_lone_surrogates_are_a_clear_error_everywhere(gpt2):
    bad = "ok \ud800 no"
    calls = [
        lambda: gpt2.encode(bad),
        lambda: gpt2.encode_ordinary(bad),
        lambda: gpt2.encode_to_numpy(bad),
        lambda: gpt2.encode_batch(["fine", bad]),
        lambda: gpt2.encode_ordinary_batch([bad]),
        lambda: gpt2.encode_batch_to_numpy(["fine", bad]),
    ]
    for call in calls:
        with pytest.raises(UnicodeEncodeError):
            call()
    assert gpt2.encode("ok") == gpt2.encode_ordinary("ok")  # still usable afterwards


def test_returned_lists_are_independent(gpt2):
    # The int objects are shared between calls; the lists must not be.
    text = "caf\u00e9 \U0001f600 the the"
    a = gpt2.encode_ordinary(text)
    b = gpt2.encode_ordinary(text)
    assert a == b and a is not b
    a.append(-1)
    a[0] = 12345
    assert gpt2.encode_ordinary(text) == b
    batch = gpt2.encode_batch([text, text])
    assert batch[0] == batch[1] == b and batch[0] is not batch[1]


def test_default_encode_matches_the_general_special_token_path(gpt2):
    # `encode` with its defaults takes a shortcut; it must agree with the set-based path.
    specials = set(gpt2._special_tokens)
    for text in ["plain text", "", "a<|endoftext|>b", "<|endoftext", "x <|endoftext|>"]:
        try:
            want = gpt2._core.encode(text, set(), specials)
        except ValueError as e:
            with pytest.raises(ValueError, match="disallowed special token"):
                gpt2.encode(text)
            assert "endoftext" in str(e)
        else:
            assert gpt2.encode(text) == want
    for empty in (set(), (), frozenset()):  # any empty allowed set: the same rule
        with pytest.raises(ValueError):
            gpt2.encode("a<|endoftext|>", allowed_special=empty)


def test_encode_argument_errors_are_typed(gpt2):
    """encode_ordinary and the batch calls check their arguments in Rust: same messages."""
    tok = gpt2
    with pytest.raises(TypeError, match="text must be str, got int"):
        tok.encode_ordinary(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be str, got bytes"):
        tok.encode_ordinary(b"x")  # type: ignore[arg-type]
    for call in (tok.encode_batch, tok.encode_ordinary_batch, tok.encode_batch_to_numpy):
        with pytest.raises(TypeError, match="not a single string"):
            call("one string")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="only str"):
            call(["ok", 3])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="sequence of str, got int"):
            call(5)  # type: ignore[arg-type]
    # Any iterable of str works, not only lists.
    texts = ["Hello world", "caf\u00e9"]
    expected = [tok.encode_ordinary(t) for t in texts]
    assert tok.encode_ordinary_batch(tuple(texts)) == expected
    assert tok.encode_ordinary_batch(t for t in texts) == expected
    # The instance attribute is the documented method's fast path, not a different function.
    assert tok.encode_ordinary("Hello world") == Tokenizer.encode_ordinary(tok, "Hello world")
