"""Tests for smallgpt.generate: warpers on hand-made logits, KV cache vs no cache, exact parity
with transformers (greedy, beam search, sampling under the same seed), seeds, eos, stop
strings and streaming.

The tests marked ``device`` run on ``$SMALLGPT_TEST_DEVICE`` (default cpu; cuda in
benches/gpu_check.sh), transformers' side included."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from helpers import device_under_test

from smallgpt.generate import (
    apply_repetition_penalty,
    generate_text,
    min_p_filter,
    process_logits,
    stream_text,
    top_k_filter,
    top_p_filter,
)
from smallgpt.model import GPT, GPTConfig

DEVICE = torch.device(device_under_test())


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.flatten().tolist()) if v != float("-inf")}


def logp(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def tiny(vocab: int = 26, block: int = 32, **kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(cfg).eval()  # type: ignore[arg-type]


def on_device(m: GPT) -> GPT:
    return m.to(DEVICE)


def ids(rows: list) -> torch.Tensor:
    return torch.tensor(rows, device=DEVICE)


def randint(high: int, shape: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator).to(DEVICE)


# ----------------------------------------------------------------------------- warpers


def test_top_k_keeps_k_best_and_ties() -> None:
    x = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0]])
    assert kept(top_k_filter(x, 2)) == {1, 3}
    assert kept(top_k_filter(x, 3)) == {1, 2, 3}
    assert kept(top_k_filter(x, 99)) == {0, 1, 2, 3, 4}
    tie = torch.tensor([[1.0, 5.0, 3.0, 3.0, 2.0]])
    assert kept(top_k_filter(tie, 2)) == {1, 2, 3}  # ties with the k-th token stay


def test_top_p_keeps_smallest_nucleus() -> None:
    x = logp([0.5, 0.3, 0.15, 0.05])
    assert kept(top_p_filter(x, 0.4)) == {0}
    assert kept(top_p_filter(x, 0.6)) == {0, 1}
    assert kept(top_p_filter(x, 0.75)) == {0, 1}
    assert kept(top_p_filter(x, 0.85)) == {0, 1, 2}
    assert kept(top_p_filter(x, 0.99)) == {0, 1, 2, 3}
    assert kept(top_p_filter(x, 1.0)) == {0, 1, 2, 3}
    assert kept(top_p_filter(x, 0.01)) == {0}  # the top token always stays


def test_min_p_scales_with_top_probability() -> None:
    x = logp([0.5, 0.3, 0.15, 0.05])
    assert kept(min_p_filter(x, 0.5)) == {0, 1}  # threshold 0.25
    assert kept(min_p_filter(x, 0.2)) == {0, 1, 2}  # threshold 0.10
    assert kept(min_p_filter(x, 0.05)) == {0, 1, 2, 3}
    assert kept(min_p_filter(x, 1.0)) == {0}


def test_warper_order_temperature_topk_topp() -> None:
    x = logp([0.5, 0.3, 0.15, 0.05])
    empty = torch.zeros((1, 0), dtype=torch.long)
    # temperature first: squaring the probabilities shrinks the 0.6-nucleus to one token
    assert kept(process_logits(x, empty, top_p=0.6)) == {0, 1}
    assert kept(process_logits(x, empty, temperature=0.5, top_p=0.6)) == {0}
    # top-k before top-p: top-p sees the renormalised top-2 distribution (0.625, 0.375)
    assert kept(process_logits(x, empty, top_k=2, top_p=0.6)) == {0}
    # min-p last: it measures against the renormalised survivors of top-k
    assert kept(process_logits(x, empty, top_k=3, min_p=0.55)) == {0, 1}
    out = process_logits(x, empty, temperature=0.5)
    assert torch.allclose(out, x / 0.5)


def test_repetition_penalty_values() -> None:
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seqs = torch.tensor([[0, 1, 1]])
    assert apply_repetition_penalty(x, seqs, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # greedy: only the penalty applies, sampling warpers are ignored
    out = process_logits(x, seqs, temperature=0, top_k=1, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(top_k=-1),
        dict(num_beams=0),
        dict(num_samples=0),
        dict(num_beams=2, num_samples=3),
        dict(repetition_penalty=0.0),
        dict(stop="x"),  # no decode function
    ],
)
def test_bad_arguments(kw: dict) -> None:
    m = tiny()
    with pytest.raises(ValueError):
        m.generate(torch.tensor([[1, 2]]), 4, **kw)


def test_bad_prompts() -> None:
    m = tiny()
    with pytest.raises(ValueError, match="empty"):
        m.generate(torch.zeros((1, 0), dtype=torch.long), 4)
    with pytest.raises(ValueError):
        m.generate(torch.tensor([[1, 26]]), 4)
    with pytest.raises(ValueError):
        m.generate(torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError):
        m.generate(torch.tensor([[1, 2]]), -1)


# ----------------------------------------------------------------------------- cache


@pytest.mark.device
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cache_matches_no_cache(position: str) -> None:
    m = on_device(tiny(position=position))
    prompt = randint(26, (3, 5))
    a = m.generate(prompt, 27, temperature=0, use_cache=True)
    b = m.generate(prompt, 27, temperature=0, use_cache=False)
    assert a.shape == (3, 32)
    assert torch.equal(a, b)
    c = m.generate(prompt, 27, top_k=10, seed=3, use_cache=True)
    d = m.generate(prompt, 27, top_k=10, seed=3, use_cache=False)
    assert torch.equal(c, d)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_distribution_is_the_models_with_softcap(use_cache: bool) -> None:
    """Every step samples from the model's own next-token distribution, soft-cap included:
    the prompt's step (prefill, or every step without the cache) as much as cached ones."""
    from smallgpt.generate import _Stepper

    m = tiny(logit_softcap=0.5)
    prompt = torch.randint(0, 26, (2, 5))
    stepper = _Stepper(m, use_cache)
    seqs = prompt
    for _ in range(3):
        with torch.no_grad():
            want = m(seqs)[:, -1].float()
            got = stepper.logits(seqs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        seqs = torch.cat((seqs, want.argmax(-1, keepdim=True)), dim=1)


@pytest.mark.device
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_generation_past_the_context_crops(position: str) -> None:
    m = on_device(tiny(block=16, position=position))
    prompt = randint(26, (2, 20))  # longer than the context: cropped
    for use_cache in (True, False):
        out = m.generate(prompt, 40, seed=0, use_cache=use_cache)
        assert out.shape == (2, 60)
        assert torch.equal(out[:, :20], prompt)
    # Until the cache is first rebuilt both paths see the same window.
    p = randint(26, (2, 4))
    a = m.generate(p, 30, temperature=0, use_cache=True)
    b = m.generate(p, 30, temperature=0, use_cache=False)
    assert torch.equal(a[:, : 16 + 1], b[:, : 16 + 1])


def test_generate_restores_training_mode_and_disables_dropout() -> None:
    m = tiny(dropout=0.3)
    prompt = torch.tensor([[3, 4, 5]])
    ref = m.generate(prompt, 10, temperature=0)
    m.train()
    assert torch.equal(m.generate(prompt, 10, temperature=0), ref)
    assert m.training


# ----------------------------------------------------------------------------- seeds


@pytest.mark.device
def test_seed_reproduces_and_leaves_global_rng_alone() -> None:
    m = on_device(tiny())
    prompt = ids([[1, 2, 3]])
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None
    a = m.generate(prompt, 20, seed=7, num_samples=3)
    assert torch.equal(torch.get_rng_state(), state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(DEVICE), cuda_state)
    b = m.generate(prompt, 20, seed=7, num_samples=3)
    c = m.generate(prompt, 20, seed=8, num_samples=3)
    assert a.shape == (3, 23)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples differ from each other
    torch.manual_seed(11)
    d = m.generate(prompt, 20)
    torch.manual_seed(11)
    assert torch.equal(d, m.generate(prompt, 20))


@pytest.mark.device
def test_stream_equals_generate() -> None:
    m = on_device(tiny())
    prompt = randint(26, (2, 4))
    steps = list(m.generate_stream(prompt, 15, seed=5, top_p=0.9))
    assert len(steps) == 15 and steps[0].shape == (2,)
    assert torch.equal(torch.stack(steps, 1), m.generate(prompt, 15, seed=5, top_p=0.9)[:, 4:])


# ----------------------------------------------------------------------------- eos / stop


@pytest.mark.device
def test_eos_per_sequence() -> None:
    m = on_device(tiny())
    prompt = randint(26, (3, 4))
    free = m.generate(prompt, 20, temperature=0)[:, 4:].tolist()
    eos = free[0][3]
    out = m.generate(prompt, 20, temperature=0, eos_token_id=eos)
    lengths = [row.index(eos) + 1 if eos in row else 20 for row in free]
    assert out.shape == (3, 4 + max(lengths))
    for row, n, got in zip(free, lengths, out[:, 4:].tolist()):
        assert got[:n] == row[:n]
        assert all(t == eos for t in got[n:])
    alone = m.generate(prompt[:1], 20, temperature=0, eos_token_id=eos)
    assert alone.shape == (1, 4 + lengths[0])  # stops early when every row is done
    padded = m.generate(prompt[:1], 20, temperature=0, eos_token_id=eos, pad_token_id=25)
    assert padded.shape == alone.shape and torch.equal(padded, alone)


def letters(ids: list) -> str:
    return "".join(chr(97 + i) for i in ids)


def letter_bytes(ids: list) -> bytes:
    return bytes(97 + i for i in ids)


@pytest.mark.device
def test_stop_strings_tensor_and_text() -> None:
    m = on_device(tiny())
    prompt = ids([[0, 1]])
    free = letters(m.generate(prompt, 30, seed=1)[0, 2:].tolist())
    stop = free[9:11]
    expected = free[: free.find(stop)]
    out = m.generate(prompt, 30, seed=1, stop=stop, decode=letters, pad_token_id=25)
    new = out[0, 2:].tolist()
    assert letters(new[: len(expected)]) == expected
    assert all(t == 25 for t in new[len(expected) :])
    assert out.shape[1] == 2 + len(expected)  # the stop string is cut from the output
    texts = generate_text(m, prompt, 30, seed=1, stop=[stop, "never-seen"],
                          decode_bytes=letter_bytes)
    assert texts == [expected]
    streamed = "".join(stream_text(m, prompt, 30, seed=1, stop=stop, decode_bytes=letter_bytes))
    assert streamed == expected
    # a stop string that never appears: the held-back tail is flushed at the end
    assert "".join(stream_text(m, prompt, 30, seed=1, stop=free[-1] + "zzzz",
                               decode_bytes=letter_bytes)) == free


@pytest.mark.device
def test_stream_text_decodes_split_utf8() -> None:
    # Tokens 0-12 are the lead byte 0xC3, tokens 13-27 continuation bytes: a lead followed by a
    # continuation is one character (U+00CD..U+00DB), anything else is broken UTF-8.
    table = [b"\xc3"] * 13 + [bytes([0x80 + i]) for i in range(13, 28)]

    def dec(ids: list) -> bytes:
        return b"".join(table[i] for i in ids)

    m = on_device(tiny(vocab=28))
    prompt = ids([[26]])
    seen = ""
    for seed in range(6):
        pieces = list(stream_text(m, prompt, 40, seed=seed, decode_bytes=dec))
        assert "".join(pieces) == generate_text(m, prompt, 40, seed=seed, decode_bytes=dec)[0]
        full = dec(m.generate(prompt, 40, seed=seed)[0, 1:].tolist())
        assert "".join(pieces) == full.decode("utf-8", errors="replace")
        seen += "".join(pieces)
    assert "\u00d0" in seen and "\ufffd" in seen  # joined and broken characters occurred


@pytest.mark.device
def test_stream_text_eos_not_printed() -> None:
    m = on_device(tiny())
    prompt = ids([[2, 3]])
    free = m.generate(prompt, 20, temperature=0)[0, 2:].tolist()
    eos = free[5]
    n = free.index(eos)
    text = "".join(stream_text(m, prompt, 20, temperature=0, eos_token_id=eos,
                               decode_bytes=letter_bytes))
    assert text == letters(free[:n])


# ----------------------------------------------------------------------------- transformers parity


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return hf.to(DEVICE), GPT.from_huggingface(path).to(DEVICE)


def hf_generate(hf, prompt, n, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("eos_token_id", None)
    kw.setdefault("pad_token_id", 0)
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, **kw)


@pytest.mark.device
def test_greedy_matches_transformers(hf_pair) -> None:  # type: ignore[no-untyped-def]
    hf, m = hf_pair
    prompt = randint(97, (3, 6), torch.Generator().manual_seed(1))
    ref = hf_generate(hf, prompt, 40, do_sample=False)
    assert torch.equal(m.generate(prompt, 40, temperature=0), ref)
    assert torch.equal(m.generate(prompt, 40, temperature=0, use_cache=False), ref)
    ref_rp = hf_generate(hf, prompt, 40, do_sample=False, repetition_penalty=1.5)
    assert torch.equal(m.generate(prompt, 40, temperature=0, repetition_penalty=1.5), ref_rp)


@pytest.mark.device
def test_beam_search_matches_transformers(hf_pair) -> None:  # type: ignore[no-untyped-def]
    hf, m = hf_pair
    prompt = randint(97, (2, 5), torch.Generator().manual_seed(2))
    ref = hf_generate(hf, prompt, 30, do_sample=False, num_beams=4, length_penalty=1.0)
    ours = m.generate(prompt, 30, temperature=0, num_beams=4, length_penalty=1.0)
    assert torch.equal(ours, ref)
    ref2 = hf_generate(hf, prompt, 30, do_sample=False, num_beams=4, num_return_sequences=3)
    assert torch.equal(m.generate(prompt, 30, num_beams=4, num_samples=3), ref2)
    assert torch.equal(m.generate(prompt, 30, num_beams=4, num_samples=3, use_cache=False), ref2)


@pytest.mark.device
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
def test_beam_search_with_eos_matches_transformers(hf_pair, early_stopping, length_penalty):  # type: ignore[no-untyped-def]  # noqa: E501
    hf, m = hf_pair
    prompt = randint(97, (2, 5), torch.Generator().manual_seed(3))
    # pick an eos the beams actually produce
    eos = int(m.generate(prompt, 8, temperature=0)[0, 7])
    kw = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    ref = hf_generate(hf, prompt, 25, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                      num_return_sequences=2, **kw)
    ours = m.generate(prompt, 25, eos_token_id=eos, num_samples=2, **kw)
    assert torch.equal(ours, ref)


@pytest.mark.device
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_k=20),
        dict(top_p=0.8),
        dict(min_p=0.1, temperature=1.3),
        dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    ],
)
def test_sampling_matches_transformers_under_same_seed(hf_pair, kw: dict) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    hf, m = hf_pair
    prompt = randint(97, (2, 5), torch.Generator().manual_seed(4))
    hf_kw = {"top_k": 0, **kw}  # transformers defaults to top_k=50
    torch.manual_seed(5)
    ref = hf_generate(hf, prompt, 30, do_sample=True, **hf_kw)
    torch.manual_seed(5)
    assert torch.equal(m.generate(prompt, 30, **kw), ref)


