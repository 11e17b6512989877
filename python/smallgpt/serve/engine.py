"""The scheduler: one thread owns the model and decodes every running sequence at once.

Continuous batching. Requests wait in a queue; between two decoding steps the engine admits
as many waiting sequences as there are free slots (running each prompt once, its "prefill"),
and after every step it retires the sequences that finished or whose client went away. So a
new request starts at the next step instead of after the others, and one forward pass serves
up to ``max_batch`` sequences. Each sequence keeps its own length in one shared key/value
cache (:meth:`smallgpt.model.GPT.decode_step` with ``positions=``): row ``i`` of the cache is
running sequence ``i``, and a finished sequence's row is filled with the last one's so the
running rows stay ``0 .. n-1``.

Sampling is per sequence: its own temperature, top-k, top-p, min-p, repetition penalty (the
warpers of :mod:`smallgpt.generate`, applied in the same order) and its own seeded
``torch.Generator``, so a seeded request gives the same text alone or among others. A row's
token is drawn by inverting its cumulative distribution at one uniform number from its
generator (:func:`sample_rows`): the distribution of ``torch.multinomial``, which costs far
more per row, but not its random stream, so a seed does not reproduce
``smallgpt-sample --seed`` text. Greedy rows take the arg-max of the same logits.
Log-probabilities are those of the model's own distribution (before temperature and
filtering), as OpenAI reports them.

The cache grows (doubling) with what the running sequences need and is freed when the
engine is idle. Results go back in batches of :class:`Delta`, one call per event loop per
step (:meth:`asyncio.loop.call_soon_threadsafe`), or into a thread-safe queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from smallgpt.generate import apply_repetition_penalty, process_logits
from smallgpt.model import GPT, KVCache
from smallgpt.serve.tokens import TextStream, TokenTable
from smallgpt.tokenizer import Tokenizer

__all__ = ["Choice", "Delta", "Engine", "PromptScores", "Request", "SamplingParams",
           "sample_rows"]

log = logging.getLogger("smallgpt.serve")

TopList = List[Tuple[int, float]]
_STOP = object()


@dataclass(frozen=True)
class SamplingParams:
    """How one request's sequences are continued (see :func:`smallgpt.generate.generate`).

    ``max_tokens = 0`` only scores the prompt (with an echoing request). ``logprobs``: the
    number of alternatives to report per token (``None``: no log-probabilities). ``seed``:
    choice ``c`` of the request draws from a generator seeded with ``seed + c``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    stop: Tuple[str, ...] = ()
    logprobs: Optional[int] = None
    seed: Optional[int] = None

    @property
    def warpers(self) -> Tuple[float, Optional[int], Optional[float], Optional[float]]:
        """What decides the sampling distribution after the repetition penalty (sequences
        that agree on it are processed together)."""
        return (self.temperature, self.top_k, self.top_p, self.min_p)


@dataclass
class PromptScores:
    """The prompt's own tokens, each with its log-probability given the tokens before it
    (``None`` for the first, which nothing predicts) and its top alternatives there."""

    token_ids: List[int]
    logprobs: List[Optional[float]]
    top: Optional[List[Optional[TopList]]]


@dataclass
class Delta:
    """What one choice produced in one step: tokens, released text, and how it ended.

    ``logprobs``/``top`` are lists when the request asked for log-probabilities;
    ``offsets`` are the tokens' character offsets in the choice's generated text;
    ``prompt`` comes with a choice's first delta when the request echoes with logprobs.
    ``error`` ends the whole request.
    """

    index: int
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[float]] = None
    top: Optional[List[TopList]] = None
    offsets: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt: Optional[PromptScores] = None
    error: Optional[str] = None


@dataclass
class Choice:
    """A choice put together from its deltas (:meth:`add`)."""

    index: int
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[float]] = None
    top: Optional[List[TopList]] = None
    offsets: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt: Optional[PromptScores] = None

    def add(self, d: Delta) -> None:
        """Append one delta of this choice."""
        self.text += d.text
        self.token_ids += d.token_ids
        self.offsets += d.offsets
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
            self.top = (self.top or []) + (d.top or [])
        if d.prompt is not None:
            self.prompt = d.prompt
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


