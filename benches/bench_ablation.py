"""Recipe decisions on the tune set: a preset against variants of it, interleaved, >= 3 seeds.

    python benches/bench_ablation.py                                    # shakespeare-cpu, 60 s
    python benches/bench_ablation.py --only muon,relu2 --seconds 32
    python benches/bench_ablation.py --preset books-cpu --seconds 300 \\
        --variant 'lr 3e-3=--optim.lr 3e-3' --variant 'lr 1.2e-2=--optim.lr 1.2e-2'
    python benches/bench_ablation.py --set report --seconds 300 --only baseline  # a report
    python benches/bench_ablation.py --seconds 5 --seeds 1 --only muon --no-record  # smoke

Every arm is ``smallgpt-train --preset PRESET --data DATA --max-time SECONDS --seed S`` plus
``--extra`` plus the arm's overrides; the *baseline* arm is the preset as it is (with
``--extra``). Arms are the built-in ablation of the modern options (:data:`VARIANTS`, chosen
by ``--only``) and any number of ``--variant 'NAME=--section.key value ...'`` (learning
rates, batch sizes, shapes, schedules: anything ``smallgpt-train`` takes).

Data: the preset's *tune* split by default (``benches/recipe_data.py``: Tiny Shakespeare's
tune split for ``shakespeare-*`` presets, the tune books otherwise); ``--set report`` only to
report a decision already made, ``--data DIR`` for any other shard folder.

Runs are interleaved: for each seed every arm runs once, in an order rotated from seed to
seed, so that a drift of the machine hits every arm alike. Each final model is scored by
the one evaluator of every comparison, ``smallgpt-train --eval-only`` in fp32 on every token
of the validation split. The table gives each arm's values per seed, mean ± standard
deviation, the difference to the baseline's mean and a verdict from
:func:`harness.compare`: a difference within the larger spread of the two arms is a tie. It
is printed and appended to ``benches/RESULTS.md`` (``--no-record``: printed only).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

import harness
import recipe_data

#: One change each to a preset: the modern options taken out or put in, and the ideas of
#: issue 23. An arm that does not change the preset's configuration is left out (and said).
VARIANTS: Dict[str, List[str]] = {
    "adamw": ["--optim.name", "adamw"],
    "muon": ["--optim.name", "muon", "--optim.muon_lr", "0.01"],
    "gelu": ["--model.activation", "gelu_tanh"],
    "relu2": ["--model.activation", "relu2"],
    "no qk_norm": ["--model.qk_norm", "false"],
    "qk_norm": ["--model.qk_norm", "true"],
    "no zero_init_proj": ["--model.zero_init_proj", "false"],
    "zero_init_proj": ["--model.zero_init_proj", "true"],
    "tied head": ["--model.tie_embeddings", "true"],
    "untied head": ["--model.tie_embeddings", "false"],
    "rmsnorm": ["--model.norm", "rmsnorm"],
    "rmsnorm, no gains": ["--model.norm", "rmsnorm", "--model.norm_weight", "false"],
    "logit_softcap 15": ["--model.logit_softcap", "15"],
    "no biases": ["--model.bias", "false"],
    "wsd": ["--optim.schedule", "wsd", "--optim.decay_fraction", "0.3"],
    "value_embeds 1": ["--model.value_embeds", "1"],
    "loss_chunk 256": ["--model.loss_chunk", "256"],
    "head bf16": ["--set", "head_dtype=auto"],
}
BASELINE = "baseline"


def parse_variant(text: str) -> tuple:
    """``'NAME=--opt value ...'`` → ``(NAME, [--opt, value, ...])``."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or name == BASELINE:
        raise SystemExit(f"--variant: expected 'NAME=--section.key value ...' (a name other "
                         f"than {BASELINE!r}), got {text!r}")
    try:
        return name, shlex.split(rest)
    except ValueError as e:
        raise SystemExit(f"--variant {name!r}: {e}") from None


def arms(args: argparse.Namespace) -> Dict[str, List[str]]:
    """The baseline, the chosen built-in variants, then the ``--variant`` arms."""
    out: Dict[str, List[str]] = {BASELINE: []}
    names = args.only.split(",") if args.only else ([] if args.variant else list(VARIANTS))
    for name in names:
        if name == BASELINE:  # `--only baseline`: the preset alone (a report run)
            continue
        if name not in VARIANTS:
            raise SystemExit(f"--only: unknown variant {name!r}; built in: {', '.join(VARIANTS)}")
        out[name] = VARIANTS[name]
    for text in args.variant:
        name, extra = parse_variant(text)
        if name in out:
            raise SystemExit(f"--variant: the name {name!r} is used twice")
        out[name] = extra
    return out


