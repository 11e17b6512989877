""":class:`SmallGPTLM`: lm-evaluation-harness's ``LM`` interface over any smallgpt model.

Requests are tokenized as lm-eval's own ``hf`` backend tokenizes them (its ``TemplateLM``:
context and continuation encoded together and split; an empty context becomes
``<|endoftext|>``; special-token text becomes its token, as Hugging Face tokenizers do), and a
request longer than the model's context keeps its last tokens, as ``hf`` does. On a GPT-2
folder both backends therefore score the same tokens (``tests/test_lmeval.py`` checks every
metric of four task kinds against ``hf``).

Scoring runs on :func:`smallgpt.scoring.score_tokens` (a multiple-choice context once for all
its choices, through the KV cache; other inputs sorted by length, batched, right-padded, one
forward per batch; the output head only at scored positions); generation on
:func:`smallgpt.generate.generate_text` (KV cache, stop strings cut exactly), batching requests
whose prompts have the same length (the model has no padding mask, so rows of a generation
batch must be equally long).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from smallgpt.scoring import autocast, score_tokens

if TYPE_CHECKING:
    import os

    from lm_eval.api.instance import Instance

    from smallgpt.model import GPT
    from smallgpt.tokenizer import Tokenizer

__all__ = ["LMEvalError", "SmallGPTLM"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generation_kwargs of lm-eval tasks that map onto smallgpt.generate options.
_GEN_OPTIONS = ("top_k", "top_p", "min_p", "repetition_penalty", "num_beams", "length_penalty",
                "early_stopping")
_BEAM_OPTIONS = ("num_beams", "length_penalty", "early_stopping")


class LMEvalError(ValueError):
    """A request this model cannot serve (the message says which and why)."""


def _parse_batch_size(value: Union[int, str, None]) -> int:
    if value is None or value == "auto":
        return 8  # lm-eval's "auto" probes GPU memory; 8 suits CPUs and small GPUs alike
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LMEvalError(f"batch_size must be a positive integer or 'auto', got {value!r}") \
            from None
    if size < 1:
        raise LMEvalError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


def _resolve(device: Union[str, torch.device, None],
             dtype: Union[str, torch.dtype, None]) -> Tuple[torch.device, torch.dtype]:
    """``auto`` device: CUDA if there is one. ``auto`` dtype: float32 everywhere (see the
    class docstring)."""
    from smallgpt.train.hardware import resolve_device, resolve_dtype

    dev = device if isinstance(device, torch.device) else resolve_device(str(device or "auto"))
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    name = str(dtype or "auto")
    return dev, torch.float32 if name == "auto" else resolve_dtype(name, dev)


@register_model("smallgpt")
class SmallGPTLM(TemplateLM):
    """A smallgpt model as an lm-evaluation-harness ``LM`` (registered as ``"smallgpt"``).

    ``SmallGPTLM(checkpoint=PATH)`` loads a run folder, a checkpoint file or a Hugging Face
    GPT-2 folder (:func:`smallgpt.checkpoint.load_model`); ``SmallGPTLM(model=gpt,
    tokenizer=tok)`` wraps objects already in memory. Then, as lm-eval documents for
    external models::

        lm_eval.simple_evaluate(model=SmallGPTLM(checkpoint="out/run"), tasks=["hellaswag"])

    Args:
        checkpoint: where to load the model from (or pass ``model`` and ``tokenizer``).
        model, tokenizer: a :class:`~smallgpt.model.GPT` and its tokenizer.
        gpt2_vocab: GPT-2 vocabulary files for a Hugging Face folder without them.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto`` is float32 on every device, CUDA included: harness figures are
            compared with published ones, and lm-eval's ``hf`` backend runs a float32
            checkpoint such as GPT-2's in float32 unless told otherwise; bf16 autocast changes
            the log-likelihoods behind every metric. Pass ``bfloat16`` (or ``float16`` on
            GPUs) for speed, as autocast.
        batch_size: rows per forward pass (``"auto"``: 8).
        max_gen_toks: tokens generated when a task does not say (lm-eval's default 256).
        max_batch_size: accepted for lm-eval's CLI, unused.
        progress: tqdm bars on stderr.

    Raises:
        smallgpt.checkpoint.CheckpointError: a checkpoint that is not a model.
        LMEvalError: no tokenizer, a tokenizer without ``<|endoftext|>``, a bad batch size.
        smallgpt.train.HardwareError: a device or dtype this machine does not have.
    """

    backend = "causal"

    def __init__(
        self,
        checkpoint: Union[str, os.PathLike[str], None] = None,
        *,
        model: Optional[GPT] = None,
        tokenizer: Optional[Tokenizer] = None,
        gpt2_vocab: Union[str, os.PathLike[str], None] = None,
        device: Union[str, torch.device, None] = "auto",
        dtype: Union[str, torch.dtype, None] = "auto",
        batch_size: Union[int, str, None] = 8,
        max_gen_toks: int = 256,
        max_batch_size: Optional[int] = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise LMEvalError("give either checkpoint= or model= (with tokenizer=)")
        self.source = "in-memory model"
        if checkpoint is not None:
            from smallgpt.checkpoint import load_model

            loaded = load_model(checkpoint, gpt2_vocab)
            model, tokenizer, self.source = loaded.model, loaded.tokenizer, str(loaded.source)
        if tokenizer is None:
            raise LMEvalError(f"{self.source} has no tokenizer files (vocab.json + merges.txt or "
                              "tokenizer.json): pass gpt2_vocab=DIR (--gpt2-vocab)")
        if tokenizer.eot_id is None:
            raise LMEvalError("the tokenizer has no <|endoftext|> token (lm-eval conditions empty "
                              "contexts and documents on it)")
        assert model is not None
        self._device, self.dtype = _resolve(device, dtype)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self._batch_size = _parse_batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.progress = progress

    # ------------------------------------------------------------------ what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        """``<|endoftext|>``: lm-eval's prefix for empty contexts and rolling windows."""
        return int(self.tokenizer.eot_id)  # type: ignore[arg-type]

    @property
    def max_length(self) -> int:
        """The model's context (``block_size``)."""
        return self.model.config.block_size

    @property
    def max_gen_toks(self) -> int:
        """Tokens generated when a task sets no ``max_gen_toks``."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Rows per forward pass."""
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer in lm-eval's request-cache keys."""
        return f"smallgpt-{self.tokenizer.vocab_size}"

    def get_model_info(self) -> Dict[str, Any]:
        """What lm-eval records under ``config`` in its results."""
        return {"model_source": self.source,
                "model_num_parameters": self.model.num_params(non_embedding=False),
                "model_dtype": str(self.dtype), "model_config": self.model.config.to_dict()}

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs: Any) -> List[int]:
        """Token ids of ``string``; special-token text becomes its token (as in ``hf``)."""
        return self.tokenizer.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        """Text of token ids (invalid UTF-8 replaced)."""
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring

    def _score(self, rows: List[Tuple[List[int], int]], disable_tqdm: bool
               ) -> List[Tuple[float, bool]]:
        return score_tokens(self.model, rows, device=self._device, dtype=self.dtype,
                            batch_size=self._batch_size,
                            progress=self.progress and not disable_tqdm)

    def _rows(self, requests: Sequence[Tuple[Any, List[int], List[int]]]
              ) -> List[Tuple[List[int], int]]:
        """``(tokens, n)`` rows of encoded requests, cut to the context from the left."""
        block, rows, cut = self.max_length, [], 0
        for _, context, continuation in requests:
            if not continuation:
                raise LMEvalError("a request has an empty continuation (nothing to score)")
            if len(continuation) > block:
                raise LMEvalError(f"a continuation of {len(continuation)} tokens does not fit "
                                  f"the model's context of {block} tokens")
            whole = context + continuation
            cut += len(whole) > block + 1
            rows.append((whole[-(block + 1):], len(continuation)))
        if cut:
            log.warning("%d of %d requests are longer than the model's context of %d tokens: "
                        "their contexts lose tokens from the left (as lm-eval's hf backend does)",
                        cut, len(rows), block)
        return rows

    def _loglikelihood_tokens(self, requests: List[Tuple[Any, List[int], List[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> List[Tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per encoded request."""
        results = self._score(self._rows(requests), disable_tqdm)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: List[Instance],
                              disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole documents, in lm-eval's windows of the model's context
        (disjoint, the last one with the most context it can have), all batched together."""
        windows: List[Tuple[Any, List[int], List[int]]] = []
        owner: List[int] = []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, pred))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._score(self._rows(windows), disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _gen_options(self, gen_kwargs: Dict[str, Any]) -> Tuple[List[str], int, Dict[str, Any]]:
        """Stop strings, token budget and :func:`generate_text` options of a request."""
        if not isinstance(gen_kwargs, dict):
            raise LMEvalError(f"generation arguments must be a dict, got {gen_kwargs!r}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eot_text = self.tokenizer.decode([self.eot_token_id])
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eot_text)
        max_gen = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        options: Dict[str, Any] = {
            "temperature": (temperature or 1.0) if do_sample else 0.0}
        for name in _GEN_OPTIONS:
            if kwargs.get(name) is not None:
                options[name] = kwargs.pop(name)
        kwargs.pop("max_length", None)  # hf's prompt+generation bound; max_gen_toks rules
        if kwargs:
            raise LMEvalError(f"generation options smallgpt does not support: {sorted(kwargs)}")
        if max_gen >= self.max_length:
            raise LMEvalError(f"a task asks for {max_gen} new tokens but the model's context is "
                              f"{self.max_length} tokens (no room for its prompt)")
        return [s for s in until if s], max_gen, options

    def generate_until(self, requests: List[Instance],
                       disable_tqdm: bool = False) -> List[str]:
        """Text generated for each ``(context, gen_kwargs)`` until a stop string, the
        ``<|endoftext|>`` token or ``max_gen_toks`` tokens; the text ends before the first
        stop string. Prompts keep their last ``context - max_gen_toks`` tokens (as ``hf``).

        Requests run through the server's continuous-batching engine
        (:class:`smallgpt.serve.engine.Engine`): up to ``batch_size`` sequences decode
        together whatever their prompt lengths (each row at its own position in the KV
        cache), and a finished one is replaced at the next step. Greedy decoding takes the
        arg-max of the same logits as :func:`smallgpt.generate.generate_text`.
        """
        from smallgpt.serve.engine import Choice, Engine, Request, SamplingParams

        pending = []
        for context, gen_kwargs in (req.args for req in requests):
            until, max_gen, options = self._gen_options(gen_kwargs)
            ids = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.eot_token_id]
            beams = {k: options.pop(k) for k in _BEAM_OPTIONS if k in options}
            if beams.get("num_beams", 1) > 1:
                pending.append((ids, max_gen, until, {**options, **beams}))
                continue
            pending.append(Request([ids], SamplingParams(max_tokens=max_gen, stop=tuple(until),
                                                         **options)))
        engine = Engine(self.model, self.tokenizer, max_batch=self._batch_size,
                        autocast_dtype=self.dtype)
        out: List[str] = []
        bar = tqdm(total=len(requests), desc="generating", unit="request",
                   disable=disable_tqdm or not self.progress, leave=False)
        engine.start()
        try:
            for r in pending:
                if isinstance(r, Request):
                    engine.submit(r)
            for req, r in zip(requests, pending):
                if not isinstance(r, Request):  # beam search: one request at a time
                    out.append(self._beam_search(*r))
                    bar.update(1)
                    continue
                choice = Choice(0)
                while choice.finish_reason is None:
                    for d in r.outbox.get():
                        if d.error is not None:
                            raise LMEvalError(f"generation failed: {d.error}")
                        choice.add(d)
                out.append(choice.text)
                self.cache_hook.add_partial("generate_until", req.args, choice.text)
                bar.update(1)
        finally:
            engine.stop()
            bar.close()
        return out

    def _beam_search(self, ids: List[int], max_gen: int, until: List[str],
                     options: Dict[str, Any]) -> str:
        """One ``generate_until`` request with beam search (:func:`generate_text`)."""
        from smallgpt.generate import generate_text

        idx = torch.tensor([ids], device=self._device)
        with autocast(self._device, self.dtype):
            return generate_text(
                self.model, idx, max_gen, decode_bytes=self.tokenizer.decode_bytes, stop=until,
                eos_token_id=self.eot_token_id,
                vocab_limit=min(self.tokenizer.vocab_size, self.model.config.vocab_size),
                **options)[0]
