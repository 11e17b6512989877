"""``smallgpt-train``: train a GPT from a preset, a TOML file and command-line overrides.

With no arguments it runs the quickstart: the ``shakespeare-cpu`` preset on the bundled Tiny
Shakespeare (tokenized on first use into ``~/.cache/smallgpt``), writing to
``./out/shakespeare-cpu``.

Any config field can be overridden as ``--section.key VALUE`` (``--model.n_layer 4``,
``--optim.lr=3e-3``) or ``--set key=value`` (``--set max_time=60``); unknown keys are an
error that lists the valid ones.

``$SMALLGPT_MAX_STEPS=N`` caps every run at N optimizer steps past where it starts (a resume
goes N steps further): the test suite runs the documentation's training commands with it, so
that each finishes in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Dict, List, NoReturn, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from smallgpt.config import TrainConfig

PROG = "smallgpt-train"
DEFAULT_PRESET = "shakespeare-cpu"
#: The environment variable that caps a run's steps (see the module docstring).
MAX_STEPS_ENV = "SMALLGPT_MAX_STEPS"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        description="Train a GPT. No arguments: the Tiny Shakespeare CPU quickstart.",
        epilog="Override any config key with --section.key VALUE (e.g. --model.n_layer 4, "
        "--optim.lr 3e-3, --data.batch_size 16) or --set key=value. Layers: defaults < "
        "--preset < --config < overrides/flags. Under torchrun the same command runs DDP.",
    )
    p.add_argument("--preset", help=f"packaged preset (default {DEFAULT_PRESET} unless "
                   "--config is given); see --list-presets")
    p.add_argument("--config", metavar="FILE.toml", help="TOML config file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out", help="run folder (default: out/<config name, data folder or "
                   "preset>)")
    p.add_argument("--data", help="shard folder (train_*.bin, val_*.bin, meta.json)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (0 = no limit)")
    p.add_argument("--max-time", type=float, metavar="SECONDS",
                   help="stop after SECONDS of wall time, final eval and checkpoint included")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from ckpt_latest.pt (its config + your "
                     "overrides)")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in a --out that holds another run, deleting its files")
    p.add_argument("--data-changed-ok", action="store_true",
                   help="with --resume: continue although the data folder's tokenizer or shards "
                   "are not those the run trained on")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from a pretrained model: a Hugging Face GPT-2 folder, a run "
                   "folder or a checkpoint file (fresh optimizer and schedule)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the whole validation split of --data with the --init-from "
                   "or --resume model, print one JSON line, write nothing")
    p.add_argument("--log-interval", type=int, metavar="N", help="log metrics every N steps")
    p.add_argument("--eval-interval", type=int, metavar="N", help="evaluate every N steps")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: bf16 on CUDA and bf16-capable CPUs, else fp32)")
    p.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"],
                   help="auto: DDP under torchrun with several processes; ddp/fsdp also with "
                   "one process")
    p.add_argument("--ddp", dest="parallel", action="store_const", const="ddp",
                   help="same as --parallel ddp")
    for name, what in (("compile", "torch.compile the model"),
                       ("grad-checkpointing", "recompute activations in the backward pass"),
                       ("tensorboard", "also log to <out>/tensorboard"),
                       ("progress", "progress bar / per-step lines"),
                       ("plot", "draw loss_curve.png at the end")):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                       help=what)
    p.add_argument("--wandb", metavar="PROJECT", help="log to Weights & Biases (pip install "
                   "'smallgpt[wandb]'; WANDB_MODE=offline works)")
    p.add_argument("--trackio", metavar="PROJECT", help="log to trackio (local; pip install "
                   "'smallgpt[trackio]')")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--list-presets", action="store_true", help="print preset names and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit")
    return p


def _split_dotted(extra: Sequence[str], parser: _Parser) -> Dict[str, str]:
    """Turn leftover ``--a.b VALUE`` / ``--a.b=VALUE`` arguments into overrides."""
    out: Dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            parser.error(f"unrecognized argument: {arg}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(extra):
                parser.error(f"argument {arg}: expected a value")
            i += 1
            value = extra[i]
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _to_toml(d: Dict[str, object]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a TOML basic string is a JSON string
        return repr(v)

    top = [f"{k} = {fmt(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = ["\n".join(top)]
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(f"[{k}]\n" + "\n".join(f"{k2} = {fmt(v2)}" for k2, v2 in v.items()))
    return "\n\n".join(parts) + "\n"


def _norm(value: object) -> object:
    """A value as typed and as parsed compare equal (``"3"`` and 3, ``"true"`` and True)."""
    text = str(value).strip().lower()
    try:
        return float(text)
    except ValueError:
        return text


def _overrides(args: argparse.Namespace, extra: Sequence[str],
               parser: _Parser) -> Dict[str, object]:
    overrides: Dict[str, object] = dict(_split_dotted(extra, parser))
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    flags = {
        "data.path": args.data, "max_steps": args.max_steps, "max_time": args.max_time,
        "log_interval": args.log_interval, "eval_interval": args.eval_interval,
        "device": args.device, "dtype": args.dtype, "parallel": args.parallel,
        "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
        "tensorboard": args.tensorboard, "progress": args.progress, "plot": args.plot,
        "wandb": args.wandb, "trackio": args.trackio, "seed": args.seed,
        "init_from": args.init_from,
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key in overrides and _norm(overrides[key]) != _norm(value):
            parser.error(f"{key} is given twice, as {value!r} by its flag and as "
                         f"{overrides[key]!r} by --set/--{key}; give it once")
        overrides[key] = value
    return overrides


def resolve_config(args: argparse.Namespace,
                   overrides: Dict[str, object]) -> Tuple[TrainConfig, bool]:
    """The run's configuration and whether it resumes a checkpoint.

    The run folder is ``--out``, else the ``out`` of the config file, else named after the
    config file, the data folder or the preset; ``--resume`` continues the run found there
    with its own config and the command-line overrides given now on top (the preset and
    config file only locate the folder: re-applying them could undo the run's own overrides).
    """
    from smallgpt.checkpoint import RunFolder
    from smallgpt.config import (
        ConfigError,
        apply_overrides,
        build_config,
        config_from_dict,
        default_out,
    )


    preset = args.preset
    if preset is None and args.config is None:
        preset = DEFAULT_PRESET
    cfg = build_config(preset, args.config, overrides)
    out = args.out or default_out(cfg, preset, args.config)
    if args.resume or (args.eval_only and not args.init_from):
        ckpt = RunFolder(out).load_latest()
        if not ckpt.train_config:
            raise ConfigError(f"{out}: the checkpoint has no training config to resume")
        cfg = config_from_dict(ckpt.train_config)
        apply_overrides(cfg, overrides)
        cfg.out = out
        _cap_steps(cfg, ckpt.step)
        return cfg, True
    cfg.out = out
    _cap_steps(cfg, 0)
    return cfg, False


def _cap_steps(cfg: TrainConfig, start: int) -> None:
    """``$SMALLGPT_MAX_STEPS=N``: at most N steps past ``start`` (``max_steps`` lowered, so
    the schedule and ``config.json`` say what runs)."""
    from smallgpt.config import ConfigError

    raw = os.environ.get(MAX_STEPS_ENV, "").strip()
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"${MAX_STEPS_ENV} must be a positive integer, got {raw!r}")
    cfg.max_steps = start + n if cfg.max_steps <= 0 else min(cfg.max_steps, start + n)


def _note_limits(args: argparse.Namespace, cfg: TrainConfig) -> None:
    if args.max_steps and args.max_time is None and cfg.max_time > 0:
        print(f"{PROG}: note: max_time = {cfg.max_time:g} s (from the preset or config) also "
              "applies; add --max-time 0 to run all the steps", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``smallgpt-train``; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.eval_only and not (args.init_from or args.resume or args.out):
        parser.error("--eval-only needs a model: --init-from PATH or --resume/--out RUN")
    overrides = _overrides(args, extra, parser)

    from smallgpt.checkpoint import CheckpointError
    from smallgpt.config import ConfigError, config_to_dict, list_presets, validate
    from smallgpt.train.hardware import HardwareError

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    try:
        cfg, resume = resolve_config(args, overrides)
        validate(cfg)
        if args.print_config:
            print(_to_toml(config_to_dict(cfg)), end="")
            return 0
        _note_limits(args, cfg)
        model_keys = [k for k in overrides if k.startswith("model.")]
        if args.eval_only:
            return _eval_only(cfg, resume, model_keys)
        return _train(cfg, resume, args.overwrite, model_keys, args.data_changed_ok)
    except (ConfigError, CheckpointError, HardwareError) as e:
        return _fail(e, 2)
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
    except (ImportError, OSError) as e:
        return _fail(e, 1)


def _fail(e: BaseException, code: int) -> int:
    text = str(e).strip().splitlines()
    print(f"{PROG}: error: {text[0] if text else type(e).__name__}", file=sys.stderr)
    return code


def _train(cfg: TrainConfig, resume: bool, overwrite: bool, model_keys: List[str],
           data_changed_ok: bool) -> int:
    from smallgpt.train import TrainingDiverged, TrainingError, train

    try:
        summary = train(cfg, resume=resume, overwrite=overwrite, model_overrides=model_keys,
                        data_changed_ok=data_changed_ok)
    except TrainingDiverged as e:
        return _fail(e, 1)
    except TrainingError as e:
        return _fail(e, 2)
    if summary.get("signal") or summary["stopped"] == "interrupt":
        name = summary.get("signal") or "SIGINT"
        print(f"{PROG}: {'interrupted' if name == 'SIGINT' else 'stopped by ' + name} at step "
              f"{summary['step']}; checkpoint saved in {summary['out']} (continue with "
              "--resume)", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    return 0


def _eval_only(cfg: TrainConfig, resume: bool, model_keys: List[str]) -> int:
    from smallgpt.train import TrainingError, evaluate_only

    try:
        result = evaluate_only(cfg, resume=resume, model_overrides=model_keys)
    except TrainingError as e:
        return _fail(e, 2)
    if result is None:  # ranks other than 0
        return 0
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    # Always valid JSON (NaN is not): a non-finite figure is null, and the exit status says so.
    print(json.dumps({k: None if k in bad else v for k, v in result.items()}), flush=True)
    if bad:
        return _fail(f"the model's {bad[0]} is not finite (a diverged or broken model)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
