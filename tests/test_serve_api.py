"""smallgpt-serve's HTTP API against real clients: the official ``openai`` package and raw
HTTP (httpx) on a live uvicorn server, errors, keys, disconnects and load."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="needs the openai package (pip install "
                             "'smallgpt[test]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="needs the serve extra (pip install 'smallgpt[serve]')")

import torch  # noqa: E402
from serving import ThreadServer, get_json, gpt2_tokenizer, make_run  # noqa: E402

from smallgpt.checkpoint import load_model  # noqa: E402
from smallgpt.generate import generate_text  # noqa: E402
from smallgpt.serve.app import create_app  # noqa: E402
from smallgpt.serve.engine import Engine  # noqa: E402

NAME = "tiny-run"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    # Several torch threads on a busy CPU make each tiny step many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Gate:
    """Holds every decoding step of a model while closed (prefill still runs): a test
    decides when the engine may go on, instead of racing it."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        self.open = threading.Event()
        self.open.set()
        step = model.decode_step

        def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
            assert self.open.wait(120), "the gate was never opened"
            return step(*args, **kwargs)

        model.decode_step = gated


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def served(run_dir: Path):  # type: ignore[no-untyped-def]
    loaded = load_model(run_dir)
    gate = Gate(loaded.model)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=16)
    app = create_app(engine, loaded.tokenizer, model_name=NAME,
                     metrics_path=run_dir / "metrics.jsonl")
    with ThreadServer(app) as server:
        yield server.url, engine, loaded, gate


@pytest.fixture(scope="module")
def client(served):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def stats(url: str) -> dict:
    return get_json(url + "/health")


def greedy_text(loaded, prompt: str, n: int) -> str:  # type: ignore[no-untyped-def]
    tok = loaded.tokenizer
    ids = torch.tensor([[tok.eot_id] + tok.encode(prompt)])
    return generate_text(loaded.model, ids, n, decode_bytes=tok.decode_bytes, temperature=0,
                         vocab_limit=tok.vocab_size, eos_token_id=tok.eot_id)[0]


# ------------------------------------------------------------------ the openai client


def test_models(client) -> None:  # type: ignore[no-untyped-def]
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].object == "model"
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion(client, served) -> None:  # type: ignore[no-untyped-def]
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=12,
                                  temperature=0, logprobs=3)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length"
    assert c.text == greedy_text(served[2], "Hello world", 12)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == c.text  # every token here is whole UTF-8
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(12)]
    for tok, logp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logp <= 0 and tok in top and top[tok] == logp
        assert max(top.values()) == logp  # greedy: the chosen token is the most likely
    # <|endoftext|> is put in front of a text prompt, as in training: counted, not echoed.
    n_prompt = len(gpt2_tokenizer().encode("Hello world")) + 1
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)
    assert r.usage.total_tokens == n_prompt + 12


