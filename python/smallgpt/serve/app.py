"""The HTTP side: OpenAI's completions API, tokenizer endpoints and the playground page.

Routes (see :func:`create_app`):

* ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``POST /v1/completions``, streamed as server-sent events (``data: {...}`` chunks, then
  ``data: [DONE]``) with ``"stream": true``;
* ``POST /v1/tokenize``, ``POST /v1/detokenize`` and, where vLLM has them (lm-eval's remote
  tokenizer reads them), ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``;
* ``GET /v1/smallgpt/metrics`` (the run's training curves), ``GET /v1/smallgpt/stats`` and
  ``GET /health`` (slots, queue, cache);
* ``GET /``: the playground page.

``/v1/chat/completions`` answers 404: chat comes with chat fine-tuning. With an API key, every
``/v1`` and tokenizer route wants ``Authorization: Bearer KEY`` (compared in constant time);
``/``, ``/health`` and the page's static text are open.

Context: a prompt plus ``max_tokens`` must fit the model's context (``block_size``);
otherwise the answer is 400 ``context_length_exceeded``, as OpenAI answers (no silent
cropping: a crop would change what the model conditions on and the logprobs it reports).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smallgpt.serve.engine import Choice, Delta, Engine, PromptScores
from smallgpt.serve.engine import Request as EngineRequest
from smallgpt.serve.schemas import (
    MAX_CHOICES,
    APIError,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from smallgpt.serve.tokens import TextStream
from smallgpt.tokenizer import Tokenizer

__all__ = ["create_app", "page_html"]

log = logging.getLogger("smallgpt.serve")
_ids = random.Random()  # completion ids (uuid4 reads the OS's random source: slow under load)


def page_html() -> str:
    """The playground page (one file in the package, no external requests)."""
    return resources.files("smallgpt.serve").joinpath("static/index.html").read_text("utf-8")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status,
                    media_type="application/json")


@dataclass
class _Prompt:
    ids: List[int]  # what the model reads
    hidden: int  # leading ids not shown to the client (the <|endoftext|> added in front)
    text: str  # what echo shows


class _Server:
    """The routes' shared state: the engine, the tokenizer, the served name, the key."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 api_key: Optional[str], metrics_path: Optional[Path]) -> None:
        self.engine = engine
        self.tok = tokenizer
        self.table = engine.table
        self.name = model_name
        self.key = api_key.encode("utf-8") if api_key else None
        self.metrics_path = metrics_path
        self.created = int(time.time())
        self.page = page_html()

    # ------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Provide it in an "
                           "Authorization header using Bearer auth (Authorization: Bearer "
                           "YOUR_KEY).", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode("utf-8"), self.key):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                           f"`{self.name}`.", param="model", code="model_not_found")

    def encode(self, prompt: Any, add_special: bool) -> _Prompt:
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt, allowed_special="all")
            hidden = 0
            if add_special and self.engine.eos is not None:
                ids, hidden = [self.engine.eos] + ids, 1
            if not ids:
                raise APIError(400, "the prompt is empty and this tokenizer has no "
                               "<|endoftext|> token to start from", param="prompt")
            return _Prompt(ids, hidden, prompt)
        bad = [t for t in prompt if not 0 <= t < self.engine.vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range: this tokenizer has ids "
                           f"0..{self.engine.vocab - 1}", param="prompt")
        return _Prompt(list(prompt), 0, self.tok.decode(prompt))

    def check_context(self, prompts: List[_Prompt], max_tokens: int) -> None:
        block = self.engine.block_size
        for p in prompts:
            if len(p.ids) + max_tokens > block:
                raise APIError(400, f"This model's maximum context length is {block} tokens, "
                               f"however you requested {len(p.ids) + max_tokens} tokens "
                               f"({len(p.ids)} in your prompt; {max_tokens} for the "
                               "completion). Please reduce your prompt; or completion length.",
                               param="prompt", code="context_length_exceeded")

    # ------------------------------------------------------------------ logprobs objects

    def top_dict(self, top: Optional[List[Any]], chosen: int,
                 lp: Optional[float]) -> Optional[Dict[str, float]]:
        if lp is None:
            return None
        strings = self.table.strings
        d = {strings[i]: v for i, v in (top or [])}
        d.setdefault(strings[chosen], lp)
        return d

    def logprobs_obj(self, ids: List[int], lps: List[Optional[float]],
                     tops: List[Optional[List[Any]]], offsets: List[int]) -> Dict[str, Any]:
        """OpenAI's legacy completions ``logprobs`` object."""
        return {"tokens": [self.table.strings[t] for t in ids],
                "token_logprobs": lps,
                "top_logprobs": [self.top_dict(t, i, lp) for t, i, lp in zip(tops, ids, lps)],
                "text_offset": offsets}

    def prompt_logprobs(self, p: _Prompt, scores: PromptScores) -> Dict[str, Any]:
        ids = scores.token_ids[p.hidden:]
        lps = scores.logprobs[p.hidden:]
        tops = (scores.top or [[] for _ in scores.token_ids])[p.hidden:]
        stream = TextStream(self.table)
        offsets = []
        for t in ids:
            offsets.append(stream.chars)
            stream.push(t)
        return self.logprobs_obj(ids, lps, tops, offsets)