def effective(args: argparse.Namespace, chosen: Dict[str, List[str]],
              data: Path) -> Dict[str, List[str]]:
    """The arms whose configuration differs from the baseline's (every arm is checked by
    ``smallgpt-train --print-config`` first: a bad override stops the bench before it
    starts)."""
    common = ["--preset", args.preset, "--data", str(data), "--max-time", str(args.seconds),
              *shlex.split(args.extra)]
    base = harness.smallgpt_config(common)
    out = {BASELINE: chosen[BASELINE]}
    for name, extra in chosen.items():
        if name == BASELINE:
            continue
        if harness.smallgpt_config(common + extra) == base:
            print(f"note: {name!r} ({' '.join(extra)}) is what --preset {args.preset} "
                  "already does; left out", flush=True)
            continue
        out[name] = extra
    return out


def run(name: str, extra: List[str], seed: int, args: argparse.Namespace,
        data: Path) -> Dict[str, Any]:
    """One arm, one seed: train, then score with the one evaluator."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
    out = args.work / "runs" / f"{args.arm_index[name]:02d}-{safe}-s{seed}"
    cmd = ["--preset", args.preset, "--data", str(data), "--max-time", str(args.seconds),
           "--seed", str(seed), *shlex.split(args.extra), *extra]
    r = harness.train_smallgpt(cmd, out, args.threads)
    ev = harness.eval_smallgpt(Path(str(r["ckpt"])), data, args.threads,
                               out.with_name(out.name + "-eval.log"))
    print(f"{name:24s} seed {seed}: val_bpb {ev['val_bpb']:.4f} ({r['steps']} steps)",
          flush=True)
    return {**r, **ev}


def main() -> int:
    args = parse_args()
    data = args.data or recipe_data.data_for(args.preset, args.set, args.work / "data",
                                             args.shared)
    chosen = effective(args, arms(args), data)
    args.arm_index = {name: i for i, name in enumerate(chosen)}
    results: Dict[str, List[Dict[str, Any]]] = {name: [] for name in chosen}
    names = list(chosen)
    for i, seed in enumerate(args.seeds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(run(name, chosen[name], seed, args, data))
    body = report(args, chosen, results, data)
    title = args.title or (f"{args.preset}, {args.set if not args.data else data.name}, "
                           f"{args.seconds:g} s, {args.threads} threads: "
                           + ", ".join(n for n in names if n != BASELINE))
    harness.append_run("bench_ablation", title, body, threads=args.threads,
                       record=not args.no_record)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare-cpu")
    p.add_argument("--set", choices=recipe_data.SETS, default="tune",
                   help="the preset's tune (default) or report split")
    p.add_argument("--data", type=Path, help="another shard folder (instead of --set)")
    p.add_argument("--seconds", type=float, default=60.0, help="--max-time of every run")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help="comma-separated built-in variants (baseline: none; "
                   f"{', '.join(VARIANTS)})")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME=OVERRIDES'",
                   help="an arm of its own: the preset with these smallgpt-train overrides")
    p.add_argument("--extra", default="", help="overrides for every arm, the baseline too")
    p.add_argument("--title", help="the RESULTS.md block's title (default: from the settings)")
    p.add_argument("--work", type=Path, default=Path("/tmp/smallgpt-ablation"))
    p.add_argument("--shared", type=Path, help="the shared data folder (default: found)")
    p.add_argument("--no-record", action="store_true", help="print only (no RESULTS.md)")
    args = p.parse_args()
    args.seeds = harness.parse_seeds(args.seeds)
    if args.seconds <= 0:
        raise SystemExit("--seconds must be positive")
    return args


def report(args: argparse.Namespace, chosen: Dict[str, List[str]],
           results: Dict[str, List[Dict[str, Any]]], data: Path) -> str:
    base = [r["val_bpb"] for r in results[BASELINE]]
    base_mean = statistics.fmean(base)
    rows = []
    for name, recs in results.items():
        vals = [r["val_bpb"] for r in recs]
        verdict = "" if name == BASELINE else harness.compare(base, vals,
                                                              names=(BASELINE, name))
        rows.append([name, f"`{' '.join(chosen[name]) or '(preset)'}`",
                     ", ".join(f"{v:.4f}" for v in vals), harness.fmt_mean(vals, 4),
                     "" if name == BASELINE else f"{statistics.fmean(vals) - base_mean:+.4f}",
                     verdict, f"{statistics.fmean(r['steps'] for r in recs):.0f}"])
    where = f"the {args.set} split" if not args.data else f"`{data}`"
    return "\n".join([
        f"`--preset {args.preset}` on {where} ({results[BASELINE][0]['val_tokens']:,} "
        f"validation tokens, all scored by `smallgpt-train --eval-only`, fp32), "
        f"{args.seconds:g} s per run, seeds {', '.join(map(str, args.seeds))} interleaved"
        + (f"; every arm adds `{args.extra}`" if args.extra else "") + ".",
        "",
        harness.md_table(["arm", "overrides", "val_bpb per seed", "mean ± sd", "vs baseline",
                          "verdict", "steps"], rows),
    ])


if __name__ == "__main__":
    sys.exit(main())
