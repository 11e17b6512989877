"""``smallgpt-eval``: evaluate a model on lm-evaluation-harness tasks, on the perplexity of a
text file, or on a HellaSwag-format file scored as llm.c scores it.

Examples::

    smallgpt-eval --tasks lambada_openai,wikitext,hellaswag --checkpoint out/my-run
    smallgpt-eval --tasks tiny_lambada --include-path tests/fixtures/lmeval --checkpoint gpt2/
    smallgpt-eval --perplexity wiki.test.raw --checkpoint out/my-run --stride 512
    smallgpt-eval --hellaswag hellaswag_val.jsonl --checkpoint gpt2/ --device cuda
    torchrun --standalone --nproc_per_node=8 -m smallgpt.cli.eval --hellaswag ... --checkpoint ...

``--checkpoint`` is a run folder, a checkpoint file or a Hugging Face GPT-2 folder (its
tokenizer from the folder's ``vocab.json`` + ``merges.txt``, or from ``--gpt2-vocab DIR``).
The last line of standard output is one JSON object: for ``--tasks`` task -> metric -> value
(``--output FILE`` also writes lm-eval's whole results JSON), for ``--perplexity`` the
figures of :class:`smallgpt.evaluate.PerplexityResult`, for ``--hellaswag`` ``task``, ``n``,
``acc``, ``acc_norm``, ``checkpoint``. ``--tasks`` needs the ``eval`` extra (lm-eval). Bad
input is one line on stderr and exit status 2; ``--output`` is written whole or not at all.

The default dtype is float32 on every device, GPUs included: a choice is decided by the
difference of two summed losses, which bf16 rounding (about 3 significant digits) can flip, and
published figures (llm.c's, the harness's hf backend on a float32 checkpoint) are fp32 ones
(llm.c's script turns TF32 on; here TF32 stays off unless the caller turned it on).
``--dtype bfloat16`` is the faster choice for quick comparisons.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from smallgpt.cli import OneLineParser, fail

PROG = "smallgpt-eval"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Evaluate a model: lm-evaluation-harness tasks "
                      "(--tasks), the perplexity of a text file (--perplexity), or a "
                      "HellaSwag-format file scored as llm.c does (--hellaswag).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tasks", metavar="A,B,C", help="lm-eval task names, groups, tags or "
                      "task YAML files, comma-separated (needs smallgpt[eval])")
    mode.add_argument("--perplexity", metavar="FILE", help="a UTF-8 text file: token "
                      "perplexity, bits per byte and word perplexity by sliding windows")
    mode.add_argument("--hellaswag", metavar="FILE.jsonl",
                      help="one JSON object per line: ctx, endings (4 strings), label")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run folder, checkpoint file or Hugging Face GPT-2 folder")
    p.add_argument("--gpt2-vocab", metavar="DIR", help="encoder.json + vocab.bpe (or "
                   "vocab.json + merges.txt) for a Hugging Face folder without them")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="--tasks: a folder of your own task YAMLs (repeatable)")
    p.add_argument("--num-fewshot", type=int, metavar="K",
                   help="--tasks: examples shown before each question (default: the task's)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="--tasks, --hellaswag: the first N examples of each task (default: all)")
    p.add_argument("--stride", type=int, metavar="S", help="--perplexity: tokens between "
                   "window starts (default: half the context; the context: disjoint windows)")
    p.add_argument("--output", metavar="FILE.json", help="write the results here (--tasks: "
                   "lm-eval's results JSON, as lm_eval --output_path writes it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps "
                   "(auto: this rank's GPU if there is one)")
    p.add_argument("--dtype", default="float32",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (default float32 on every device, the precision of "
                   "published figures; auto: the trainer's choice, bf16 on GPUs and "
                   "bf16-capable CPUs)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="rows per forward pass (--hellaswag: examples of 4 rows; default 8)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on stderr (when it is a terminal)")
    return p


def _check_args(args: argparse.Namespace) -> Optional[str]:
    """The reason the options are wrong or do not fit together, or None."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                             ("--num-fewshot", args.num_fewshot, 0),
                             ("--stride", args.stride, 1)):
        if value is not None and value < low:
            return f"{flag} must be at least {low}, got {value}"
    if args.stride is not None and args.perplexity is None:
        return "--stride applies to --perplexity only"
    if args.limit is not None and args.perplexity is not None:
        return "--limit applies to --tasks and --hellaswag"
    if args.tasks is None and (args.include_path or args.num_fewshot is not None):
        return "--include-path and --num-fewshot apply to --tasks only"
    if args.tasks is not None and not [t for t in args.tasks.split(",") if t.strip()]:
        return "--tasks names no task"
    if args.output is not None:
        out = Path(args.output)
        if out.is_dir():
            return f"--output {out} is a folder (give a file name)"
        if not out.parent.is_dir():
            return f"--output {out}: no folder {out.parent}"
        if not os.access(out.parent, os.W_OK):
            return f"--output {out}: cannot write to {out.parent}"
    return None


