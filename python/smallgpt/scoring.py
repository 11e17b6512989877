"""Batched scoring of token rows: the log-probability a :class:`~smallgpt.model.GPT` gives the
last tokens of each row. Sliding-window perplexity (:mod:`smallgpt.evaluate`) and the
lm-evaluation-harness model (:mod:`smallgpt.lmeval`) run on :func:`score_tokens`.

Work is only done once and only where it is read:

* rows that feed the model the same input (duplicates; choices of one token after one context)
  share one row of a forward pass;
* rows that differ only after a common prefix (the choices of a multiple-choice question, the
  same context before each) run that prefix once into a KV cache, which is then copied to one
  row per choice for the rest ("tails"); groups whose prefixes have the same length share both
  forward passes;
* everything else is sorted longest first and cut into batches, each right-padded to its
  longest input (causal attention: padding after a row never changes its positions) and run
  in one forward pass;
* the output head and the softmax run only at scored positions, a chunk at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple, Union

import torch

from smallgpt.model import KVCache

if TYPE_CHECKING:
    from smallgpt.model import GPT

__all__ = ["score_tokens"]

Rows = Sequence[Tuple[Sequence[int], int]]

#: Scored positions whose logits are computed at once: a (positions, vocab) float32 block of
#: GPT-2's vocabulary is about 200 MB at 1024 positions.
_HEAD_CHUNK = 1024


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to ``dtype`` on ``device``; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class _Plan:
    """The distinct model inputs of the rows, which rows read each, and how they group."""

    inputs: List[Tuple[int, ...]] = field(default_factory=list)
    need: List[int] = field(default_factory=list)  # scored positions: the most a row scores
    members: List[List[int]] = field(default_factory=list)  # row indices per input

    def prefix(self, u: int) -> Tuple[int, ...]:
        """The part of input ``u`` before its scored positions."""
        return self.inputs[u][: len(self.inputs[u]) - self.need[u]]


def _plan(rows: Rows, block: int) -> _Plan:
    index: Dict[Tuple[int, ...], int] = {}
    plan = _Plan()
    for i, (tokens, n) in enumerate(rows):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < len(tokens):
            raise ValueError(f"row {i}: scores {n!r} of its {len(tokens)} tokens "
                             "(must be at least 1 and leave one token before them)")
        if len(tokens) > block + 1:
            raise ValueError(f"row {i}: {len(tokens)} tokens do not fit the model's context of "
                             f"{block} (at most {block + 1}: the last one is only predicted)")
        key = tuple(tokens[:-1])
        u = index.get(key)
        if u is None:
            u = index[key] = len(plan.inputs)
            plan.inputs.append(key)
            plan.need.append(n)
            plan.members.append([])
        plan.need[u] = max(plan.need[u], n)
        plan.members[u].append(i)
    return plan


def _batches(plan: _Plan, batch_size: int) -> List[Tuple[str, List[Any]]]:
    """``("shared", [prefix groups])`` batches, then ``("plain", [inputs])`` batches.

    A prefix group is the inputs after one prefix (two or more of them); a shared batch holds
    groups of one prefix length with at most ``batch_size`` tails in all (at least one group).
    """
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for u in range(len(plan.inputs)):
        groups.setdefault(plan.prefix(u), []).append(u)
    by_length: Dict[int, List[List[int]]] = {}
    plain: List[int] = []
    for prefix, units in groups.items():
        if prefix and len(units) > 1:
            by_length.setdefault(len(prefix), []).append(units)
        else:
            plain += units
    out: List[Tuple[str, List[Any]]] = []
    for length in sorted(by_length, reverse=True):
        batch: List[List[int]] = []
        for units in by_length[length]:
            if batch and sum(map(len, batch)) + len(units) > batch_size:
                out.append(("shared", batch))
                batch = []
            batch.append(units)
        out.append(("shared", batch))
    plain.sort(key=lambda u: -len(plan.inputs[u]))
    out += [("plain", plain[i : i + batch_size]) for i in range(0, len(plain), batch_size)]
    return out


@torch.no_grad()
def score_tokens(
    model: GPT,
    rows: Rows,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = False,
) -> List[Tuple[float, bool]]:
    """Log-probability of the last tokens of each row, in batches.

    ``rows[i] = (tokens, n)``: the last ``n`` tokens of ``tokens`` are scored, each predicted
    from every token before it in the row (``1 <= n < len(tokens) <= block_size + 1``).
    Returns per row the summed natural-log probability of those ``n`` tokens and whether each
    of them is the model's most likely next token (lm-eval's ``is_greedy``); probabilities are
    over the model's whole output (padded vocabulary rows included, as ``transformers`` does).
    ``batch_size`` bounds the rows of a forward pass; results do not depend on it beyond
    floating-point rounding. ``dtype`` other than float32 runs the model under autocast.

    Raises:
        ValueError: a row outside those bounds, or ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    plan = _plan(rows, model.config.block_size)
    sums = torch.zeros(len(rows), dtype=torch.float64)
    missed = torch.zeros(len(rows), dtype=torch.bool)
    batches = _batches(plan, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, unit="batch", desc="scoring", dynamic_ncols=True, leave=False)
    for kind, batch in batches:
        with autocast(dev, dtype):
            if kind == "shared":
                h, units = _shared_forward(model, plan, batch, dev)
            else:
                h, units = _plain_forward(model, plan, batch, dev)
            member, lp, ok = _head(model, rows, plan, units, h)
        sums.index_add_(0, member, lp)
        missed.index_put_((member[~ok],), torch.tensor(True))
    return [(float(s), not bool(m)) for s, m in zip(sums, missed)]


