"""smallgpt models in EleutherAI's lm-evaluation-harness (``pip install 'smallgpt[eval]'``).

* :class:`SmallGPTLM`: lm-eval's ``LM`` interface over any model :func:`smallgpt.checkpoint.
  load_model` reads (run folder, checkpoint file, Hugging Face GPT-2 folder), registered with
  lm-eval as ``"smallgpt"`` when this package is imported.
* :func:`evaluate_tasks`, :func:`summarize`, :func:`write_results`: what ``smallgpt-eval
  --tasks`` runs (lm-eval's ``simple_evaluate`` plus local task files).
* ``python -m smallgpt.lmeval ...`` is lm-eval's own command line with ``--model smallgpt``
  available (lm-eval 0.4 loads third-party models only when something imports them first:
  it has no plugin entry point).

Importing this package imports lm-eval; without it the import fails with an
:class:`ImportError` that names the extra.
"""

from __future__ import annotations

try:
    import lm_eval  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("smallgpt.lmeval needs lm-evaluation-harness: pip install "
                      "'smallgpt[eval]'") from e

from smallgpt.lmeval.model import LMEvalError, SmallGPTLM
from smallgpt.lmeval.runner import (
    TaskError,
    evaluate_tasks,
    load_tasks,
    summarize,
    task_manager,
    write_results,
)

__all__ = ["LMEvalError", "SmallGPTLM", "TaskError", "evaluate_tasks", "load_tasks",
           "summarize", "task_manager", "write_results"]
