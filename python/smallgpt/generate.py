"""Text generation for :class:`smallgpt.model.GPT`: sampling, greedy, beam search, streaming.

Entry points:

* :func:`generate` (also ``model.generate``) returns a LongTensor ``(B*, T + new)``.
* :func:`generate_stream` (also ``model.generate_stream``) yields the new tokens step by step.
* :func:`stream_text` / :func:`generate_text` work on text: they decode incrementally and cut
  the output exactly at a stop string.

Decoding rules follow Hugging Face ``transformers`` so results can be compared token for
token: the repetition penalty is applied first, then the sampling warpers in the order
temperature -> top-k -> top-p -> min-p; ``temperature=0`` is greedy decoding; beam search
reproduces ``GenerationMixin``'s beam search (length penalty, ``early_stopping``).

KV cache: the prompt is run once ("prefill") into a preallocated :class:`~smallgpt.model.KVCache`
and then one token is fed per step. The context is at most ``block_size`` tokens: a longer
prompt is cropped to its last ``block_size`` tokens. Without the cache every step reads the
last ``block_size`` tokens (a sliding window). With the cache, when it is full it is rebuilt
from the last ``block_size // 2`` tokens (one prefill), so decoding past the context keeps a
low per-token cost; from that point the cached and uncached outputs may differ. Within the
context they are identical (greedy, fp32).

Stop strings need a way to turn tokens into text: pass ``decode`` (a callable mapping a list of
token ids to ``str``, e.g. ``tokenizer.decode``) to :func:`generate` / :func:`generate_stream`,
or ``decode_bytes`` (e.g. ``tokenizer.decode_bytes``) to the text functions.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from smallgpt.model import GPT, DecodePlan, KVCache

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "generate",
    "generate_stream",
    "generate_text",
    "min_p_filter",
    "process_logits",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
]

_NEG = -1.0e9  # transformers' "very unlikely" score in beam search; kept for identical ties

Decode = Callable[[list], str]
DecodeBytes = Callable[[list], bytes]


# ---------------------------------------------------------------------------- logits warpers


def apply_repetition_penalty(
    logits: torch.Tensor, seqs: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style repetition penalty on every token id that occurs in ``seqs``.

    Positive scores are divided by ``penalty`` and negative ones multiplied by it, so
    ``penalty > 1`` makes repeats less likely. ``logits``: ``(B, V)``, ``seqs``: ``(B, T)``.
    """
    if penalty == 1.0 or seqs.shape[1] == 0:
        return logits
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, seqs, seen)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` (> 0)."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the ``k`` highest logits per row (ties with the k-th are kept), others -> -inf."""
    k = min(max(k, min_keep), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens whose total probability reaches ``p``.

    A token is dropped when the probability mass of all tokens less likely than or as likely as
    it (in sorted order) is at most ``1 - p``; the ``min_keep`` most likely tokens always stay.
    """
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1, descending=False)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = tail_mass <= (1.0 - p)
    drop_sorted[..., -min_keep:] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep tokens whose probability is at least ``p`` times the top token's probability."""
    probs = logits.softmax(dim=-1)
    threshold = p * probs.amax(dim=-1, keepdim=True)
    drop = probs < threshold
    keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    drop = drop.scatter(-1, keep, False)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    seqs: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Repetition penalty, then temperature -> top-k -> top-p -> min-p (sampling only).

    With ``temperature == 0`` (greedy) only the repetition penalty is applied.
    """
    logits = apply_repetition_penalty(logits, seqs, repetition_penalty)
    if temperature == 0:
        return logits
    logits = apply_temperature(logits, temperature)
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return logits


# ---------------------------------------------------------------------------- settings


@dataclass
class _Settings:
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float
    eos_token_id: int | None
    stop: tuple[str, ...]
    decode: Decode | None
    pad: int
    vocab_limit: int | None = None


def _settings(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float,
    num_beams: int,
    num_samples: int,
    eos_token_id: int | None,
    stop: Union[str, Sequence[str], None],
    decode: Decode | None,
    pad_token_id: int | None,
    vocab_limit: int | None = None,
) -> _Settings:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if not repetition_penalty > 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if num_beams > 1 and num_samples > num_beams:
        raise ValueError(f"num_samples ({num_samples}) cannot exceed num_beams ({num_beams})")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    else:
        stops = tuple(stop)
    if any(not isinstance(s, str) or s == "" for s in stops):
        raise ValueError("stop strings must be non-empty strings")
    if stops and decode is None:
        raise ValueError("stop strings need decode= (a function from token ids to text)")
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(
            vocab_limit, int) or vocab_limit < 1):
        raise ValueError(f"vocab_limit must be a positive integer, got {vocab_limit!r}")
    if pad_token_id is not None:
        pad = pad_token_id
    elif eos_token_id is not None:
        pad = eos_token_id
    else:
        pad = 0
    return _Settings(temperature, top_k or None, top_p, min_p, float(repetition_penalty),
                     eos_token_id, stops, decode, pad, vocab_limit)


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    # seed=None draws from torch's global RNG, so torch.manual_seed() also reproduces a run.
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _stop_hit(tail_text: str, stops: tuple[str, ...]) -> bool:
    return any(s in tail_text for s in stops)


class _Stepper:
    """Runs the model one position at a time, with or without a KV cache.

    ``logits(seqs)`` returns the next-token logits (float32, ``(B, V)``) for the sequences
    ``seqs`` (``(B, L)``, the whole history); with the cache only the positions not yet seen
    are fed.
    """

    def __init__(
        self, model: GPT, use_cache: bool, vocab_limit: int | None = None,
        total_len: int | None = None,
    ) -> None:
        self.model = model
        # The cache never needs more positions than the whole output (nor than the context).
        self.cache_len = min(model.config.block_size, total_len or model.config.block_size)
        self.vocab_limit = vocab_limit
        self.block = model.config.block_size
        self.cache: KVCache | None = None
        self.use_cache = use_cache
        self.seen = 0  # length of the history already in the cache
        self.plan: DecodePlan | None = None

    def _last_logits(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        h = self.model.hidden_states(idx, cache)
        # The head as GPT.forward and decode_step apply it: soft-capped where the model is.
        logits = self.model._softcap(self.model.lm_head(h[:, -1, :])).float()
        return logits if self.vocab_limit is None else logits[:, : self.vocab_limit]

    def logits(self, seqs: torch.Tensor) -> torch.Tensor:
        if not self.use_cache:
            return self._last_logits(seqs[:, -self.block :], None)
        length = seqs.shape[1]
        if self.cache is None:
            self.cache = self.model.new_cache(seqs.shape[0], self.cache_len)
            return self._prefill(seqs)
        new = seqs[:, self.seen :]
        if self.cache.pos + new.shape[1] > self.cache.max_len:
            return self._prefill(seqs, keep=max(1, self.block // 2))
        self.seen = length
        if new.shape[1] == 1:
            if self.plan is None:
                self.plan = self.model.decode_plan()
            logits = self.model.decode_step(new, self.cache, self.plan).float()
            return logits if self.vocab_limit is None else logits[:, : self.vocab_limit]
        return self._last_logits(new, self.cache)

    def _prefill(self, seqs: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        assert self.cache is not None
        window = seqs[:, -(keep or self.block) :]
        self.cache.reset()
        self.seen = seqs.shape[1]
        return self._last_logits(window, self.cache)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def _check_idx(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise ValueError("idx must be a (batch, time) tensor of token ids")
    if idx.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. a BOS/eot token)")
    if idx.dtype != torch.long:
        idx = idx.long()
    vocab = model.config.vocab_size
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab})")
    return idx.to(model.transformer.wte.weight.device)


class _EvalMode:
    """Switch off dropout for the duration of generation, then restore the mode."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# ---------------------------------------------------------------------------- sampling


def _sample_steps(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    s: _Settings,
    generator: torch.Generator | None,
    use_cache: bool,
    ends: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy/sampling loop. Yields the next token of every row ``(B,)``.

    Rows that finished earlier (eos or stop string) yield ``s.pad``. The loop ends early when
    every row is finished. If given, ``ends`` ``(B,)`` receives for each finished row the
    number of new tokens it produced (the eos/stop token included).
    """
    B, T = idx.shape
    # The history grows with the tokens produced, never to max_new_tokens up front.
    seqs = _grow(idx.clone(), T + min(max_new_tokens, 256), s.pad)
    stepper = _Stepper(model, use_cache, s.vocab_limit, T + max_new_tokens)
    max_stop = max((len(x.encode("utf-8")) for x in s.stop), default=0)
    can_finish = s.eos_token_id is not None or bool(s.stop)
    state = {"finished": torch.zeros(B, dtype=torch.bool, device=idx.device), "seqs": seqs}

    # One step under inference mode (cheaper per op than no_grad, which matters at one token
    # per step); the mode is entered per step so that it never leaks to the caller's code
    # between yields, and what is yielded is an ordinary tensor.
    @torch.inference_mode()
    def advance(step: int) -> tuple[torch.Tensor, bool]:
        cur = T + step
        finished = state["finished"]
        seqs = state["seqs"] = _grow(state["seqs"], cur + 1, s.pad)
        logits = stepper.logits(seqs[:, :cur])
        logits = process_logits(
            logits, seqs[:, :cur], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            min_p=s.min_p, repetition_penalty=s.repetition_penalty,
        )
        if s.temperature == 0:
            nxt = torch.argmax(logits, dim=-1)
        else:
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if not can_finish:
            seqs[:, cur] = nxt
            return nxt, False
        nxt = torch.where(finished, torch.full_like(nxt, s.pad), nxt)
        was_finished = finished.clone()
        seqs[:, cur] = nxt
        if s.eos_token_id is not None:
            finished = finished | (nxt == s.eos_token_id)
        if s.stop:
            assert s.decode is not None
            # Every token is at least one byte, so a stop string of n bytes completed by
            # this token lies within the last n + 1 tokens.
            lo = max(T, cur + 1 - (max_stop + 1))
            for b in range(B):
                if not finished[b]:
                    tail = s.decode(seqs[b, lo : cur + 1].tolist())
                    if _stop_hit(tail, s.stop):
                        finished[b] = True
        if ends is not None:
            ends[finished & ~was_finished] = step + 1
        state["finished"] = finished
        return nxt, bool(finished.all())

    with _EvalMode(model):
        for step in range(max_new_tokens):
            nxt, all_done = advance(step)
            yield nxt.clone()
            if all_done:
                return


def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    stop: Union[str, Sequence[str], None] = None,
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    decode: Decode | None = None,
    pad_token_id: int | None = None,
    vocab_limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Generate token by token, yielding a LongTensor ``(B * num_samples,)`` per step.

    Same arguments and same tokens as :func:`generate` with ``num_beams=1`` (for one seed the
    concatenated steps equal ``generate``'s new tokens). Rows that already finished yield the
    pad id (``pad_token_id``, else ``eos_token_id``, else 0). The token that completes a stop
    string is still yielded; :func:`stream_text` cuts the text exactly.
    """
    s = _settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, 1,
                  num_samples, eos_token_id, stop, decode, pad_token_id,
                  vocab_limit)
    idx = _check_idx(model, idx)
    if num_samples > 1:
        idx = idx.repeat_interleave(num_samples, dim=0)
    gen = _make_generator(seed, idx.device)
    return _sample_steps(model, idx, max_new_tokens, s, gen, use_cache)


# ---------------------------------------------------------------------------- beam search


def _grow(t: torch.Tensor, need: int, fill: int) -> torch.Tensor:
    """``t`` with its last dimension at least ``need`` long (doubling, new cells = ``fill``):
    buffers grow with the tokens actually produced, not with ``max_new_tokens``."""
    cap = t.shape[-1]
    if need <= cap:
        return t
    new_cap = max(need, 2 * cap)
    out = torch.full((*t.shape[:-1], new_cap), fill, dtype=t.dtype, device=t.device)
    out[..., :cap] = t
    return out


class _Beams:
    """The bookkeeping of transformers' ``GenerationMixin._beam_search`` for a batch.

    At each step the ``2 * num_beams`` best continuations over all beams are taken (by summed
    log-probability); those ending in eos (or a stop string) become finished hypotheses, scored
    by ``sum_logprobs / new_len ** length_penalty``; the best ``num_beams`` others keep running.
    Sequences live in buffers that grow as tokens are produced (``max_new_tokens`` may be
    huge).
    """

    def __init__(self, idx: torch.Tensor, max_new_tokens: int, num_beams: int,
                 length_penalty: float, early_stopping: Union[bool, str], s: _Settings) -> None:
        B, T = idx.shape
        K = num_beams
        dev = idx.device
        self.B, self.T, self.K, self.s = B, T, K, s
        self.L = T + max_new_tokens
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        cap = T + min(max_new_tokens, 64)
        self.running = torch.full((B, K, cap), s.pad, dtype=torch.long, device=dev)
        self.running[:, :, :T] = idx[:, None, :]
        self.running_scores = torch.zeros((B, K), device=dev)
        self.running_scores[:, 1:] = _NEG  # all beams start identical: only beam 0 expands
        self.done = self.running.clone()
        self.done_scores = torch.full((B, K), _NEG, device=dev)
        self.done_len = torch.full((B, K), T, dtype=torch.long, device=dev)
        self.is_done = torch.zeros((B, K), dtype=torch.bool, device=dev)
        self.may_improve = torch.ones((B, 1), dtype=torch.bool, device=dev)
        self.top_mask = torch.zeros(2 * K, dtype=torch.bool, device=dev)
        self.top_mask[:K] = True
        self.batch_offset = torch.arange(B, device=dev)[:, None] * K
        self.max_stop = max((len(x.encode("utf-8")) for x in s.stop), default=0)
        self.cur = T

    def candidates(self, logp: torch.Tensor, V: int) -> tuple[torch.Tensor, ...]:
        """The ``2K`` best continuations: scores, source beams, tokens, their sequences."""
        B, K, cur = self.B, self.K, self.cur
        logp = (logp.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        scores, flat = torch.topk(logp, 2 * K, dim=-1)
        beam, tok = flat // V, flat % V
        self.running = _grow(self.running, cur + 1, self.s.pad)
        self.done = _grow(self.done, self.running.shape[-1], self.s.pad)
        seqs = torch.take_along_dim(self.running, beam[:, :, None], dim=1)
        seqs[:, :, cur] = tok
        return scores, beam, tok, seqs

    def finished(self, tok: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        """Which candidates end here: the length limit, eos, or a completed stop string."""
        s, cur = self.s, self.cur
        hits = torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= self.L:
            hits[:] = True
        if s.eos_token_id is not None:
            hits |= tok == s.eos_token_id
        if s.stop:
            assert s.decode is not None
            lo = max(self.T, cur + 1 - (self.max_stop + 1))
            for b in range(self.B):
                for j in range(tok.shape[1]):
                    if not hits[b, j] and _stop_hit(
                        s.decode(seqs[b, j, lo : cur + 1].tolist()), s.stop
                    ):
                        hits[b, j] = True
        return hits

    def update(self, scores: torch.Tensor, beam: torch.Tensor, tok: torch.Tensor,
               seqs: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        """Advance by one token; returns the running beams' origins (to reorder the cache)."""
        K, cur = self.K, self.cur
        # Next running beams: the best K candidates that did not just finish.
        open_scores = scores + hits.float() * _NEG
        pick = torch.topk(open_scores, K, dim=-1).indices
        new_running = torch.take_along_dim(seqs, pick[:, :, None], dim=1)
        new_scores = torch.take_along_dim(open_scores, pick, dim=1)
        origin = torch.take_along_dim(beam, pick, dim=1) + self.batch_offset
        # Finished hypotheses: only candidates within the top K may enter the pool.
        just_done = hits & self.top_mask[None, :]
        norm = scores / float(cur + 1 - self.T) ** self.length_penalty
        pool_full = self.is_done.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        norm = norm + pool_full.float() * _NEG + (~self.may_improve).float() * _NEG
        norm = norm + (~just_done).float() * _NEG
        merged_scores = torch.cat((self.done_scores, norm), dim=1)
        best = torch.topk(merged_scores, K, dim=-1).indices
        self.done = torch.take_along_dim(torch.cat((self.done, seqs), dim=1), best[:, :, None],
                                         dim=1)
        self.done_scores = torch.take_along_dim(merged_scores, best, dim=1)
        self.done_len = torch.take_along_dim(
            torch.cat((self.done_len, torch.full_like(tok, cur + 1)), dim=1), best, dim=1)
        self.is_done = torch.take_along_dim(torch.cat((self.is_done, just_done), dim=1), best,
                                            dim=1)
        self.running, self.running_scores = new_running, new_scores
        self.cur += 1
        return origin.reshape(-1)

    def should_stop(self, hits: torch.Tensor) -> bool:
        """Whether no running beam can still beat the worst finished hypothesis."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.L - self.T
        else:
            best_len = self.cur - self.T
        best_possible = self.running_scores[:, :1] / float(best_len) ** self.length_penalty
        worst_done = torch.where(
            self.is_done, self.done_scores.min(dim=1, keepdim=True).values,
            torch.full_like(self.done_scores, _NEG),
        )
        self.may_improve = self.may_improve & (best_possible > worst_done).any(dim=-1,
                                                                                keepdim=True)
        all_done = bool(self.is_done.all()) and self.early_stopping is True
        return not bool(self.may_improve.any()) or all_done or bool(hits.all())

    def result(self, num_return: int) -> list[list[int]]:
        """The new tokens of the ``num_return`` best finished hypotheses per prompt."""
        width = self.done.shape[-1]
        rows = self.done[:, :num_return].reshape(self.B * num_return, width)[:, self.T :]
        lengths = (self.done_len[:, :num_return].reshape(-1) - self.T).tolist()
        return [row[:n] for row, n in zip(rows.tolist(), lengths)]


def _beam_search(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: Union[bool, str],
    num_return: int,
    s: _Settings,
    use_cache: bool,
) -> list[list[int]]:
    """Beam search (see :class:`_Beams`); the new tokens of the ``num_return`` best
    hypotheses per prompt."""
    beams = _Beams(idx, max_new_tokens, num_beams, length_penalty, early_stopping, s)
    B, K = beams.B, beams.K
    V = min(s.vocab_limit or model.config.vocab_size, model.config.vocab_size)
    stepper = _Stepper(model, use_cache, s.vocab_limit, beams.L)
    with torch.inference_mode(), _EvalMode(model):
        while True:
            flat = beams.running[:, :, : beams.cur].reshape(B * K, beams.cur)
            logp = F.log_softmax(stepper.logits(flat), dim=-1)
            logp = apply_repetition_penalty(logp, flat, s.repetition_penalty)
            scores, beam, tok, seqs = beams.candidates(logp, V)
            hits = beams.finished(tok, seqs)
            stepper.reorder(beams.update(scores, beam, tok, seqs, hits))
            if beams.should_stop(hits):
                break
    return beams.result(num_return)


# ---------------------------------------------------------------------------- public API


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    return min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)


def _cut_stop_tokens(tokens: list[int], decode: Decode, stops: tuple[str, ...]) -> list[int]:
    """Drop whole tokens from the one where the first stop string begins."""
    text = decode(tokens)
    cut = _first_stop(text, stops)
    if cut < 0:
        return tokens
    keep_text = text[:cut]
    m = len(tokens)
    while m > 0 and not keep_text.startswith(decode(tokens[:m])):
        m -= 1
    return tokens[:m]


def _run(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    s: _Settings,
    num_beams: int,
    length_penalty: float,
    early_stopping: Union[bool, str],
    num_samples: int,
    seed: int | None,
    use_cache: bool,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompts (repeated per sample) and the exact new tokens of every output row.

    A row's tokens end with its eos / stop-completing token when it finished early.
    """
    idx = _check_idx(model, idx)
    if num_beams > 1:
        if early_stopping not in (True, False, "never"):
            raise ValueError("early_stopping must be True, False or 'never'")
        rows = [] if max_new_tokens == 0 else _beam_search(
            model, idx, max_new_tokens, num_beams, float(length_penalty), early_stopping,
            num_samples, s, use_cache)
        if max_new_tokens == 0:
            rows = [[] for _ in range(idx.shape[0] * num_samples)]
        return idx.repeat_interleave(num_samples, dim=0), rows
    if num_samples > 1:
        idx = idx.repeat_interleave(num_samples, dim=0)
    gen = _make_generator(seed, idx.device)
    ends = torch.full((idx.shape[0],), -1, dtype=torch.long, device=idx.device)
    steps = list(_sample_steps(model, idx, max_new_tokens, s, gen, use_cache, ends))
    if not steps:
        return idx, [[] for _ in range(idx.shape[0])]
    new = torch.stack(steps, dim=1).tolist()
    return idx, [row if n < 0 else row[:n] for row, n in zip(new, ends.tolist())]


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = True,
    eos_token_id: int | None = None,
    stop: Union[str, Sequence[str], None] = None,
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    decode: Decode | None = None,
    pad_token_id: int | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Extend the prompts ``idx`` ``(B, T)`` by up to ``max_new_tokens`` tokens.

    Args:
        model: The :class:`~smallgpt.model.GPT` (its train/eval mode is restored afterwards).
        idx: Prompt token ids, ``(B, T)`` with ``T >= 1``.
        max_new_tokens: Number of tokens to add (fewer if every sequence stops early).
        temperature: Softmax temperature; ``0`` means greedy decoding.
        top_k: Keep only the ``k`` most likely tokens (``None``/``0``: off).
        top_p: Nucleus sampling mass in ``(0, 1]``.
        min_p: Drop tokens below ``min_p`` times the top probability, in ``[0, 1]``.
        repetition_penalty: ``> 1`` discourages tokens already in the sequence (transformers'
            ``RepetitionPenaltyLogitsProcessor``; prompt tokens count).
        num_beams: ``> 1`` runs beam search (deterministic; sampling options are ignored).
        length_penalty: Beam score = ``sum_logprobs / length ** length_penalty``.
        early_stopping: Beam search: ``True`` stops when ``num_beams`` hypotheses are finished,
            ``False`` uses transformers' heuristic, ``"never"`` the canonical rule.
        eos_token_id: A sequence that produces it is finished; later positions are padded.
        stop: Stop string(s); needs ``decode``. A sequence is finished once its new text
            contains one; in this tensor output the tokens from the one where the stop string
            begins are replaced by padding (use :func:`generate_text` for exact text cuts).
        num_samples: Sequences per prompt (sampling: independent samples; beam search: the
            best ``num_samples`` beams). Output rows are grouped by prompt.
        seed: Seed of a private ``torch.Generator``; ``None`` uses torch's global RNG.
        use_cache: Use the KV cache (prefill once, then one token per step).
        decode: ``list[int] -> str``, e.g. ``tokenizer.decode``; needed for ``stop``.
        pad_token_id: Fill value after a sequence ends (default: ``eos_token_id``, else 0).
        vocab_limit: Only ids below it are produced (a model whose embedding is padded past
            the tokenizer's vocabulary, e.g. 50304 rows for GPT-2's 50257 tokens).

    Returns:
        LongTensor ``(B * num_samples, T + n)`` with ``n <= max_new_tokens`` the number of
        steps run (on the model's device).
    """
    s = _settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                  num_beams, num_samples, eos_token_id, stop, decode, pad_token_id,
                  vocab_limit)
    prompts, rows = _run(model, idx, max_new_tokens, s, num_beams, length_penalty,
                         early_stopping, num_samples, seed, use_cache)
    if s.stop:
        assert s.decode is not None
        rows = [_cut_stop_tokens(r, s.decode, s.stop) for r in rows]
    width = max((len(r) for r in rows), default=0)
    new = torch.full((len(rows), width), s.pad, dtype=torch.long)
    for i, r in enumerate(rows):
        new[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.cat((prompts, new.to(prompts.device)), dim=1)


def stream_text(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    decode_bytes: DecodeBytes,
    stop: Union[str, Sequence[str], None] = None,
    eos_token_id: int | None = None,
    skip_ids: Sequence[int] = (),
    **kwargs: object,
) -> Iterator[str]:
    """Generate for one prompt (``idx`` of shape ``(1, T)``) and yield text as it is produced.

    ``decode_bytes`` maps token ids to raw bytes (``tokenizer.decode_bytes``); bytes are
    decoded incrementally as UTF-8, so a character split across tokens appears once complete.
    Text that could be the beginning of a stop string is held back until it is known not to
    be one; the output ends right before the first stop string. ``eos_token_id`` ends the text
    (the eos token itself is not printed); ids in ``skip_ids`` produce no text. Other keyword
    arguments go to :func:`generate_stream` (sampling options, ``seed``, ``use_cache``).
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError("stream_text takes a single prompt of shape (1, T)")
    if kwargs.get("num_samples", 1) != 1:
        raise ValueError("stream_text generates one sample; use generate_text for several")
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(x, str) or x == "" for x in stops):
        raise ValueError("stop strings must be non-empty strings")
    skip = set(skip_ids)
    if eos_token_id is not None:
        skip.add(eos_token_id)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    steps = generate_stream(model, idx, max_new_tokens, eos_token_id=eos_token_id,
                            **kwargs)  # type: ignore[arg-type]
    try:
        for tok in steps:
            t = int(tok[0])
            if eos_token_id is not None and t == eos_token_id:
                break
            if t in skip:
                continue
            pending += utf8.decode(decode_bytes([t]))
            if stops:
                hit = _first_stop(pending, stops)
                if hit >= 0:
                    if hit > 0:
                        yield pending[:hit]
                    return
                hold = _stop_prefix_len(pending, stops)
                if len(pending) > hold:
                    yield pending[: len(pending) - hold]
                    pending = pending[len(pending) - hold :]
            elif pending:
                yield pending
                pending = ""
        pending += utf8.decode(b"", final=True)
        if pending:
            yield pending
    finally:
        steps.close()  # type: ignore[attr-defined]


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for x in stops:
        for n in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:n]):
                best = n
                break
    return best


def generate_text(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    decode_bytes: DecodeBytes,
    stop: Union[str, Sequence[str], None] = None,
    eos_token_id: int | None = None,
    skip_ids: Sequence[int] = (),
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = True,
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> list[str]:
    """Generate and return the new text of each output row (``B * num_samples`` strings).

    Text is cut exactly before the first stop string and before ``eos_token_id``; ids in
    ``skip_ids`` are left out. For one prompt and one sample (``num_beams == 1``) the result
    equals ``"".join(stream_text(...))`` with the same seed.
    """

    def dec(ids: list) -> str:
        return decode_bytes(ids).decode("utf-8", errors="replace")

    s = _settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                  num_beams, num_samples, eos_token_id, stop, dec, None, vocab_limit)
    _, rows = _run(model, idx, max_new_tokens, s, num_beams, length_penalty, early_stopping,
                   num_samples, seed, use_cache)
    skip = set(skip_ids)
    texts = []
    for row in rows:
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        text = dec([t for t in row if t not in skip])
        cut = _first_stop(text, s.stop)
        texts.append(text if cut < 0 else text[:cut])
    return texts
