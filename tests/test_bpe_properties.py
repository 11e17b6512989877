"""Property tests: the Rust core computes exactly what `smallgpt.reference_bpe` specifies."""

from __future__ import annotations

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smallgpt import Tokenizer, _bpe, reference_bpe
from smallgpt.tokenizer import _bytes_to_unicode

NAMED = ["gpt2", "cl100k", "o200k"]

# Fragments that stress the pre-tokenizers: contractions in both cases, whitespace runs and
# CR/LF mixes before letters, digits runs, emoji (with ZWJ and skin tones), combining marks,
# CJK, RTL scripts, control characters and Unicode spaces.
FRAGMENTS = [
    "'s", "'S", "'ll", "'LL", "'lL", "'re", "'rE", "'ve", "'m", "'d", "'t", "'x", "''", "'\u017f",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", "\u00a0", "\u3000", "\u2028",
    "0", "12", "123", "1234567", "٣٤", "½",
    "a", "the", " the", "The", "HELLO", "camelCase", "ß", "é", "e\u0301", "İ",
    "😀", "👍🏽", "👩\u200d💻", "🇫🇷",
    "中文", "日本語", "한국어", "Привет", "مرحبا", "ܫܠܡܐ", "Ꭰ", "ⲁ",
    "!", "?!", "...", "—", "«", "»", "(", ")", "/", "//", "\\", "\x00", "\x07", "\x1b", "\x7f",
    "𝔘𝔫𝔦", "𝟙𝟚", "\u0085", "\u200b", "\ufeff", "\u1680", "ǅ", "ʰ", "\u0903",
]
pieces = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(st.characters(exclude_categories=("Cs", "Cn", "Co")), max_size=4),
)
texts = st.lists(pieces, max_size=40).map("".join)
long_runs = st.builds(lambda c, n: c * n, st.sampled_from(["a", " ", "\n", "1", "😀", "é"]),
                      st.integers(50, 400))
docs = st.lists(st.one_of(texts, long_runs), min_size=1, max_size=6)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=st.one_of(texts, long_runs), pattern=st.sampled_from(NAMED))
def test_pretokenize_equals_regex(text, pattern):
    expected = [m.group() for m in regex.finditer(reference_bpe.resolve_pattern(pattern), text)]
    assert _bpe.pretokenize(pattern, text) == expected  # hand-written scanner where one exists
    assert _bpe.pretokenize(pattern, text, regex_only=True) == expected  # fancy-regex
    assert reference_bpe.pretokenize(text, pattern) == expected


@SETTINGS
@given(
    parts=st.lists(st.one_of(texts, long_runs), min_size=1, max_size=30),
    pattern=st.sampled_from(NAMED),
    target=st.integers(1, 64),
)
def test_chunked_pretokenize_equals_whole(parts, pattern, target):
    # Documents joined by newlines give many candidate cut points.
    text = "\n".join(parts)
    assert _bpe.pretokenize_chunked(pattern, text, target) == reference_bpe.pretokenize(
        text, pattern
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    documents=docs,
    pattern=st.sampled_from(NAMED),
    n_merges=st.integers(0, 40),
    min_frequency=st.integers(1, 3),
    max_len=st.one_of(st.none(), st.integers(2, 6)),
    probe=texts,
)
def test_training_and_encoding_equal_reference(
    documents, pattern, n_merges, min_frequency, max_len, probe
):
    vocab_size = 256 + n_merges
    expected = reference_bpe.train(documents, vocab_size, pattern, min_frequency, max_len)
    trainer = _bpe.Trainer(pattern)
    trainer.feed(documents)
    assert trainer.train(n_merges, min_frequency, max_len) == expected

    tok = Tokenizer.train(
        documents, vocab_size=vocab_size, pattern=pattern, special_tokens=(),
        min_frequency=min_frequency, max_token_length=max_len,
    )
    assert tok.merges == expected
    for text in [probe, *documents]:
        ids = tok.encode_ordinary(text)
        assert ids == reference_bpe.encode(text, expected, pattern)
        assert tok.decode(ids) == text
        assert reference_bpe.decode(ids, expected) == text.encode()


@settings(max_examples=60, deadline=None)
@given(documents=docs, split=st.integers(0, 6))
def test_training_independent_of_threads_and_batching(documents, split):
    results = []
    for threads, batches in [(1, [documents]), (2, [documents[:split], documents[split:]]),
                             (2, [[d] for d in documents])]:
        trainer = _bpe.Trainer("gpt4", threads)
        for b in batches:
            if b:
                trainer.feed(b)
        results.append(trainer.train(30, 1))
    assert results[0] == results[1] == results[2]


