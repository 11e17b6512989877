"""``smallgpt-train``: train a GPT from a preset, a TOML file and command-line overrides.

With no arguments it runs the quickstart: the ``shakespeare-cpu`` preset on the bundled Tiny
Shakespeare (tokenized on first use into ``~/.cache/smallgpt``), writing to
``./out/shakespeare-cpu``.

Any config field can be overridden as ``--section.key VALUE`` (``--model.n_layer 4``,
``--optim.lr=3e-3``) or ``--set key=value`` (``--set max_time=60``); unknown keys are an
error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, NoReturn, Optional, Sequence

PROG = "smallgpt-train"
DEFAULT_PRESET = "shakespeare-cpu"


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
                   "--config or --resume is given); see --list-presets")
    p.add_argument("--config", metavar="FILE.toml", help="TOML config file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out", help="output folder (default ./out/<preset>)")
    p.add_argument("--data", help="shard folder (train_*.bin, val_*.bin, meta.json)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (0 = no limit)")
    p.add_argument("--max-time", type=float, metavar="SECONDS",
                   help="stop after SECONDS of wall time, final eval and checkpoint included")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/ckpt_latest.pt (its config + your overrides)")
    p.add_argument("--log-interval", type=int, metavar="N", help="log metrics every N steps")
    p.add_argument("--eval-interval", type=int, metavar="N", help="evaluate every N steps")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: bf16 on CUDA/AMX CPUs, fp32 otherwise)")
    p.add_argument("--compile", action="store_true", default=None, help="use torch.compile")
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
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    top = [f"{k} = {fmt(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = ["\n".join(top)]
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(f"[{k}]\n" + "\n".join(f"{k2} = {fmt(v2)}" for k2, v2 in v.items()))
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``smallgpt-train``; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)

    from pathlib import Path

    from smallgpt.config import (
        ConfigError,
        TrainConfig,
        apply_overrides,
        build_config,
        config_to_dict,
        list_presets,
        validate,
    )

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    try:
        overrides: Dict[str, object] = _split_dotted(extra, parser)
        for item in args.set:
            if "=" not in item:
                parser.error(f"--set expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            overrides[k.strip()] = v.strip()
        flag_overrides = {
            "data.path": args.data, "max_steps": args.max_steps, "max_time": args.max_time,
            "log_interval": args.log_interval, "eval_interval": args.eval_interval,
            "device": args.device, "dtype": args.dtype, "compile": args.compile,
            "seed": args.seed,
        }
        overrides.update({k: v for k, v in flag_overrides.items() if v is not None})

        preset = args.preset
        if preset is None and args.config is None and not args.resume:
            preset = DEFAULT_PRESET
        out = args.out or (f"out/{preset}" if preset else None)

        base: Optional[TrainConfig] = None
        if args.resume:
            from smallgpt.train import CKPT_LATEST, config_from_checkpoint

            out_dir = Path(args.out or f"out/{args.preset or DEFAULT_PRESET}")
            ckpt = out_dir / CKPT_LATEST
            if not ckpt.exists():
                raise ConfigError(f"--resume: no checkpoint {ckpt}")
            base = config_from_checkpoint(ckpt)
            out = str(out_dir)
            preset = args.preset  # only re-applied when given explicitly
        cfg = build_config(preset, args.config, None, base=base)
        if out is not None:
            cfg.out = out
        apply_overrides(cfg, overrides)
        validate(cfg)
        if args.print_config:
            print(_to_toml(config_to_dict(cfg)), end="")
            return 0

        from smallgpt.train import TrainingDiverged, TrainingError, train

        try:
            summary = train(cfg, resume=args.resume)
        except TrainingDiverged as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        except TrainingError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        if summary["stopped"] == "interrupt":
            print(f"{PROG}: interrupted at step {summary['step']}; checkpoint saved in "
                  f"{summary['out']} (continue with --resume)", file=sys.stderr)
            return 130
        return 0
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
    except ImportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