@pytest.mark.device
@pytest.mark.parametrize("kw", [dict(position="rope"), dict(position="learned"),
                                dict(bias=False, tie_embeddings=False, activation="relu")])
def test_decode_step_equals_forward(kw):
    model = on_device(tiny(vocab=40, block=16, **kw)).eval()
    seq = randint(40, (3, 12))
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache(3)
        model(seq[:, :5], cache=cache)  # prefill
        for t in range(5, 12):
            step = model.decode_step(seq[:, t : t + 1], cache)
            assert torch.allclose(step, full[:, t], atol=1e-5), t
        assert cache.pos == 12


def test_decode_step_rejects_bad_input_and_reads_current_weights():
    model = tiny(vocab=40, block=4).eval()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r"\(batch, 1\)"):
        model.decode_step(torch.zeros(2, 2, dtype=torch.long), cache)
    with torch.no_grad():
        for _ in range(4):
            model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="full"):
            model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache)
        # Without a plan, each step reads the parameters the model holds now.
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        cache.reset()
        assert model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache).abs().max() == 0


def test_streaming_leaves_grad_mode_alone_and_yields_ordinary_tensors():
    model = tiny(vocab=30, block=16)
    idx = torch.tensor([[1, 2, 3]])
    for tok in model.generate_stream(idx, 5, temperature=0):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert not tok.is_inference()
    out = model.generate(idx, 5, temperature=0)
    assert not out.is_inference()
    # The output can feed a training step (inference tensors cannot be saved for backward).
    model.train()
    _, loss = model(out[:, :-1], out[:, 1:])
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_huge_max_new_tokens_allocates_as_it_goes():
    # A model that always prefers token 3 (its eos): every search ends at once. Buffers must
    # not be sized by max_new_tokens (10**12 tokens would be terabytes).
    model = tiny(vocab=8, block=8).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight[3, 0] = 10.0
    idx = torch.tensor([[1, 2]])
    for kw in (dict(temperature=0), dict(num_beams=4), dict(num_beams=2, num_samples=2),
               dict(temperature=1.0, seed=0)):
        out = model.generate(idx, 10**12, eos_token_id=3, **kw)
        assert out.shape[1] <= 4 and all(3 in row[2:] for row in out.tolist()), kw
    # Without an eos the sampler still grows its history step by step (no large buffer).
    pieces = model.generate_stream(idx, 10**12, temperature=0)
    assert [int(next(pieces)[0]) for _ in range(300)] == [3] * 300