def test_streaming(client) -> None:  # type: ignore[no-untyped-def]
    whole = client.completions.create(model=NAME, prompt="The cat", max_tokens=20,
                                      temperature=0)
    stream = client.completions.create(model=NAME, prompt="The cat", max_tokens=20,
                                       temperature=0, stream=True, logprobs=2,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    body = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert sum(len(c.choices[0].logprobs.tokens) for c in body) == 20


def test_sse_framing(served) -> None:  # type: ignore[no-untyped-def]
    url = served[0]
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                      json={"prompt": "Hi", "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for e in events[:-2]:
        assert e.startswith("data: {")
        chunk = json.loads(e[len("data: "):])
        assert chunk["object"] == "text_completion"
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}


def test_prompt_forms_n_and_echo(client, served) -> None:  # type: ignore[no-untyped-def]
    tok = served[2].tokenizer
    ids = tok.encode("One two three")
    r = client.completions.create(model=NAME, prompt=["a b", "c d"], max_tokens=3,
                                  temperature=0.7, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    r = client.completions.create(model=NAME, prompt=[ids, ids[:2]], max_tokens=2,
                                  temperature=0)
    assert len(r.choices) == 2
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0,
                                  echo=True)
    assert r.choices[0].text.startswith("One two three")
    # What lm-eval's local-completions sends: token ids, echo, logprobs=1, max_tokens=1.
    r = client.completions.create(model=NAME, prompt=[ids], max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + 1 and lp.text_offset[:3] == [0, 3, 7]
    seq = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(served[2].model(seq)[0, :, : tok.vocab_size], dim=-1)
    want = logp[:-1].gather(1, seq[0, 1:, None])[:, 0]
    got = torch.tensor(lp.token_logprobs[1 : len(ids)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    r = client.completions.create(model=NAME, prompt=[ids], max_tokens=0, echo=True,
                                  logprobs=0)
    assert r.choices[0].text == "One two three" and len(r.choices[0].logprobs.tokens) == 3


def test_seed_stop_and_extra_fields(client) -> None:  # type: ignore[no-untyped-def]
    kw = dict(model=NAME, prompt="Once", max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=5, **kw).choices[0].text
    assert client.completions.create(seed=5, **kw).choices[0].text == a
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    b = client.completions.create(seed=5, extra_body=extra, **kw).choices[0].text
    assert client.completions.create(seed=5, extra_body=extra, **kw).choices[0].text == b
    stop = a[3:6]
    r = client.completions.create(seed=5, stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == a[: a.index(stop)]


def test_bad_requests_are_openai_errors(client, served) -> None:  # type: ignore[no-untyped-def]
    cases = [dict(max_tokens=0), dict(max_tokens=-1), dict(max_tokens=63), dict(n=17),
             dict(temperature=3), dict(top_p=0), dict(logprobs=21), dict(stop=["a"] * 17),
             dict(extra_body={"max_tokens": "5"}), dict(extra_body={"bogus": 1}),
             dict(extra_body={"frequency_penalty": 0.5}), dict(prompt=[]),
             dict(prompt=[10 ** 6]), dict(extra_body={"prompt": [1, "a"]})]
    for kw in cases:
        args = {"model": NAME, "prompt": "Hi", "max_tokens": 4, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**args)
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"}, kw
        assert err["type"] == "invalid_request_error" and err["message"], kw
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", max_tokens=64)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert "chat fine-tuning" in e.value.message
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).choices


def test_bad_http_bodies(served) -> None:  # type: ignore[no-untyped-def]
    url = served[0]
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400),
                         (b'{"prompt": "x", "stream": "yes"}', 400),
                         (b'{"prompt": "x", "temperature": NaN}', 400)]:
        r = httpx.post(url + "/v1/completions", content=body, timeout=60)
        assert r.status_code == status, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("POST", "/v1/models", 405)]:
        r = httpx.request(method, url + path, timeout=60)
        assert r.status_code == status and "error" in r.json()
    assert stats(url)["status"] == "ok"


def test_tokenize_detokenize_and_metrics(served) -> None:  # type: ignore[no-untyped-def]
    url, _, loaded, _ = served
    tok = loaded.tokenizer
    r = httpx.post(url + "/v1/tokenize", json={"prompt": "Hello wörld", "return_token_strs":
                                               True}, timeout=60).json()
    assert r["tokens"] == [tok.eot_id] + tok.encode("Hello wörld")
    assert r["token_strs"][0] == "<|endoftext|>" and r["max_model_len"] == 64
    assert r["count"] == len(r["tokens"])
    r2 = httpx.post(url + "/tokenize", json={"prompt": "Hello", "add_special_tokens": False},
                    timeout=60).json()
    assert r2["tokens"] == tok.encode("Hello")
    back = httpx.post(url + "/v1/detokenize", json={"tokens": r["tokens"][1:]}, timeout=60)
    assert back.json() == {"prompt": "Hello wörld"}
    bad = httpx.post(url + "/v1/detokenize", json={"tokens": [99999999]}, timeout=60)
    assert bad.status_code == 400
    info = httpx.get(url + "/tokenizer_info", timeout=60).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    m = httpx.get(url + "/v1/smallgpt/metrics", timeout=60).json()
    assert m["train"][0] == [0, 10.0] and len(m["train"]) == 11
    assert [v["step"] for v in m["val"]] == [0, 50, 100] and m["val"][2]["val_bpb"] == 2.0


def test_page_is_served_and_self_contained(served) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(served[0] + "/", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/completions" in page and "/v1/tokenize" in page
    # Nothing loaded from elsewhere: no external src/href, no CSS imports or remote urls.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page)


# ------------------------------------------------------------------ keys


def test_api_key(run_dir: Path) -> None:
    loaded = load_model(run_dir)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=2)
    app = create_app(engine, loaded.tokenizer, model_name=NAME, api_key="s3cret")
    with ThreadServer(app) as server:
        for key, ok in [("unused", False), ("s3cre", False), ("s3cret", True)]:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            if ok:
                assert c.completions.create(model=NAME, prompt="a", max_tokens=1).choices
            else:
                with pytest.raises(openai.AuthenticationError):
                    c.completions.create(model=NAME, prompt="a", max_tokens=1)
        assert httpx.get(server.url + "/v1/models").status_code == 401
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic s3cret"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(server.url + "/v1/tokenize", json={"prompt": "a"}).status_code == 401
        assert httpx.get(server.url + "/").status_code == 200  # the page asks for the key
        assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------ disconnects and load


def wait_for(cond, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_50_disconnects_free_their_slots(served) -> None:  # type: ignore[no-untyped-def]
    url, engine, _, gate = served
    before = stats(url)
    gate.open.clear()  # no decoding step until every client has gone
    try:
        with httpx.Client(timeout=120) as c:
            for i in range(50):
                body = {"prompt": f"Client {i} says", "max_tokens": 40, "stream": True,
                        "temperature": 0.8}
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                # Leaving the block closes the connection mid-stream.
        wait_for(lambda: stats(url)["abandoned_total"] - before["abandoned_total"] == 50,
                 "the server to notice 50 disconnects")
    finally:
        gate.open.set()
    wait_for(lambda: (lambda s: (s["running"], s["waiting"], s["kv_cache_bytes"]))(stats(url))
             == (0, 0, 0), "slots, queue and cache back to empty")
    after = stats(url)
    # Each request got at most its first token and the one step that was waiting at the gate.
    assert after["tokens_total"] - before["tokens_total"] <= 2 * 50
    assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                      timeout=120).status_code == 200


def test_64_clients_without_server_errors(served) -> None:  # type: ignore[no-untyped-def]
    url = served[0]

    async def client(i: int, http: httpx.AsyncClient) -> list:
        statuses = []
        for j in range(2):
            body = {"prompt": f"Client {i} request {j}:", "max_tokens": 8 + (i + j) % 24,
                    "temperature": [0, 0.7, 1.2][(i + j) % 3], "seed": i, "top_k": i % 5,
                    "logprobs": [None, 0, 5][i % 3], "n": 1 + (i % 2)}
            if (i + j) % 4 == 0:
                r = await http.post(url + "/v1/completions", content=b'{"prompt": [1, "x"]}')
                statuses.append(("bad", r.status_code))
            if (i + j) % 2:
                async with http.stream("POST", url + "/v1/completions",
                                       json={**body, "stream": True}) as r:
                    text = (await r.aread()).decode()
                    assert text.endswith("data: [DONE]\n\n")
                    statuses.append(("stream", r.status_code))
            else:
                r = await http.post(url + "/v1/completions", json=body)
                assert len(r.json()["choices"]) == body["n"]
                statuses.append(("whole", r.status_code))
        return statuses

    async def main() -> list:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(client(i, http) for i in range(64)))

    results = [s for per_client in asyncio.run(main()) for s in per_client]
    assert all(code == (400 if kind == "bad" else 200) for kind, code in results), results
    assert len(results) == 64 * 2 + sum((i + j) % 4 == 0 for i in range(64) for j in range(2))
    wait_for(lambda: stats(url)["running"] == 0, "the batch to drain")
    assert stats(url)["status"] == "ok"