class Request:
    """One API call: prompts (token ids), ``n`` choices each, one set of sampling settings.

    Choice ``p * n + i`` is the ``i``-th continuation of prompt ``p`` (OpenAI's order).
    Results arrive in ``outbox`` as lists of :class:`Delta`: an ``asyncio.Queue`` of
    ``loop`` (:meth:`for_asyncio`), or a thread-safe queue. ``echo`` asks for the prompt's
    own log-probabilities (:class:`PromptScores`, with ``params.logprobs`` alternatives).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1,
                 *, echo: bool = False, loop: Optional[asyncio.AbstractEventLoop] = None,
                 outbox: Any = None) -> None:
        self.prompts = [list(p) for p in prompts]
        self.params = params
        self.n = n
        self.echo = echo
        self.loop = loop
        self.outbox = outbox if outbox is not None else queue.SimpleQueue()
        self.cancelled = False

    @classmethod
    def for_asyncio(cls, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    n: int = 1, *, echo: bool = False) -> Request:
        """A request whose results arrive in an ``asyncio.Queue`` of the running loop."""
        return cls(prompts, params, n, echo=echo, loop=asyncio.get_running_loop(),
                   outbox=asyncio.Queue())

    @property
    def n_choices(self) -> int:
        """How many choices the request has."""
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """Give up (the client went away): its sequences are dropped at the next step."""
        self.cancelled = True


@dataclass
class _Group:
    """Waiting choices of one prompt (admitted together, prefilled once)."""

    req: Request
    prompt: List[int]
    choices: List[int]
    scores: Optional[PromptScores] = None


class _Seq:
    """One running choice: its cache row is its index in ``Engine._running``."""

    def __init__(self, req: Request, index: int, prompt: List[int], table: TokenTable,
                 device: torch.device, seed: int, scores: Optional[PromptScores]) -> None:
        p = req.params
        self.req, self.index, self.params = req, index, p
        self.length = len(prompt)  # positions in the cache
        self.last = -1  # the newest token, fed at the next step
        self.generated = 0
        self.text = TextStream(table, p.stop)
        self.finish: Optional[str] = None
        self.scores = scores
        self.gen: Optional[torch.Generator] = None
        if p.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(seed)
        self.history: Optional[torch.Tensor] = None
        if p.repetition_penalty != 1.0:
            self.history = torch.tensor(prompt + [0] * p.max_tokens, device=device)[None]
        self.seen = len(prompt)

    def accept(self, token: int, info: Optional[Tuple[float, TopList]],
               eos: Optional[int]) -> Delta:
        """Take the next token; the delta it makes."""
        d = Delta(self.index, token_ids=[token], offsets=[self.text.chars], prompt=self.scores)
        self.scores = None
        if info is not None:
            d.logprobs, d.top = [info[0]], [info[1]]
        self.last = token
        self.generated += 1
        if self.history is not None:
            self.history[0, self.seen] = token
            self.seen += 1
        stopped = False
        if token == eos:
            self.finish = "stop"
        else:
            d.text, stopped = self.text.push(token)
            if stopped:
                self.finish = "stop"
        if self.finish is None and self.generated >= self.params.max_tokens:
            self.finish = "length"
        if self.finish is not None:
            if not stopped:
                d.text += self.text.flush()
            d.finish_reason = self.finish
        return d


class _SlotCache:
    """The shared key/value cache: grown by doubling to what the running sequences need,
    freed when nothing runs."""

    def __init__(self, model: GPT, max_slots: int) -> None:
        self.model = model
        self.max_slots = max_slots
        self.kv: Optional[KVCache] = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        if self.kv is None:
            return 0
        return 2 * self.kv.k.numel() * self.kv.k.element_size()

    def reserve(self, slots: int, length: int, keep: int) -> None:
        """Room for ``slots`` rows of ``length`` positions; rows ``0 .. keep-1`` are kept."""
        kv = self.kv
        have_s, have_l = (kv.batch_size, kv.max_len) if kv is not None else (0, 0)
        if slots <= have_s and length <= have_l:
            return
        block = self.model.config.block_size
        new_s = have_s if slots <= have_s else min(self.max_slots, max(slots, 2 * have_s, 4))
        new_l = have_l if length <= have_l else min(block, max(length, 2 * have_l, 64))
        new = self.model.new_cache(new_s, new_l)
        if kv is not None and keep:
            new.k[:, :keep, :, :have_l] = kv.k[:, :keep]
            new.v[:, :keep, :, :have_l] = kv.v[:, :keep]
        self.kv = new

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows ``start .. stop-1``."""
        assert self.kv is not None
        return self.kv.rows(start, stop)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Row ``dst`` := the first ``length`` positions of row ``src``."""
        assert self.kv is not None
        self.kv.k[:, dst, :, :length] = self.kv.k[:, src, :, :length]
        self.kv.v[:, dst, :, :length] = self.kv.v[:, src, :, :length]

    def release(self) -> None:
        """Free the memory (the next request allocates again)."""
        self.kv = None


def sample_rows(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``(B, V)`` by inverting its cumulative distribution at
    ``uniform`` ``(B,)`` (each in [0, 1), drawn from the row's own generator).

    The same distribution as ``torch.multinomial(probs, 1)``, at a fraction of its cost per
    row (one random number per row, then batched ops): a server samples every row of every
    step from its own generator. Tokens of probability 0 are never picked.
    """
    cdf = probs.double().cumsum(dim=-1)
    target = (uniform.to(cdf) * cdf[:, -1])[:, None]
    picks = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    # Rounding can put the target at the very end: take the last token that has probability.
    bad = probs.gather(1, picks[:, None])[:, 0] <= 0
    if bool(bad.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
        picks = torch.where(bad, last, picks)
    return picks


def _put_all(items: List[Tuple[Any, List[Delta]]]) -> None:
    for box, deltas in items:
        box.put_nowait(deltas)


class Engine:
    """Continuous batching over one model (see the module docstring).

    ``submit`` a :class:`Request` from any thread; :meth:`start` runs the scheduler thread
    and :meth:`stop` ends it (requests still there get an error). ``max_batch``: sequences
    decoded together at most (1 = one request at a time). ``prefill_budget``: prompt tokens
    admitted per step at most (at least one prompt), so a burst of new requests does not
    stall the running ones for long. ``autocast_dtype``: run the model under autocast to it
    (the server converts the weights instead; the harness keeps fp32 weights).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 32,
                 prefill_budget: Optional[int] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                             f"only {model.config.vocab_size}")
        self.model = model.eval()
        self.table = TokenTable(tokenizer)
        self.vocab = tokenizer.vocab_size
        self.eos = tokenizer.eot_id
        self.block_size = model.config.block_size
        self.max_batch = max_batch
        self.autocast_dtype = autocast_dtype
        self.prefill_budget = prefill_budget or max(self.block_size, 1024)
        self.device = model.transformer.wte.weight.device
        self._plan = model.decode_plan()
        self._cache = _SlotCache(model, max_batch)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque = deque()
        self._running: List[_Seq] = []
        self._outbox: Dict[Request, List[Delta]] = {}
        self._seeds = random.Random()
        self._thread: Optional[threading.Thread] = None
        self._n_waiting = 0
        self.requests_total = 0
        self.tokens_total = 0
        self.peak_running = 0
        self.abandoned_total = 0

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the scheduler thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="smallgpt-engine",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """End the scheduler thread; requests still queued or running get an error."""
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: Request) -> None:
        """Queue a request (checked here: ``ValueError`` for what the model cannot run)."""
        self.check(req.prompts, req.params, req.n, req.echo)
        self.requests_total += 1
        self._inbox.put(req)

    def abandon(self, req: Request) -> None:
        """The client of an unfinished request went away: drop it at the next step (counted
        in ``stats()["abandoned_total"]``)."""
        if not req.cancelled:
            req.cancel()
            self.abandoned_total += 1

    def check(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int,
              echo: bool) -> None:
        """``ValueError`` unless every prompt fits the context with ``max_tokens`` more."""
        if n < 1 or not prompts:
            raise ValueError("a request needs at least one prompt and n >= 1")
        if params.max_tokens < (0 if echo else 1):
            raise ValueError("max_tokens must be >= 1 (or 0 when echoing the prompt)")
        for p in prompts:
            if not p:
                raise ValueError("a prompt is empty")
            if min(p) < 0 or max(p) >= self.vocab:
                raise ValueError(f"token ids must be in [0, {self.vocab})")
            if len(p) + params.max_tokens > self.block_size:
                raise ValueError(f"{len(p)} prompt tokens + {params.max_tokens} new ones "
                                 f"exceed the context of {self.block_size}")

    def stats(self) -> Dict[str, int]:
        """Slots, queue and cache, for monitoring (read without locks: a snapshot)."""
        return {"max_batch": self.max_batch, "running": len(self._running),
                "waiting": self._n_waiting + self._inbox.qsize(),
                "kv_cache_bytes": self._cache.nbytes, "requests_total": self.requests_total,
                "tokens_total": self.tokens_total, "peak_running": self.peak_running,
                "abandoned_total": self.abandoned_total}

    def complete(self, req: Request, timeout: Optional[float] = None) -> List[Choice]:
        """Submit ``req`` (made without a loop) and wait for its choices."""
        self.submit(req)
        choices = [Choice(i) for i in range(req.n_choices)]
        left = req.n_choices
        while left:
            for d in req.outbox.get(timeout=timeout):
                if d.error is not None:
                    raise RuntimeError(d.error)
                choices[d.index].add(d)
                left -= d.finish_reason is not None
        return choices

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        # Autocast is per thread: a caller's context does not reach this one.
        amp = self.autocast_dtype not in (None, torch.float32)
        with torch.inference_mode(), torch.autocast(self.device.type, self.autocast_dtype,
                                                    enabled=amp):
            while self._take_inbox():
                try:
                    self._retire()
                    self._admit()
                    self._retire()
                    if self._running:
                        self._decode()
                except Exception as e:  # a failed step must not end the server
                    log.exception("decoding step failed")
                    self._fail_all(f"the model failed: {type(e).__name__}: {e}")
                self._flush()
            while True:  # requests that came in after the stop
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Request):
                    self._emit(item, Delta(-1, error="the server is shutting down"))
            self._fail_all("the server is shutting down")
            self._flush()

    def _take_inbox(self) -> bool:
        """Move new requests to the waiting queue; block while there is nothing to do.
        False once stopped."""
        block = not self._running and not self._waiting
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            if isinstance(item, Request) and not item.cancelled:
                for p, prompt in enumerate(item.prompts):
                    choices = [p * item.n + i for i in range(item.n)]
                    self._waiting.append(_Group(item, prompt, choices))
                    self._n_waiting += item.n
            block = False

    def _retire(self) -> None:
        """Drop finished and abandoned sequences (the last row fills each hole) and the
        waiting groups of abandoned requests; free the cache when idle."""
        run = self._running
        i = 0
        while i < len(run):
            s = run[i]
            if s.finish is None and not s.req.cancelled:
                i += 1
                continue
            last = run.pop()
            if i < len(run):
                self._cache.copy(len(run), i, last.length)
                run[i] = last
        if any(g.req.cancelled for g in self._waiting):
            kept = [g for g in self._waiting if not g.req.cancelled]
            self._n_waiting = sum(len(g.choices) for g in kept)
            self._waiting = deque(kept)
        if not run and not self._waiting:
            self._cache.release()

    def _admit(self) -> None:
        budget = self.prefill_budget
        while self._waiting and len(self._running) < self.max_batch and budget > 0:
            g = self._waiting[0]
            free = self.max_batch - len(self._running)
            take, g.choices = g.choices[:free], g.choices[free:]
            if not g.choices:
                self._waiting.popleft()
            self._n_waiting -= len(take)
            budget -= len(g.prompt)
            self._prefill(g, take)
        self.peak_running = max(self.peak_running, len(self._running))

    def _prefill(self, g: _Group, choices: List[int]) -> None:
        """Run a prompt once into the next free row, copy it to the other choices' rows,
        and pick every choice's first token."""
        req, prompt, p = g.req, g.prompt, g.req.params
        first, k = len(self._running), len(choices)
        self._cache.reserve(first + k, len(prompt) + max(p.max_tokens - 1, 0), keep=first)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        h = self.model.hidden_states(ids, self._cache.rows(first, first + 1))[0]
        if req.echo and g.scores is None:
            g.scores = self._prompt_scores(prompt, h, p.logprobs)
        if p.max_tokens == 0:
            for c in choices:
                self._emit(req, Delta(c, finish_reason="length", prompt=g.scores))
            return
        logits = self.model.head_logits(h[-1:]).float()[:, : self.vocab]
        seqs = []
        for j, c in enumerate(choices):
            if j:
                self._cache.copy(first, first + j, len(prompt))
            seed = (p.seed if p.seed is not None else self._seeds.getrandbits(62)) + c
            seqs.append(_Seq(req, c, prompt, self.table, self.device, seed, g.scores))
        self._running.extend(seqs)
        self._step_tokens(seqs, logits.expand(k, -1))

    def _prompt_scores(self, prompt: List[int], h: torch.Tensor,
                       k: Optional[int]) -> PromptScores:
        logits = self.model.head_logits(h[:-1]).float()[:, : self.vocab]
        lp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(prompt[1:], dtype=torch.long, device=lp.device)
        chosen: List[Optional[float]] = [None]
        chosen += lp.gather(1, target[:, None])[:, 0].tolist()
        top: Optional[List[Optional[TopList]]] = None
        if k:
            vals, ids = lp.topk(min(k, self.vocab), dim=-1)
            top = [None] + [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        return PromptScores(list(prompt), chosen, top)

    def _decode(self) -> None:
        seqs = self._running
        idx = torch.tensor([[s.last] for s in seqs], dtype=torch.long, device=self.device)
        positions = [s.length for s in seqs]
        logits = self.model.decode_step(idx, self._cache.rows(0, len(seqs)), self._plan,
                                        positions=positions)
        for s in seqs:
            s.length += 1
        self._step_tokens(seqs, logits.float()[:, : self.vocab])

    def _step_tokens(self, seqs: List[_Seq], logits: torch.Tensor) -> None:
        tokens = self._choose(seqs, logits)
        infos = self._logprobs(seqs, logits, tokens)
        for s, t, info in zip(seqs, tokens, infos):
            self._emit(s.req, s.accept(t, info, self.eos))
        self.tokens_total += len(seqs)

    # ------------------------------------------------------------------ sampling

    def _choose(self, seqs: List[_Seq], logits: torch.Tensor) -> List[int]:
        """Each sequence's next token, by its own settings and generator."""
        if all(s.gen is None and s.history is None for s in seqs):
            return logits.argmax(dim=-1).tolist()
        work = logits
        if any(s.history is not None for s in seqs):
            work = logits.clone()
            for i, s in enumerate(seqs):
                if s.history is not None:
                    work[i] = apply_repetition_penalty(work[i : i + 1], s.history[:, : s.seen],
                                                       s.params.repetition_penalty)[0]
        picks = work.argmax(dim=-1).tolist()
        groups: Dict[Tuple[Any, ...], List[int]] = {}
        for i, s in enumerate(seqs):
            if s.gen is not None:
                groups.setdefault(s.params.warpers, []).append(i)
        for (temperature, top_k, top_p, min_p), rows in groups.items():
            sub = work if len(rows) == len(seqs) else work[rows]
            probs = torch.softmax(process_logits(
                sub, sub[:, :0].long(), temperature=temperature, top_k=top_k, top_p=top_p,
                min_p=min_p), dim=-1)
            uniform = torch.cat([torch.rand(1, generator=seqs[i].gen, dtype=torch.float64,
                                            device=probs.device) for i in rows])
            for i, t in zip(rows, sample_rows(probs, uniform).tolist()):
                picks[i] = t
        return picks

    def _logprobs(self, seqs: List[_Seq], logits: torch.Tensor,
                  tokens: List[int]) -> List[Optional[Tuple[float, TopList]]]:
        """The chosen tokens' log-probabilities and top alternatives, for the sequences
        that asked."""
        out: List[Optional[Tuple[float, TopList]]] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not want:
            return out
        sub = logits if len(want) == len(seqs) else logits[want]
        lp = torch.log_softmax(sub, dim=-1)
        picked = torch.tensor([tokens[i] for i in want], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, picked[:, None])[:, 0].tolist()
        k = min(max(seqs[i].params.logprobs or 0 for i in want), self.vocab)
        ids: List[List[int]] = [[] for _ in want]
        vals: List[List[float]] = [[] for _ in want]
        if k:
            top = lp.topk(k, dim=-1)
            ids, vals = top.indices.tolist(), top.values.tolist()
        for j, i in enumerate(want):
            kk = seqs[i].params.logprobs or 0
            out[i] = (chosen[j], list(zip(ids[j][:kk], vals[j][:kk])))
        return out

    # ------------------------------------------------------------------ results

    def _emit(self, req: Request, delta: Delta) -> None:
        self._outbox.setdefault(req, []).append(delta)

    def _fail_all(self, message: str) -> None:
        """End every queued and running request with an error."""
        reqs = {s.req: None for s in self._running}
        reqs.update({g.req: None for g in self._waiting})
        for req in reqs:
            self._emit(req, Delta(-1, error=message))
        self._running.clear()
        self._waiting.clear()
        self._n_waiting = 0
        self._cache.release()

    def _flush(self) -> None:
        """Hand this step's deltas over: one call per event loop."""
        if not self._outbox:
            return
        by_loop: Dict[asyncio.AbstractEventLoop, List[Tuple[Any, List[Delta]]]] = {}
        for req, deltas in self._outbox.items():
            if req.cancelled:
                continue
            if req.loop is None:
                req.outbox.put(deltas)
            else:
                by_loop.setdefault(req.loop, []).append((req.outbox, deltas))
        self._outbox = {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