class _Completion:
    """One completions call: how its choices are turned into OpenAI's JSON."""

    def __init__(self, srv: _Server, r: CompletionRequest, prompts: List[_Prompt],
                 req: EngineRequest) -> None:
        self.srv, self.r, self.prompts, self.req = srv, r, prompts, req
        self.id = f"cmpl-{_ids.getrandbits(128):032x}"
        self.created = int(time.time())
        self.echo = bool(r.echo)
        self.completion_tokens = 0
        self.finished = False

    def close(self) -> None:
        """The response is over: if the request is not, its client went away."""
        if not self.finished:
            self.srv.engine.abandon(self.req)

    def choice_json(self, c: Choice, first: bool) -> Dict[str, Any]:
        """A choice, or a chunk of one (``first``: the chunk that carries the echo)."""
        p = self.prompts[c.index // self.req.n]
        base = len(p.text) if self.echo else 0
        text = (p.text if self.echo and first else "") + c.text
        logprobs = None
        if self.r.logprobs is not None:
            offsets = [o + base for o in c.offsets]
            tops: List[Any] = c.top or [[] for _ in c.token_ids]
            logprobs = self.srv.logprobs_obj(c.token_ids, list(c.logprobs or []), tops, offsets)
            if self.echo and first and c.prompt is not None:
                head = self.srv.prompt_logprobs(p, c.prompt)
                logprobs = {k: head[k] + logprobs[k] for k in logprobs}
        self.completion_tokens += len(c.token_ids)
        return {"index": c.index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    def usage(self) -> Dict[str, int]:
        prompt = sum(len(p.ids) for p in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def head(self) -> Dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.srv.name}

    async def whole(self) -> Dict[str, Any]:
        """Wait for every choice; the response object."""
        choices = [Choice(i) for i in range(self.req.n_choices)]
        left = len(choices)
        while left:
            for d in await self.req.outbox.get():
                if d.error is not None:
                    self.finished = True
                _raise_error(d)
                choices[d.index].add(d)
                left -= d.finish_reason is not None
        self.finished = True
        body = self.head()
        body["choices"] = [self.choice_json(c, True) for c in choices]
        body["usage"] = self.usage()
        return body

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per choice per batch of tokens (what piled up while
        the client was being written to goes out as one chunk), then ``[DONE]``."""
        opts = self.r.stream_options
        include_usage = bool(opts and opts.include_usage)
        running_usage = bool(opts and opts.continuous_usage_stats)
        started = set()
        left = self.req.n_choices
        box = self.req.outbox
        try:
            while left:
                batch = await box.get()
                while not box.empty():
                    batch = batch + box.get_nowait()
                merged: Dict[int, Choice] = {}
                for d in batch:
                    _raise_error(d)
                    merged.setdefault(d.index, Choice(d.index)).add(d)
                    left -= d.finish_reason is not None
                self.finished = left == 0  # a client leaving now has all its tokens
                for i in sorted(merged):
                    chunk = self.head()
                    chunk["choices"] = [self.choice_json(merged[i], i not in started)]
                    started.add(i)
                    if running_usage:
                        chunk["usage"] = self.usage()
                    elif include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
        except APIError as e:
            self.finished = True
            yield _sse(e.body())
        else:
            if include_usage:
                chunk = self.head()
                chunk["choices"], chunk["usage"] = [], self.usage()
                yield _sse(chunk)
        yield b"data: [DONE]\n\n"


def _raise_error(d: Delta) -> None:
    if d.error is not None:
        raise APIError(500, d.error, type="server_error")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _wait_disconnect(receive: Callable[[], Awaitable[Dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that stop, and free the request's slots, when the client goes."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._on_close()
            for t in (stream, watcher):
                t.cancel()
            failed = (await asyncio.gather(stream, watcher, return_exceptions=True))[0]
            if isinstance(failed, Exception) and not isinstance(failed, OSError):
                log.error("streaming a response failed", exc_info=failed)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _read_metrics(path: Optional[Path]) -> Dict[str, Any]:
    """Training curves from a run's ``metrics.jsonl`` (read on every call: a run that is still
    training shows its newest points)."""
    train: List[List[float]] = []
    val: List[Dict[str, float]] = []
    if path is not None and path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict) or not _num(rec.get("step")):
                    continue
                if _num(rec.get("loss")):
                    train.append([rec["step"], rec["loss"]])
                if _num(rec.get("val_loss")) or _num(rec.get("val_bpb")):
                    val.append({k: rec[k] for k in ("step", "val_loss", "val_bpb")
                                if _num(rec.get(k))})
    return {"object": "smallgpt.metrics", "source": str(path) if path else None,
            "train": train, "val": val}


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def create_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str,
               api_key: Optional[str] = None, metrics_path: Optional[Path] = None) -> FastAPI:
    """The ASGI app serving ``engine`` (started and stopped with the app's lifespan).

    ``metrics_path``: the run's ``metrics.jsonl`` for the page's training curves (None for a
    model that is not a run folder).
    """
    srv = _Server(engine, tokenizer, model_name, api_key, metrics_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="smallgpt-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    _add_error_handlers(app)
    _add_info_routes(app, srv)
    _add_tokenizer_routes(app, srv)
    _add_completion_routes(app, srv)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return _json(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404:
            err = APIError(404, f"Invalid URL ({request.method} {request.url.path})",
                           code="unknown_url")
        elif e.status_code == 405:
            err = APIError(405, f"Method not allowed ({request.method} {request.url.path})",
                           code="method_not_allowed")
        else:
            err = APIError(e.status_code, str(e.detail))
        return _json(err.body(), err.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> Response:
        err = APIError(500, f"The server had an error: {type(e).__name__}",
                       type="server_error")
        return _json(err.body(), 500)


def _add_info_routes(app: FastAPI, srv: _Server) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(srv.page)

    @app.get("/health")
    async def health() -> Response:
        alive = srv.engine.alive
        return _json({"status": "ok" if alive else "error", **srv.engine.stats()},
                     200 if alive else 503)

    def model_obj() -> Dict[str, Any]:
        return {"id": srv.name, "object": "model", "created": srv.created,
                "owned_by": "smallgpt", "max_model_len": srv.engine.block_size}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        srv.authorize(request)
        return _json({"object": "list", "data": [model_obj()]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        srv.authorize(request)
        srv.check_model(model)
        return _json(model_obj())

    @app.get("/v1/smallgpt/stats")
    async def stats(request: Request) -> Response:
        srv.authorize(request)
        return _json(srv.engine.stats())

    @app.get("/v1/smallgpt/metrics")
    async def metrics(request: Request) -> Response:
        srv.authorize(request)
        return _json(await asyncio.get_running_loop().run_in_executor(
            None, _read_metrics, srv.metrics_path))

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat(request: Request) -> Response:
        raise APIError(404, "Chat completions are not available: this is a base model, and "
                       "smallgpt-serve gains /v1/chat/completions with chat fine-tuning. Use "
                       "/v1/completions with a text prompt.", code="chat_not_supported")


def _add_tokenizer_routes(app: FastAPI, srv: _Server) -> None:
    async def tokenize(request: Request) -> Response:
        srv.authorize(request)
        r = parse(TokenizeRequest, await request.body())
        srv.check_model(r.model)
        ids = srv.tok.encode(r.prompt, allowed_special="all")
        if r.add_special_tokens and srv.engine.eos is not None:
            ids = [srv.engine.eos] + ids
        strs = [srv.table.strings[t] for t in ids] if r.return_token_strs else None
        return _json({"count": len(ids), "max_model_len": srv.engine.block_size,
                      "tokens": ids, "token_strs": strs})

    async def detokenize(request: Request) -> Response:
        srv.authorize(request)
        r = parse(DetokenizeRequest, await request.body())
        srv.check_model(r.model)
        srv.encode(r.tokens, False)  # range check
        return _json({"prompt": srv.tok.decode(r.tokens)})

    async def tokenizer_info(request: Request) -> Response:
        srv.authorize(request)
        eos = "<|endoftext|>" if srv.engine.eos is not None else None
        return _json({"tokenizer_class": "smallgpt.Tokenizer", "eos_token": eos,
                      "bos_token": eos, "pad_token": None, "vocab_size": srv.engine.vocab,
                      "model_max_length": srv.engine.block_size})

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/tokenize", tokenize, methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])


def _add_completion_routes(app: FastAPI, srv: _Server) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        srv.authorize(request)
        r = parse(CompletionRequest, await request.body())
        srv.check_model(r.model)
        params = r.sampling()
        texts = r.prompts()
        n = r.n or 1
        if len(texts) * n > MAX_CHOICES:
            raise APIError(400, f"{len(texts)} prompts x n = {n} is over the limit of "
                           f"{MAX_CHOICES} choices per request", param="n")
        add_special = r.add_special_tokens is not False
        prompts = [srv.encode(t, add_special) for t in texts]
        srv.check_context(prompts, params.max_tokens)
        echo = bool(r.echo) and (params.logprobs is not None or params.max_tokens == 0)
        req = EngineRequest.for_asyncio([p.ids for p in prompts], params, n, echo=echo)
        if not srv.engine.alive:
            raise APIError(503, "the model's engine is not running (see the server's log)",
                           type="server_error")
        try:
            srv.engine.submit(req)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        call = _Completion(srv, r, prompts, req)
        if r.stream:
            return _EventStream(call.events(), call.close)
        return await _until_disconnect(request, call)


async def _until_disconnect(request: Request, call: _Completion) -> Response:
    """The whole completion; if the client goes first, drop the request (freeing its slots)."""
    task = asyncio.ensure_future(call.whole())
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        call.close()
    if task.cancelled():
        return Response(status_code=499)
    return _json(task.result())