@settings(max_examples=60, deadline=None)
@given(batch=st.lists(texts, max_size=12))
def test_encode_batch_equals_encode(batch):
    tok = _shared_tokenizer()
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]
    assert tok.encode_batch(batch, num_threads=1) == [tok.encode_ordinary(t) for t in batch]
    for t in batch:
        assert tok.decode(tok.encode(t)) == t
    ids, offsets = tok.encode_batch_to_numpy(batch)
    assert ids.dtype == np.uint32 and offsets.dtype == np.int64
    assert offsets.tolist()[0] == 0 and len(offsets) == len(batch) + 1
    assert [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(batch))] == [
        tok.encode(t) for t in batch
    ]


_TOK: list[Tokenizer] = []


def _shared_tokenizer() -> Tokenizer:
    if not _TOK:
        seed = "".join(FRAGMENTS) * 20 + "the quick brown fox jumps over the lazy dog " * 50
        _TOK.append(Tokenizer.train([seed], vocab_size=400, min_frequency=1))
    return _TOK[0]


# --------------------------------------------------------------------------- GPT-2 vs tiktoken

@pytest.fixture(scope="module")
def gpt2_pair(gpt2_files):
    """Our GPT-2 tokenizer and tiktoken's, both built from the committed fixture files (no
    network): the bare repository still checks a real 50k vocabulary."""
    import tiktoken
    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    enc_json, vocab_bpe = gpt2_files
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(enc_json))
    tt = tiktoken.Encoding("gpt2-fixture", pat_str=openai_public.r50k_pat_str,
                           mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    return Tokenizer.from_gpt2(enc_json, vocab_bpe), tt


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(texts, long_runs, st.lists(st.one_of(
    pieces, st.integers(0, 10**15).map(str), st.sampled_from(["<|endoftext|>", "<|endoftext"])
), max_size=30).map("".join)))
def test_gpt2_vocabulary_equals_tiktoken(text, gpt2_pair):
    ours, tt = gpt2_pair
    assert ours.encode_ordinary(text) == tt.encode_ordinary(text)
    assert ours.encode(text, allowed_special="all") == tt.encode(text, allowed_special="all")
    assert ours.decode_bytes(tt.encode_ordinary(text)) == text.encode("utf-8")


# --------------------------------------------------------------------------- Hugging Face export

# Numbers of every length (cl100k and o200k cut them in threes), non-ASCII digits, and the
# punctuation and whitespace runs around them.
numbers = st.one_of(
    st.integers(0, 10**15).map(str),
    st.text(st.sampled_from("0123456789٠١٢٣٤٥٦٧٨٩०१२३½²"), min_size=1, max_size=12),
)
punctuation = st.text(st.sampled_from("!?.,;:'\"-_/\\()[]{}<>@#$%^&*+=|~`…—«»"), max_size=5)
whitespace = st.text(st.sampled_from(" \t\n\r\u00a0\u3000\u2028\u0085\x0b\x0c"), max_size=5)
hf_texts = st.lists(st.one_of(pieces, numbers, punctuation, whitespace), max_size=40).map("".join)

_HF: dict[str, tuple[Tokenizer, object]] = {}


def _exported(pattern: str, tmp_dir) -> tuple[Tokenizer, object]:
    """A tokenizer trained with `pattern` on text full of numbers, and its HF export."""
    if pattern not in _HF:
        import tokenizers

        seed = ("".join(FRAGMENTS) * 5 + " ".join(str(i * 7919 % 100003) for i in range(3000))
                + " the quick brown fox jumps over the lazy dog " * 20)
        tok = Tokenizer.train([seed], vocab_size=1200, pattern=pattern, min_frequency=1)
        path = tmp_dir / f"{pattern}.json"
        tok.save_huggingface(path)
        _HF[pattern] = (tok, tokenizers.Tokenizer.from_file(str(path)))
    return _HF[pattern]


def hf_pieces(hf, text: str) -> list[str]:
    """The pieces a HF tokenizer's pre-tokenizer makes, as text."""
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    return [bytes(u2b[c] for c in p).decode("utf-8", "replace")
            for p, _ in hf.pre_tokenizer.pre_tokenize_str(text)]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=hf_texts, pattern=st.sampled_from(NAMED))
def test_huggingface_export_splits_and_encodes_identically(text, pattern, tmp_path_factory):
    tok, hf = _exported(pattern, tmp_path_factory.getbasetemp())
    assert hf_pieces(hf, text) == _bpe.pretokenize(pattern, text)
    # HF turns special-token text into its id, as `allowed_special="all"` does.
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def cl100k_exported(shared_data, tmp_path_factory):
    import tokenizers

    tok = Tokenizer.from_tiktoken(shared_data / "tiktoken" / "cl100k_base.tiktoken")
    path = tmp_path_factory.mktemp("hf") / "cl100k.json"
    tok.save_huggingface(path)
    return tok, tokenizers.Tokenizer.from_file(str(path))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=hf_texts)
def test_huggingface_export_of_cl100k_encodes_identically(text, cl100k_exported):
    tok, hf = cl100k_exported
    assert hf_pieces(hf, text) == _bpe.pretokenize("cl100k", text)
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allowed_special="all")
