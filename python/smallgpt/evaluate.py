"""Evaluation that needs nothing beyond smallgpt: multiple choice in the HellaSwag format,
scored as llm.c's ``dev/data/hellaswag.py`` scores it ("completion style"), and the
sliding-window perplexity of a text (on :func:`smallgpt.scoring.score_tokens`, the batched
scorer the lm-evaluation-harness model :mod:`smallgpt.lmeval` runs on too).

A data file holds one JSON object per line with ``ctx`` (a string), ``endings`` (four strings)
and ``label`` (the index of the right ending); other keys (``ind``, ``activity_label``, ...)
are ignored. HellaSwag itself (https://github.com/rowanz/hellaswag, MIT) is not bundled: pass
its ``hellaswag_val.jsonl``.

Scoring, for each example: the context is encoded on its own, each ending is encoded with a
space in front (``" " + ending``: GPT-2's tokens carry their leading space), and each of the
four rows ``context tokens + ending tokens`` is scored by the model's cross-entropy on the
ending's tokens, each predicted from everything before it. ``acc`` counts examples whose right
ending has the lowest summed loss, ``acc_norm`` those whose right ending has the lowest mean
loss (per token); ties go to the first ending, as ``argmin`` does. A row longer than the
model's context keeps its last ``block_size`` tokens (the start of the context is dropped).

Perplexity (:func:`sliding_window_perplexity`): see its docstring.

Everything here is a pure function of a :class:`~smallgpt.model.GPT`, a
:class:`~smallgpt.tokenizer.Tokenizer` and the examples; :func:`evaluate_multiple_choice`
batches examples, runs on any device and dtype, and under a process group (torchrun) gives
each rank every ``world_size``-th example and all-reduces the counts on the compute device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from smallgpt.model import GPT
    from smallgpt.tokenizer import Tokenizer
    from smallgpt.train.distributed import Dist

__all__ = [
    "EvalDataError",
    "MultipleChoiceExample",
    "MultipleChoiceResult",
    "PerplexityResult",
    "RenderedExample",
    "count_words",
    "evaluate_multiple_choice",
    "perplexity_windows",
    "read_hellaswag",
    "read_text_file",
    "render_example",
    "score_batch",
    "sliding_window_perplexity",
]

N_ENDINGS = 4


class EvalDataError(ValueError):
    """A malformed evaluation file or example (the message names the file and line)."""


@dataclass
class MultipleChoiceExample:
    """One example: a context, its candidate endings and the index of the right one."""

    ctx: str
    endings: List[str]
    label: int


@dataclass
class RenderedExample:
    """An example as token rows: ``rows[i]`` is context + ending ``i``; the ending's tokens
    are ``rows[i][starts[i]:]``."""

    rows: List[List[int]]
    starts: List[int]
    label: int


@dataclass
class MultipleChoiceResult:
    """Counts and per-example choices of :func:`evaluate_multiple_choice`.

    ``predictions[k]`` / ``predictions_norm[k]`` are the endings chosen for example ``k`` by
    the summed / mean loss; ``losses[k]`` holds the four ``(summed, mean)`` losses.
    """

    n: int
    correct: int
    correct_norm: int
    predictions: List[int] = field(default_factory=list)
    predictions_norm: List[int] = field(default_factory=list)
    losses: List[List[Tuple[float, float]]] = field(default_factory=list)

    @property
    def acc(self) -> float:
        """Fraction right by the summed loss of the ending."""
        return self.correct / self.n if self.n else 0.0

    @property
    def acc_norm(self) -> float:
        """Fraction right by the mean (per-token) loss of the ending."""
        return self.correct_norm / self.n if self.n else 0.0

    def summary(self) -> dict:
        """``{"n", "acc", "acc_norm"}`` (what ``smallgpt-eval`` prints)."""
        return {"n": self.n, "acc": self.acc, "acc_norm": self.acc_norm}


# ---------------------------------------------------------------- reading


def _parse_example(obj: Any) -> MultipleChoiceExample:
    """Validate one decoded line; raises ``ValueError`` with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("ctx", "endings", "label"):
        if key not in obj:
            raise ValueError(f"missing {key!r}")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str) or not ctx:
        raise ValueError("'ctx' must be a non-empty string")
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) for e in endings)):
        raise ValueError(f"'endings' must be a list of {N_ENDINGS} strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise ValueError(f"'label' must be an integer from 0 to {N_ENDINGS - 1}, got {label!r}")
    return MultipleChoiceExample(ctx, list(endings), label)


def read_hellaswag(path: Union[str, os.PathLike[str]],
                   limit: int = 0) -> List[MultipleChoiceExample]:
    """Read a HellaSwag-format JSON-lines file (blank lines are skipped).

    ``limit > 0`` keeps the first ``limit`` examples (later lines are not read).

    Raises:
        EvalDataError: a missing or unreadable file, a line that is not JSON or lacks a valid
            ``ctx`` / ``endings`` / ``label`` (``FILE:LINE: why``), or a file with no example.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    examples: List[MultipleChoiceExample] = []
    try:
        # utf-8-sig: a leading byte-order mark is skipped, as smallgpt-tokenize does.
        with open(p, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    examples.append(_parse_example(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{p}:{number}: not JSON ({e.msg})") from None
                except ValueError as e:
                    raise EvalDataError(f"{p}:{number}: {e}") from None
                if 0 < limit <= len(examples):
                    break
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EvalDataError(f"cannot read {p}: {e.strerror or e}") from None
    if not examples:
        raise EvalDataError(f"{p} holds no example")
    return examples


# ---------------------------------------------------------------- rendering and scoring


def render_example(tokenizer: Tokenizer, example: MultipleChoiceExample,
                   block_size: int) -> RenderedExample:
    """Token rows of one example (llm.c's ``render_example``), cut to ``block_size``.

    Special-token text is encoded as plain text (``encode_ordinary``).

    Raises:
        EvalDataError: an ending that leaves no context token in ``block_size`` tokens.
    """
    ctx = tokenizer.encode_ordinary(example.ctx)
    rows, starts = [], []
    for ending in example.endings:
        end = tokenizer.encode_ordinary(" " + ending)
        row = (ctx + end)[-block_size:]
        start = len(row) - len(end)
        if start < 1:
            raise EvalDataError(f"an ending of {len(end)} tokens leaves no room for its "
                                f"context in the model's {block_size}-token window")
        rows.append(row)
        starts.append(start)
    return RenderedExample(rows, starts, example.label)


def _collate(batch: Sequence[RenderedExample]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token rows ``(4B, T)`` and the mask of predicted ending tokens over the
    targets ``(4B, T - 1)``: target ``t`` (token ``t + 1``) counts when it is an ending's."""
    rows = [r for ex in batch for r in ex.rows]
    starts = [s for ex in batch for s in ex.starts]
    width = max(len(r) for r in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start - 1 : len(row) - 1] = True
    return tokens, mask


@torch.no_grad()
def score_batch(model: GPT, batch: Sequence[RenderedExample], device: torch.device,
                dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean losses (nats) of every ending: two ``(B, 4)`` float64 tensors on
    ``device``. ``dtype`` other than float32 runs the model under autocast."""
    tokens, mask = _collate(batch)
    tokens, mask = tokens.to(device), mask.to(device)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else \
        torch.autocast(device_type=device.type, dtype=dtype)
    with autocast:
        logits = model(tokens)
    # Only the ending positions go through the (float32) softmax: a batch's full logits
    # are (4B, T, vocab), its ending positions a small part of that.
    picked = logits[:, :-1][mask].float()
    losses = F.cross_entropy(picked, tokens[:, 1:][mask], reduction="none").double()
    row_of = mask.nonzero()[:, 0]
    sums = torch.zeros(tokens.shape[0], dtype=torch.float64, device=device)
    sums.index_add_(0, row_of, losses)
    means = sums / mask.sum(1).double()
    return sums.view(-1, N_ENDINGS), means.view(-1, N_ENDINGS)


def evaluate_multiple_choice(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[MultipleChoiceExample],
    *,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    dist: Optional[Dist] = None,
    progress: bool = False,
) -> MultipleChoiceResult:
    """Score every example; returns the counts over all ranks and the choices per example.

    Args:
        model: the model (moved to ``device`` and put in eval mode; left in eval mode).
        tokenizer: the model's tokenizer.
        examples: from :func:`read_hellaswag`.
        device: compute device (default: the model's).
        dtype: float32, or bfloat16/float16 autocast.
        batch_size: examples per forward pass (``4 * batch_size`` rows).
        dist: a process group (:func:`smallgpt.train.distributed.init_distributed`): rank
            ``r`` scores examples ``r, r + world_size, ...``; counts are all-reduced and the
            per-example choices gathered, so every rank returns the whole result.
        progress: a tqdm bar over this rank's batches (on stderr).

    Raises:
        EvalDataError: an example that cannot fit the model's context.
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = list(range(rank, len(examples), world))
    block = model.config.block_size
    chosen: List[Tuple[int, int, int, List[Tuple[float, float]]]] = []
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for ids in _progress(batches, progress):
        rendered = []
        for k in ids:
            try:
                rendered.append(render_example(tokenizer, examples[k], block))
            except EvalDataError as e:
                raise EvalDataError(f"example {k + 1}: {e}") from None
        sums, means = score_batch(model, rendered, dev, dtype)
        for k, s, m in zip(ids, sums.cpu().tolist(), means.cpu().tolist()):
            chosen.append((k, _argmin(s), _argmin(m), list(zip(s, m))))
    return _gather(chosen, examples, dist, dev)


def _argmin(values: Sequence[float]) -> int:
    """Index of the smallest value, the first one on ties (NaN never wins)."""
    best = 0
    for i, v in enumerate(values):
        if v < values[best] or math.isnan(values[best]):
            best = i
    return best


def _progress(items: List[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="batch", desc="evaluating", dynamic_ncols=True, leave=False)


def _gather(chosen: List[Tuple[int, int, int, List[Tuple[float, float]]]],
            examples: Sequence[MultipleChoiceExample], dist: Optional[Dist],
            device: torch.device) -> MultipleChoiceResult:
    """Counts all-reduced on the compute device; choices gathered in example order."""
    counts = torch.tensor([len(chosen), sum(p == examples[k].label for k, p, _, _ in chosen),
                           sum(p == examples[k].label for k, _, p, _ in chosen)],
                          dtype=torch.int64, device=device)
    everything = chosen
    if dist is not None and dist.enabled:
        dist.all_reduce_sum(counts)
        everything = [c for part in dist.gather_object(chosen) for c in part]
    everything.sort(key=lambda c: c[0])
    n, correct, correct_norm = (int(v) for v in counts.cpu())
    return MultipleChoiceResult(
        n=n, correct=correct, correct_norm=correct_norm,
        predictions=[c[1] for c in everything], predictions_norm=[c[2] for c in everything],
        losses=[c[3] for c in everything])


# ---------------------------------------------------------------- perplexity of a text


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for ``word_perplexity``:
    ``len(re.split(r"\\s+", text))`` (so leading or trailing whitespace adds an empty word)."""
    return len(re.split(r"\s+", text))


def read_text_file(path: Union[str, os.PathLike[str]]) -> str:
    """A UTF-8 text file's contents.

    Raises:
        EvalDataError: a missing, unreadable, non-UTF-8 or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise EvalDataError(f"cannot read {p}: {e.strerror or e}") from None
    if not text:
        raise EvalDataError(f"{p} is empty")
    return text


@dataclass
class PerplexityResult:
    """Totals of :func:`sliding_window_perplexity`; ``nll`` is the summed negative
    log-likelihood in nats of all ``tokens`` tokens of the text."""

    nll: float
    tokens: int
    bytes: int
    words: int
    windows: int
    context: int
    stride: int

    @property
    def token_perplexity(self) -> float:
        """``exp(nll / tokens)``."""
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        """``nll / bytes / ln 2``: bits per UTF-8 byte, comparable across tokenizers."""
        return self.nll / self.bytes / math.log(2)

    @property
    def byte_perplexity(self) -> float:
        """``exp(nll / bytes)`` (lm-eval's ``byte_perplexity``)."""
        return math.exp(self.nll / self.bytes)

    @property
    def word_perplexity(self) -> float:
        """``exp(nll / words)`` with words counted by :func:`count_words` (lm-eval's)."""
        return math.exp(self.nll / self.words)

    def summary(self) -> dict:
        """The figures ``smallgpt-eval --perplexity`` prints."""
        return {"token_perplexity": self.token_perplexity, "bits_per_byte": self.bits_per_byte,
                "byte_perplexity": self.byte_perplexity,
                "word_perplexity": self.word_perplexity, "nll": self.nll,
                "tokens": self.tokens, "bytes": self.bytes, "words": self.words,
                "windows": self.windows, "context": self.context, "stride": self.stride}


def perplexity_windows(n_tokens: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """The windows of the sliding-window method over a stream of ``n_tokens + 1`` tokens
    (a leading ``<|endoftext|>``, then the text's): ``(begin, end, n)`` feeds the model stream
    positions ``begin .. end - 1`` and scores the last ``n`` of its predictions, the tokens
    ``end - n + 1 .. end`` that no earlier window scored. Windows start every ``stride``
    tokens; ``stride == context`` makes them disjoint."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be from 1 to the context ({context}), got {stride}")
    windows, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + context, n_tokens)
        windows.append((begin, end, end - prev_end))
        if end == n_tokens:
            return windows
        prev_end, begin = end, begin + stride


def sliding_window_perplexity(
    model: GPT,
    tokenizer: Tokenizer,
    text: str,
    *,
    stride: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``text`` by the sliding-window method.

    The text is encoded as plain text (special-token text included) after one
    ``<|endoftext|>``, so that its first token is predicted too. Windows of the model's
    context start every ``stride`` tokens (default: half the context); each predicts only
    the tokens past its overlap with the previous one, so every token is scored once, with
    between ``context - stride`` and ``context`` tokens before it (fewer at the start).
    ``stride`` equal to the context gives disjoint windows. Windows run in batches of
    ``batch_size`` (see :func:`smallgpt.scoring.score_tokens`).

    Raises:
        EvalDataError: text with no token, or a tokenizer without ``<|endoftext|>``.
        ValueError: a stride outside ``1 .. context``.
    """
    context = model.config.block_size
    stride = max(1, context // 2) if stride is None else stride
    eot = tokenizer.eot_id
    if eot is None:
        raise EvalDataError("the tokenizer has no <|endoftext|> token to predict the first "
                            "token from")
    ids = tokenizer.encode_ordinary(text)
    if not ids:
        raise EvalDataError("the text has no token")
    stream = [eot] + ids
    windows = perplexity_windows(len(ids), context, stride)
    rows = [(stream[b : e + 1], n) for b, e, n in windows]
    from smallgpt.scoring import score_tokens

    scores = score_tokens(model, rows, device=device, dtype=dtype, batch_size=batch_size,
                          progress=progress)
    nll = -math.fsum(s for s, _ in scores)
    return PerplexityResult(nll=nll, tokens=len(ids), bytes=len(text.encode("utf-8")),
                            words=count_words(text), windows=len(windows), context=context,
                            stride=stride)
