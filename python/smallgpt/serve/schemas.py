"""The OpenAI API's shapes: requests checked as OpenAI checks them, errors as OpenAI writes them.

Requests are parsed strictly (no string for a number, no unknown field: OpenAI answers
"Unrecognized request argument supplied"); every problem becomes an :class:`APIError` whose
body is OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from smallgpt.serve.engine import SamplingParams

__all__ = ["APIError", "CompletionRequest", "DetokenizeRequest", "TokenizeRequest",
           "MAX_CHOICES", "MAX_LOGPROBS", "MAX_N", "MAX_STOP", "parse"]

MAX_N = 16
MAX_CHOICES = 512  # prompts x n in one request
MAX_LOGPROBS = 20
MAX_STOP = 16  # OpenAI allows 4; lm-eval may send more (its stop words plus the eos text)


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        """``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts;
    ``continuous_usage_stats`` (vLLM's extension) puts the counts so far in every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(_Strict):
    """``POST /v1/completions``: OpenAI's fields, then smallgpt's own (``top_k``,
    ``min_p``, ``repetition_penalty``, and ``add_special_tokens``: start text prompts with
    ``<|endoftext|>`` as every training document starts; default true)."""

    model: Optional[str] = None
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    n: Optional[int] = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    best_of: Optional[int] = None
    logit_bias: Optional[Dict[str, float]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = 1.0
    add_special_tokens: Optional[bool] = True

    def prompts(self) -> List[Union[str, List[int]]]:
        """The prompts: texts or lists of token ids (``APIError`` if there are none)."""
        p = self.prompt
        out: List[Union[str, List[int]]]
        if isinstance(p, str):
            out = [p]
        elif p and isinstance(p[0], int):
            out = [list(p)]  # type: ignore[arg-type]
        else:
            out = list(p)  # type: ignore[arg-type]
        if not out or any(isinstance(x, list) and not x for x in out):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return out

    def sampling(self) -> SamplingParams:
        """Checked settings for the engine (``APIError`` naming the first bad one)."""
        _check_unsupported(self)
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        if max_tokens < 0 or (max_tokens == 0 and not self.echo):
            raise APIError(400, f"max_tokens must be at least 1 (0 only with echo, to score "
                           f"the prompt), got {max_tokens}", param="max_tokens")
        temperature = 1.0 if self.temperature is None else self.temperature
        _in_range("temperature", temperature, 0.0, 2.0)
        top_p = 1.0 if self.top_p is None else self.top_p
        if not 0.0 < top_p <= 1.0:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
        n = self.n if self.n is not None else 1
        _in_range("n", n, 1, MAX_N)
        if self.logprobs is not None:
            _in_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        top_k = self.top_k
        if top_k is not None and top_k < -1:
            raise APIError(400, f"top_k must be positive (0 or -1: off), got {top_k}",
                           param="top_k")
        if self.min_p is not None:
            _in_range("min_p", self.min_p, 0.0, 1.0)
        penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if not penalty > 0:
            raise APIError(400, f"repetition_penalty must be > 0, got {penalty}",
                           param="repetition_penalty")
        seed = None if self.seed is None else self.seed % (1 << 62)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_k=top_k if top_k and top_k > 0 else None,
                              top_p=top_p if top_p < 1.0 else None, min_p=self.min_p or None,
                              repetition_penalty=penalty, stop=_stops(self.stop),
                              logprobs=self.logprobs, seed=seed)


def _check_unsupported(r: CompletionRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(r, name):
            raise APIError(400, f"{name} is not supported by smallgpt-serve; use "
                           "repetition_penalty", param=name)
    if r.best_of is not None and r.best_of != (r.n or 1):
        raise APIError(400, "best_of is not supported (only best_of = n)", param="best_of")
    if r.logit_bias:
        raise APIError(400, "logit_bias is not supported by smallgpt-serve", param="logit_bias")
    if r.suffix:
        raise APIError(400, "suffix (insertion) is not supported by this model", param="suffix")
    if r.stream_options is not None and not r.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       param="stream_options")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise APIError(400, f"{name} must be from {low:g} to {high:g}, got {value}", param=name)


def _stops(stop: Union[str, List[str], None]) -> tuple:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}",
                       param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return tuple(stops)


class TokenizeRequest(_Strict):
    """``POST /v1/tokenize`` (vLLM's shape, which lm-eval's remote tokenizer reads)."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: Optional[bool] = True
    return_token_strs: Optional[bool] = False


class DetokenizeRequest(_Strict):
    """``POST /v1/detokenize``."""

    model: Optional[str] = None
    tokens: List[int]


_PROMPT_TYPES = ("prompt must be a string, a list of strings, a list of token ids or a list "
                 "of lists of token ids")


def parse(cls: type, body: bytes) -> Any:
    """``cls`` from a JSON body, or an :class:`APIError` (400) saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not "
                       "valid JSON. The API expects a JSON object.") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                       f"{type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    loc = [str(x) for x in first["loc"]]
    param = loc[0] if loc else None
    kind = first["type"]
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return APIError(400, f"you must provide a {param} parameter", param=param)
    if param == "prompt":
        return APIError(400, _PROMPT_TYPES, param=param)
    if kind in ("finite_number", "float_type") and isinstance(first.get("input"), float) \
            and not math.isfinite(first["input"]):
        return APIError(400, f"{param} must be a finite number", param=param)
    where = ".".join(loc)
    got = json.dumps(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return APIError(400, f"{where}: {first['msg']} (got {got})", param=param)
