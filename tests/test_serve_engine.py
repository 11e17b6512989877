"""The serving engine without HTTP: decoding rows at their own positions, continuous batching,
per-request sampling, prompt scores, stop strings, the cache's life."""

from __future__ import annotations

import pytest
import torch
from serving import gpt2_tokenizer, tiny_model

from smallgpt.generate import generate
from smallgpt.serve.engine import Choice, Engine, Request, SamplingParams, sample_rows

TEXTS = ["Hello world", "The cat sat on the", "Once upon a time there was", "a",
         "ROMEO: what light through yonder", "1 2 3 4", "To be, or not", "It was the best",
         "Call me", "In the beginning", "Happy families are", "All", "The sky above the port",
         "Whan that Aprill", "Mother died today.", "It is a truth universally"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    # Several torch threads on a busy CPU make each tiny step many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return gpt2_tokenizer()


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request):  # type: ignore[no-untyped-def]
    return tiny_model(request.param)


def prompts(tok, n: int = 16) -> list:  # type: ignore[no-untyped-def]
    return [[tok.eot_id] + tok.encode(t) for t in TEXTS[:n]]


def run(model, tok, reqs: list, max_batch: int = 32) -> tuple:  # type: ignore[no-untyped-def]
    """Submit every request before the engine starts (so the first step admits them all
    together), then collect their choices."""
    engine = Engine(model, tok, max_batch=max_batch)
    for r in reqs:
        engine.submit(r)
    engine.start()
    try:
        out = []
        for r in reqs:
            choices = [Choice(i) for i in range(r.n_choices)]
            left = r.n_choices
            while left:
                for d in r.outbox.get(timeout=120):
                    assert d.error is None, d.error
                    choices[d.index].add(d)
                    left -= d.finish_reason is not None
            out.append(choices)
        return out, engine.stats()
    finally:
        engine.stop()


