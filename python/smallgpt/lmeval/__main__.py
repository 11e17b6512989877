"""``python -m smallgpt.lmeval ARGS``: lm-eval's own command line (``lm-eval ARGS``) with
smallgpt's model registered, e.g.::

    python -m smallgpt.lmeval run --model smallgpt --model_args checkpoint=out/run \\
        --tasks lambada_openai --output_path results/
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

import smallgpt.lmeval  # noqa: F401  (registers "smallgpt" with lm-eval's model registry)

if __name__ == "__main__":
    cli_evaluate()
