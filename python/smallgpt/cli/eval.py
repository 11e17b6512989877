"""``smallgpt-eval``: multiple-choice evaluation (HellaSwag format) of a model.

Examples::

    smallgpt-eval --hellaswag hellaswag_val.jsonl --checkpoint out/my-run
    smallgpt-eval --hellaswag hellaswag_val.jsonl --checkpoint gpt2/ --device cuda
    torchrun --standalone --nproc_per_node=8 -m smallgpt.cli.eval --hellaswag ... --checkpoint ...

``--checkpoint`` is a run folder, a checkpoint file or a Hugging Face GPT-2 folder (its
tokenizer from the folder's ``vocab.json`` + ``merges.txt``, or from ``--gpt2-vocab DIR``).
The last line of standard output is one JSON object: ``task``, ``n``, ``acc``, ``acc_norm``,
``checkpoint``. Scoring is llm.c's (see :mod:`smallgpt.evaluate`). Bad input is one line on
stderr and exit status 2.

The default dtype is float32 on every device, GPUs included: a choice is decided by the
difference of two summed losses, which bf16 rounding (about 3 significant digits) can flip, and
llm.c's published figures are fp32 ones (its script turns TF32 on; here TF32 stays off unless
the caller turned it on). ``--dtype bfloat16`` is the faster choice for quick comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from smallgpt.cli import OneLineParser, fail

PROG = "smallgpt-eval"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Evaluate a model on a multiple-choice data set "
                      "in the HellaSwag format (acc and acc_norm, scored as llm.c does).")
    p.add_argument("--hellaswag", required=True, metavar="FILE.jsonl",
                   help="one JSON object per line: ctx, endings (4 strings), label")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run folder, checkpoint file or Hugging Face GPT-2 folder")
    p.add_argument("--gpt2-vocab", metavar="DIR", help="encoder.json + vocab.bpe (or "
                   "vocab.json + merges.txt) for a Hugging Face folder without them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps "
                   "(auto: this rank's GPU if there is one)")
    p.add_argument("--dtype", default="float32",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (default float32 on every device, the precision of "
                   "llm.c's reference figures; auto: the trainer's choice, bf16 on GPUs)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="examples per forward pass (4 rows each; default 8)")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="evaluate the first N examples only (0: all)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr (when it is a terminal)")
    return p


def _evaluate(args: argparse.Namespace) -> Optional[dict]:
    """Load, score, return the summary on rank 0 (None elsewhere)."""
    from smallgpt.checkpoint import load_model
    from smallgpt.evaluate import evaluate_multiple_choice, read_hellaswag
    from smallgpt.train.distributed import init_distributed
    from smallgpt.train.hardware import resolve_device, resolve_dtype

    examples = read_hellaswag(args.hellaswag, args.limit)  # cheap checks before the model
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_model(args.checkpoint, args.gpt2_vocab)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer files (vocab.json + merges.txt "
                         "or tokenizer.json): pass --gpt2-vocab DIR")
    dist = init_distributed("auto", device)
    try:
        result = evaluate_multiple_choice(
            loaded.model, loaded.tokenizer, examples, device=device, dtype=dtype,
            batch_size=args.batch_size, dist=dist,
            progress=args.progress and dist.master and sys.stderr.isatty())
        # No rank tears the group down while another is still in it: gloo then hangs or
        # aborts the peer at exit (seen once in 8 runs of 2 processes on torch 2.7).
        dist.barrier()
    finally:
        dist.close()
    if not dist.master:
        return None
    return {"task": "hellaswag", **result.summary(), "checkpoint": str(args.checkpoint)}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``smallgpt-eval``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        return fail(PROG, f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit < 0:
        return fail(PROG, f"--limit must be >= 0, got {args.limit}")
    from smallgpt.checkpoint import CheckpointError
    from smallgpt.train.hardware import HardwareError

    try:
        summary = _evaluate(args)
    except (CheckpointError, HardwareError, ValueError) as e:  # EvalDataError is a ValueError
        return fail(PROG, e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        return fail(PROG, e, 1)
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