def _load(args: argparse.Namespace) -> Any:
    from smallgpt.checkpoint import load_model

    loaded = load_model(args.checkpoint, args.gpt2_vocab)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer files (vocab.json + merges.txt "
                         "or tokenizer.json): pass --gpt2-vocab DIR")
    return loaded


def _hellaswag(args: argparse.Namespace) -> Optional[dict]:
    """Load, score, return the summary on rank 0 (None elsewhere)."""
    from smallgpt.evaluate import evaluate_multiple_choice, read_hellaswag
    from smallgpt.train.distributed import init_distributed
    from smallgpt.train.hardware import resolve_device, resolve_dtype

    examples = read_hellaswag(args.hellaswag, args.limit or 0)  # cheap checks before the model
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    dtype = resolve_dtype(args.dtype, device)
    loaded = _load(args)
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


def _perplexity(args: argparse.Namespace) -> dict:
    import torch

    from smallgpt.evaluate import read_text_file, sliding_window_perplexity
    from smallgpt.train.hardware import resolve_device, resolve_dtype

    text = read_text_file(args.perplexity)
    device = resolve_device(args.device)
    dtype = torch.float32 if args.dtype == "auto" else resolve_dtype(args.dtype, device)
    loaded = _load(args)
    block = loaded.model.config.block_size
    if args.stride is not None and args.stride > block:
        raise ValueError(f"--stride {args.stride} is longer than the model's context ({block})")
    result = sliding_window_perplexity(
        loaded.model, loaded.tokenizer, text, stride=args.stride, device=device, dtype=dtype,
        batch_size=args.batch_size, progress=args.progress and sys.stderr.isatty())
    return {"file": str(args.perplexity), **result.summary(), "checkpoint": str(args.checkpoint)}


def _tasks(args: argparse.Namespace) -> Dict[str, Any]:
    """lm-eval's results dict (raises ImportError without the extra)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("--tasks needs lm-evaluation-harness: pip install 'smallgpt[eval]'")
    from smallgpt.lmeval import SmallGPTLM, evaluate_tasks
    from smallgpt.lmeval.runner import quiet_lm_eval

    quiet_lm_eval()
    if not args.progress or not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lm = SmallGPTLM(checkpoint=args.checkpoint, gpt2_vocab=args.gpt2_vocab, device=args.device,
                    dtype=args.dtype, batch_size=args.batch_size,
                    progress=args.progress and sys.stderr.isatty())
    model_args = {"checkpoint": str(args.checkpoint), "dtype": str(lm.dtype),
                  "device": str(lm.device), "batch_size": args.batch_size}
    # lm-eval prints notes ("bootstrapping for stddev: ...") to stdout, which is ours to keep
    # for the results line.
    with contextlib.redirect_stdout(sys.stderr):
        return evaluate_tasks(lm, names, include_path=args.include_path, limit=args.limit,
                              num_fewshot=args.num_fewshot, model_args=model_args)


def _run(args: argparse.Namespace) -> Optional[dict]:
    """The summary to print (None on ranks other than 0); writes ``--output``."""
    from smallgpt._io import atomic_write_text

    if args.tasks is not None:
        from smallgpt.lmeval import summarize, write_results

        results = _tasks(args)
        if args.output:
            write_results(args.output, results)
        return summarize(results)
    summary = _perplexity(args) if args.perplexity is not None else _hellaswag(args)
    if summary is not None and args.output:
        atomic_write_text(args.output, json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``smallgpt-eval``; returns the exit status."""
    args = _parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return fail(PROG, problem)
    from smallgpt.checkpoint import CheckpointError
    from smallgpt.train.hardware import HardwareError

    try:
        summary = _run(args)
    # EvalDataError, TaskError and LMEvalError are ValueErrors.
    except (CheckpointError, HardwareError, ValueError, ImportError) as e:
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
