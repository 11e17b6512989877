"""``python -m smallgpt.lmeval ARGS``: lm-eval's own command line (``lm-eval ARGS``) with
smallgpt's model registered, e.g.::

    python -m smallgpt.lmeval run --model smallgpt --model_args checkpoint=out/run \\
        --tasks lambada_openai --batch_size 16 --output_path results/

lm-eval's ``--device`` defaults to ``cuda:0``, which smallgpt refuses on a machine without
CUDA (it never silently moves to another device); without ``--device`` this command passes
``auto`` (CUDA if there is one, else the CPU).
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import smallgpt.lmeval  # noqa: F401  (registers "smallgpt" with lm-eval's model registry)


def main() -> None:
    """Run lm-eval's CLI."""
    if not any(a == "--device" or a.startswith("--device=") for a in sys.argv[1:]):
        sys.argv += ["--device", "auto"]
    cli_evaluate()


if __name__ == "__main__":
    main()