@pytest.mark.parametrize("position, value_embeds", [("rope", 0), ("learned", 0), ("rope", 1)])
def test_decode_step_at_row_positions_equals_forward(position: str, value_embeds: int) -> None:
    torch.manual_seed(0)
    model = tiny_model(position, block_size=32, value_embeds=value_embeds)
    lens = [3, 9, 1, 14]
    seqs = [torch.randint(0, 500, (n + 4,)) for n in lens]
    cache = model.new_cache(6, 32)
    with torch.inference_mode():
        for i, (n, s) in enumerate(zip(lens, seqs)):
            model(s[None, :n], cache=cache.rows(i, i + 1))  # each row prefilled alone
        plan = model.decode_plan()
        for t in range(4):
            idx = torch.stack([s[n + t] for n, s in zip(lens, seqs)])[:, None]
            out = model.decode_step(idx, cache.rows(0, 4), plan, positions=[n + t for n in lens])
            for i, (n, s) in enumerate(zip(lens, seqs)):
                torch.testing.assert_close(out[i], model(s[None, : n + t + 1])[0, -1],
                                           atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        model.decode_step(idx, cache.rows(0, 4), plan, positions=[1, 2])
    with pytest.raises(ValueError, match="positions must be in"):
        model.decode_step(idx, cache.rows(0, 4), plan, positions=[1, 2, 3, 32])
    with pytest.raises(ValueError, match="rows"):
        cache.rows(4, 7)


def test_greedy_is_the_same_alone_and_among_15_others(model, tok) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(tok)
    params = SamplingParams(max_tokens=24, temperature=0)
    alone = []
    for p in ps[:4]:  # four alone suffice; all sixteen are checked against generate()
        (choices,), stats = run(model, tok, [Request([p], params)])
        assert stats["peak_running"] == 1
        alone.append(choices[0].token_ids)
    together, stats = run(model, tok, [Request([p], params) for p in ps])
    assert stats["peak_running"] == 16  # they really ran in one batch
    together = [c[0].token_ids for c in together]
    assert together[:4] == alone
    for p, got in zip(ps, together):
        ref = generate(model, torch.tensor([p]), 24, temperature=0, vocab_limit=tok.vocab_size)
        assert got == ref[0, len(p):].tolist()


def test_one_at_a_time_gives_the_same_tokens(model, tok) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(tok, 5)
    params = SamplingParams(max_tokens=10, temperature=0)
    serial, stats = run(model, tok, [Request([p], params) for p in ps], max_batch=1)
    assert stats["peak_running"] == 1
    batched, _ = run(model, tok, [Request([p], params) for p in ps])
    assert [c[0].token_ids for c in serial] == [c[0].token_ids for c in batched]


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(model, tok) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(tok, 6)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=11)
    others = [SamplingParams(max_tokens=15, temperature=0),
              SamplingParams(max_tokens=25, temperature=1.3, min_p=0.1, seed=2),
              SamplingParams(max_tokens=9, temperature=0.9, top_k=50, top_p=0.95, seed=4,
                             repetition_penalty=1.5)]
    mixed = [Request([p], params if i % 2 == 0 else others[i // 2]) for i, p in enumerate(ps)]
    got, stats = run(model, tok, mixed)
    assert stats["peak_running"] == 6
    for i in range(0, 6, 2):
        (alone,), _ = run(model, tok, [Request([ps[i]], params)])
        assert got[i][0].token_ids == alone[0].token_ids
        assert len(set(alone[0].token_ids)) > 5  # sampled, not stuck on one token


def test_sample_rows_inverts_the_cumulative_distribution() -> None:
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    u = torch.tensor([0.05, 0.0, 0.999999])
    assert sample_rows(probs, u).tolist() == [0, 2, 3]
    assert sample_rows(probs, torch.tensor([0.1, 0.5, 0.5])).tolist() == [2, 2, 2]
    # Rounding at the top end never lands on a token of probability 0.
    tail = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert sample_rows(tail, torch.tensor([1.0 - 1e-17])).tolist() == [1]
    # Evenly spaced uniforms reproduce the distribution to within their spacing.
    n = 10000
    row = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), dim=0)
    picks = sample_rows(row.expand(n, -1), (torch.arange(n) + 0.5) / n)
    freq = torch.bincount(picks, minlength=50).double() / n
    assert (freq - row.double()).abs().max() <= 1.0 / n + 1e-9


def test_choices_of_one_prompt_differ_and_each_is_reproducible(model, tok) -> None:  # type: ignore[no-untyped-def]
    p = prompts(tok, 1)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    (a,), _ = run(model, tok, [Request([p, p], params, n=3)])
    assert len(a) == 6 and len({tuple(c.token_ids) for c in a}) == 6
    (b,), _ = run(model, tok, [Request([p], SamplingParams(max_tokens=12, temperature=1.0,
                                                             seed=3 + 4))])
    assert b[0].token_ids == a[4].token_ids  # choice c draws from seed + c


def test_logprobs_and_echo_scores_are_the_models(model, tok) -> None:  # type: ignore[no-untyped-def]
    p = prompts(tok, 3)[2]
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=3)
    (choices,), _ = run(model, tok, [Request([p], params, echo=True)])
    c = choices[0]
    seq = torch.tensor([p + c.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq)[0, :, : tok.vocab_size].float(), dim=-1)
    want = lp[:-1].gather(1, seq[0, 1:, None])[:, 0]
    scores = c.prompt
    assert scores is not None and scores.token_ids == p and scores.logprobs[0] is None
    got = torch.tensor(scores.logprobs[1:] + c.logprobs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert c.top is not None and len(c.top) == 5 and all(len(t) == 3 for t in c.top)
    for t, (first_id, first_lp) in enumerate(x[0] for x in c.top):  # greedy: the top is picked
        assert first_id == c.token_ids[t]
        assert first_lp == pytest.approx(c.logprobs[t], abs=1e-5)


def test_score_only_request(model, tok) -> None:  # type: ignore[no-untyped-def]
    p = prompts(tok, 1)[0]
    (choices,), _ = run(model, tok, [Request([p], SamplingParams(max_tokens=0, logprobs=0),
                                             echo=True)])
    c = choices[0]
    assert c.token_ids == [] and c.finish_reason == "length"
    assert c.prompt is not None and len(c.prompt.logprobs) == len(p)


def test_stop_strings_eos_and_length(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("rope")
    p = prompts(tok, 1)[0]
    free, _ = run(model, tok, [Request([p], SamplingParams(max_tokens=30, temperature=0))])
    text = free[0][0].text
    assert free[0][0].finish_reason == "length" and len(free[0][0].token_ids) == 30
    stop = text[5:9]
    (choices,), _ = run(model, tok, [Request([p], SamplingParams(max_tokens=30, temperature=0,
                                                                 stop=(stop, "\x00")))])
    c = choices[0]
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    # The eos token (<|endoftext|>) ends a choice without appearing in its text: make it
    # the model's first pick by giving it twice the head row of the token picked now.
    first = free[0][0].token_ids[0]
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([p]))[0, -1]
        assert float(model.lm_head.weight[first] @ h) > 0
        model.lm_head.weight[tok.eot_id] = 2 * model.lm_head.weight[first]
    (choices,), _ = run(model, tok, [Request([p], SamplingParams(max_tokens=5, temperature=0))])
    c = choices[0]
    assert c.token_ids == [tok.eot_id] and c.finish_reason == "stop" and c.text == ""


def test_slots_and_cache_are_freed(model, tok) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        reqs = [Request(prompts(tok, 6), SamplingParams(max_tokens=8, temperature=0))]
        choices = engine.complete(reqs[0], timeout=120)
        assert all(c.finish_reason == "length" for c in choices)
        stats = engine.stats()
        assert stats["peak_running"] == 4  # six sequences, four slots
        # Cancelled work is dropped; the engine goes idle and frees its cache.
        slow = Request(prompts(tok, 8), SamplingParams(max_tokens=40, temperature=0))
        engine.submit(slow)
        first = slow.outbox.get(timeout=120)
        assert first
        slow.cancel()
        follow = engine.complete(Request([prompts(tok, 1)[0]], SamplingParams(max_tokens=2)),
                                 timeout=120)
        assert follow[0].finish_reason == "length"
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_bytes"] == 0


def test_requests_that_do_not_fit_are_refused(model, tok) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="exceed the context"):
        engine.submit(Request([[1] * 60], SamplingParams(max_tokens=5)))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(Request([[tok.vocab_size]], SamplingParams(max_tokens=5)))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(Request([[1]], SamplingParams(max_tokens=0)))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([[]], SamplingParams()))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, tok, max_batch=0)