def _plain_forward(model: GPT, plan: _Plan, batch: List[int], dev: torch.device
                   ) -> Tuple[torch.Tensor, List[int]]:
    """Hidden states ``(B, width, C)`` of whole inputs, right-padded; row ``b`` is input
    ``batch[b]``, its scored positions the last ``need`` of its length."""
    width = len(plan.inputs[batch[0]])
    x = torch.zeros((len(batch), width), dtype=torch.long)
    for b, u in enumerate(batch):
        x[b, : len(plan.inputs[u])] = torch.tensor(plan.inputs[u], dtype=torch.long)
    h = model.hidden_states(x.to(dev))
    starts = [len(plan.inputs[u]) - plan.need[u] for u in batch]
    return _pick(h, batch, starts, plan), batch


def _shared_forward(model: GPT, plan: _Plan, groups: List[List[int]], dev: torch.device
                    ) -> Tuple[torch.Tensor, List[int]]:
    """The prefixes of ``groups`` (one length) into a KV cache, copied to one row per input
    of each group, then every input's tail through it; hidden states of the tails."""
    p = len(plan.prefix(groups[0][0]))
    units = [u for g in groups for u in g]
    width = max(plan.need[u] for u in units)
    prefixes = torch.tensor([plan.prefix(g[0]) for g in groups], dtype=torch.long)
    cache = model.new_cache(len(groups), p + width)
    model.hidden_states(prefixes.to(dev), cache)
    rows = torch.repeat_interleave(torch.arange(len(groups)),
                                   torch.tensor([len(g) for g in groups])).to(dev)
    tails = KVCache(model.config, len(units), p + width, device=dev, dtype=cache.k.dtype)
    tails.k[:, :, :, :p] = cache.k[:, rows, :, :p]
    tails.v[:, :, :, :p] = cache.v[:, rows, :, :p]
    tails.pos = p
    x = torch.zeros((len(units), width), dtype=torch.long)
    for b, u in enumerate(units):
        x[b, : plan.need[u]] = torch.tensor(plan.inputs[u][p:], dtype=torch.long)
    h = model.hidden_states(x.to(dev), tails)
    return _pick(h, units, [0] * len(units), plan), units


def _pick(h: torch.Tensor, units: List[int], starts: List[int], plan: _Plan) -> torch.Tensor:
    """The rows of ``h`` at each input's scored positions, input after input: ``(K, C)``."""
    b_idx: List[int] = []
    t_idx: List[int] = []
    for b, (u, s) in enumerate(zip(units, starts)):
        b_idx += [b] * plan.need[u]
        t_idx += range(s, s + plan.need[u])
    return h[torch.tensor(b_idx, device=h.device), torch.tensor(t_idx, device=h.device)]


def _head(model: GPT, rows: Rows, plan: _Plan, units: List[int], h: torch.Tensor
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of every scored token of the rows that read ``units`` from their
    scored hidden states ``h`` (see :func:`_pick`): row indices, values, argmax hits (CPU)."""
    flat: List[int] = []
    tgt: List[int] = []
    member: List[int] = []
    base = 0
    for u in units:
        for i in plan.members[u]:
            tokens, n = rows[i]
            flat += range(base + plan.need[u] - n, base + plan.need[u])
            tgt += tokens[-n:]
            member += [i] * n
        base += plan.need[u]
    dev = h.device
    flat_t, tgt_t = torch.tensor(flat, device=dev), torch.tensor(tgt, device=dev)
    lse = torch.empty(h.shape[0], device=dev)
    best = torch.empty(h.shape[0], dtype=torch.long, device=dev)
    target_logit = torch.empty(len(flat), device=dev)
    for s in range(0, h.shape[0], _HEAD_CHUNK):
        # GPT.forward's head: lm_head, then the logit soft-cap of models that have one.
        logits = model._softcap(model.lm_head(h[s : s + _HEAD_CHUNK])).float()
        lse[s : s + logits.shape[0]] = torch.logsumexp(logits, dim=-1)
        best[s : s + logits.shape[0]] = logits.argmax(dim=-1)
        here = (flat_t >= s) & (flat_t < s + logits.shape[0])
        target_logit[here] = logits[flat_t[here] - s, tgt_t[here]]
    lp = (target_logit - lse[flat_t]).double().cpu()
    return torch.tensor(member), lp, (best[flat_t] == tgt_t).cpu()
