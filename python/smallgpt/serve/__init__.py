"""``smallgpt-serve``: an OpenAI-compatible HTTP server with continuous batching, and a
playground page.

* :mod:`smallgpt.serve.engine`: the scheduler (one thread owns the model; requests join and
  leave the running batch between decoding steps);
* :mod:`smallgpt.serve.app`: the routes (OpenAI's completions API, tokenizer endpoints, the
  page), on FastAPI;
* :mod:`smallgpt.serve.schemas`: request checking and OpenAI's error objects;
* ``static/index.html``: the playground.

Needs the ``serve`` extra (``pip install 'smallgpt[serve]'``: FastAPI and uvicorn) for the
HTTP side; the engine alone needs only torch.
"""

from __future__ import annotations

from smallgpt.serve.engine import Choice, Delta, Engine, Request, SamplingParams

__all__ = ["Choice", "Delta", "Engine", "Request", "SamplingParams"]
