"""The tune-set experiments worth running for the CPU presets, with their machine time.

    python benches/tune_recipe.py                    # list every group, its command and time
    python benches/tune_recipe.py run books-300-lr   # run groups (bench_ablation.py, tune set)
    python benches/tune_recipe.py run books-600-confirm \\
        --variant 'winners=--optim.lr 1.2e-2 --model.value_embeds 1'
    python benches/tune_recipe.py report             # the report-set commands, for the end

Each *group* is one ``benches/bench_ablation.py`` invocation on the preset's **tune** split
(Tiny Shakespeare's tune split for ``shakespeare-cpu``, the tune books for ``books-cpu``):
the preset as it is (baseline) against a few variants, 3 seeds, interleaved, every model
scored on the whole tune validation split, written to ``benches/RESULTS.md``. The groups:

* ``books-cpu`` at **300 s**, a proxy for its 10-minute budget (half the machine time per
  run; a choice should still be confirmed at 600 s): the head (chunked loss, bf16 head),
  the schedule (WSD, warmup, floor), learning rates, batch size with learning rate scaled
  together, shapes, a longer context at equal tokens per step, value embeddings, how much
  of the budget evaluation takes; then ``books-600-confirm`` at 600 s with the winners
  (``--variant``);
* ``shakespeare-cpu`` at **32 s** (the quickstart) and at **300 s** (its ``[[by_time]]`` row
  for budgets of 200 s and more): shapes, optimizer settings, regularisation (the 300 s run
  overfits 1 MB of text), value embeddings.

Keep what wins beyond the spread on the tune set, change the preset, confirm against nanoGPT
on the tune set (``bench_vs_nanogpt.py --set tune``), and only then run ``report``: the
report-set figures for RESULTS and README.

Time estimates are ``runs x (seconds + overhead)``. The overhead per run (start-up, and the
fp32 scoring of the whole validation split: for the books about 285k tokens through a
50k-token head, some 4 TFLOP) is an estimate, not a measurement (none could be made on the
busy machine this was written on): 80 s for ``books-cpu``, 8 s for ``shakespeare-cpu``.
Check it against the first group's wall time and scale the rest.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
#: Seconds per run beyond its budget: start-up plus scoring every validation token.
OVERHEAD_S = {"books-cpu": 80.0, "shakespeare-cpu": 8.0}
NANO = "/tmp/nanogpt"  # a checkout of karpathy/nanoGPT (--nanogpt)


@dataclass
class Group:
    """One bench_ablation invocation: a preset at a budget against a list of arms."""

    name: str
    preset: str
    seconds: float
    arms: List[Tuple[str, str]] = field(default_factory=list)
    why: str = ""

    def command(self, seeds: str, threads: int, extra: List[str]) -> List[str]:
        cmd = ["python", "benches/bench_ablation.py", "--preset", self.preset,
               "--set", "tune", "--seconds", f"{self.seconds:g}", "--seeds", seeds,
               "--threads", str(threads), "--title", f"tune: {self.name}"]
        cmd += ["--only", "baseline"]
        for name, overrides in self.arms:
            cmd += ["--variant", f"{name}={overrides}"]
        return cmd + extra

    def runs(self, seeds: int, extra_arms: int = 0) -> int:
        return seeds * (1 + len(self.arms) + extra_arms)

    def hours(self, seeds: int, extra_arms: int = 0) -> float:
        per_run = self.seconds + OVERHEAD_S[self.preset]
        return self.runs(seeds, extra_arms) * per_run / 3600.0


BOOKS = "books-cpu"
SHAKES = "shakespeare-cpu"
GROUPS: List[Group] = [
    Group("books-300-head", BOOKS, 300, [
        ("loss_chunk 256", "--model.loss_chunk 256"),
        ("loss_chunk 1024", "--model.loss_chunk 1024"),
        ("fp32", "--dtype float32"),
        ("fp32, head bf16", "--dtype float32 --set head_dtype=auto"),
        ("bf16, head fp32", "--dtype bfloat16 --set head_dtype=float32"),
    ], "the head is most of the FLOPs: chunking (memory, cache), its precision"),
    Group("books-300-schedule", BOOKS, 300, [
        ("wsd 0.2", "--optim.schedule wsd --optim.decay_fraction 0.2"),
        ("wsd 0.4", "--optim.schedule wsd --optim.decay_fraction 0.4"),
        ("warmup 20", "--optim.warmup_steps 20"),
        ("warmup 100", "--optim.warmup_steps 100"),
        ("min_lr 0", "--optim.min_lr 0"),
    ], "warmup-stable-decay against the cosine, warmup length, the floor"),
    Group("books-300-lr", BOOKS, 300, [
        ("adamw lr 3e-3", "--optim.lr 3e-3 --optim.min_lr 1.5e-4"),
        ("adamw lr 1.2e-2", "--optim.lr 1.2e-2 --optim.min_lr 6e-4"),
        ("muon lr 0.005", "--optim.muon_lr 0.005"),
        ("muon lr 0.02", "--optim.muon_lr 0.02"),
        ("beta2 0.95", "--optim.beta2 0.95"),
    ], "learning rates of both optimizers (the preset's were tuned on a report book)"),
    Group("books-300-batch", BOOKS, 300, [
        ("B2, lr x0.71", "--data.batch_size 2 --optim.lr 4.2e-3 --optim.muon_lr 0.007"),
        ("B8, lr x1.41", "--data.batch_size 8 --optim.lr 8.5e-3 --optim.muon_lr 0.014"),
        ("B8, same lr", "--data.batch_size 8"),
        ("B16, lr x2", "--data.batch_size 16 --optim.lr 1.2e-2 --optim.muon_lr 0.02"),
    ], "batch size with the learning rate scaled together (square root) and alone"),
    Group("books-300-shape", BOOKS, 300, [
        ("2 layers", "--model.n_layer 2"),
        ("6 layers", "--model.n_layer 6"),
        ("n_embd 192", "--model.n_embd 192"),
        ("n_embd 256", "--model.n_embd 256"),
        ("untied head", "--model.tie_embeddings false"),
        ("value_embeds 1", "--model.value_embeds 1"),
        ("value_embeds 2", "--model.value_embeds 2"),
    ], "depth and width (the head's cost grows with the width), untied head, value "
       "embeddings"),
    Group("books-300-context", BOOKS, 300, [
        ("T128 B8", "--model.block_size 128 --data.batch_size 8"),
        ("T512 B2", "--model.block_size 512 --data.batch_size 2"),
        ("T1024 B1", "--model.block_size 1024 --data.batch_size 1"),
    ], "a longer context at equal tokens per step"),
    Group("books-300-eval", BOOKS, 300, [
        ("no evals, final on eval_tokens",
         "--eval-interval 0 --set data.final_eval_full=false"),
        ("evals every 400", "--eval-interval 400"),
    ], "how much of the budget the preset's own evaluations take (the score is the bench's)"),
    Group("books-600-confirm", BOOKS, 600, [],
          "the winners at the real budget: pass them with --variant"),
    Group("shakespeare-32-shape", SHAKES, 32, [
        ("2 layers", "--model.n_layer 2"),
        ("n_embd 96", "--model.n_embd 96"),
        ("n_embd 192", "--model.n_embd 192"),
        ("T128 B8", "--model.block_size 128 --data.batch_size 8"),
        ("B8", "--data.batch_size 8"),
        ("B32", "--data.batch_size 32"),
    ], "the quickstart's shape and batch"),
    Group("shakespeare-32-optim", SHAKES, 32, [
        ("adamw lr 3e-3", "--optim.lr 3e-3"),
        ("adamw lr 8e-3", "--optim.lr 8e-3"),
        ("muon lr 0.005", "--optim.muon_lr 0.005"),
        ("muon lr 0.02", "--optim.muon_lr 0.02"),
        ("wsd 0.3", "--optim.schedule wsd --optim.decay_fraction 0.3"),
        ("warmup 10", "--optim.warmup_steps 10"),
        ("value_embeds 1", "--model.value_embeds 1"),
        ("head bf16", "--set head_dtype=auto"),
    ], "learning rates, schedule and the cheap ideas at 32 s"),
    Group("shakespeare-300-shape", SHAKES, 300, [
        ("1x128 T64 (the 32 s shape)",
         "--model.n_layer 1 --model.n_embd 128 --model.block_size 64"),
        ("2x128", "--model.n_layer 2 --model.n_embd 128"),
        ("4x192", "--model.n_layer 4"),
        ("3x256", "--model.n_embd 256"),
        ("4x256", "--model.n_layer 4 --model.n_embd 256"),
        ("T256 B8", "--model.block_size 256 --data.batch_size 8"),
    ], "the [[by_time]] row's shape (now 3 x 192, T 128)"),
    Group("shakespeare-300-regularise", SHAKES, 300, [
        ("dropout 0.1", "--model.dropout 0.1"),
        ("dropout 0.2", "--model.dropout 0.2"),
        ("weight decay 0.3", "--optim.weight_decay 0.3"),
        ("muon wd 0.05", "--optim.muon_weight_decay 0.05"),
        ("adamw lr 3e-3", "--optim.lr 3e-3"),
        ("wsd 0.3", "--optim.schedule wsd --optim.decay_fraction 0.3"),
        ("value_embeds 1", "--model.value_embeds 1"),
    ], "300 s overfits 1 MB of text: regularisation, a lower rate, the schedule"),
]


def report_commands(seeds: str, threads: int,
                    nano: str = NANO) -> List[Tuple[str, List[str], float]]:
    """The report-set runs, each with its estimated hours (3 seeds)."""
    return [
        ("books-cpu vs nanoGPT, report set, 10 min + 3/4/5/6 min crossing",
         ["python", "benches/bench_vs_nanogpt.py", nano, "--set", "report", "--seeds", seeds,
          "--threads", str(threads)], 3 * (10 + 10 + 18 + 6) / 60),
        ("shakespeare-cpu, report split, 300 s",
         ["python", "benches/bench_ablation.py", "--set", "report", "--seconds", "300", "--only",
          "baseline", "--seeds", seeds, "--threads", str(threads), "--title",
          "report: shakespeare-cpu 300 s"], 3 * 308 / 3600),
        ("shakespeare-cpu, report split, 32 s (the quickstart)",
         ["python", "benches/bench_ablation.py", "--set", "report", "--seconds", "32", "--only",
          "baseline", "--seeds", seeds, "--threads", str(threads), "--title",
          "report: shakespeare-cpu 32 s"], 3 * 40 / 3600),
    ]


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min"


def list_groups(args: argparse.Namespace) -> None:
    n = len(args.seeds.split(","))
    total = 0.0
    print(f"Tune-set groups ({n} seeds each, {args.threads} threads); run from the checkout "
          "root:\n")
    for g in GROUPS:
        h = g.hours(n, 1 if not g.arms else 0)
        total += h
        print(f"# {g.name}: {g.why}\n#   {g.runs(n, 1 if not g.arms else 0)} runs of "
              f"{g.seconds:g} s, about {_duration(h)}")
        print(shlex.join(g.command(args.seeds, args.threads, [])) + "\n")
    print(f"# all groups: about {_duration(total)} of machine time\n")
    print("# then, on the tune set against nanoGPT (10 minutes, no crossing), about "
          f"{_duration(3 * 22 / 60)}:")
    print(shlex.join(["python", "benches/bench_vs_nanogpt.py", args.nanogpt, "--set",
                      "tune", "--budgets", "", "--seeds", args.seeds, "--threads",
                      str(args.threads)]) + "\n")
    print("# at the end, the report-set figures (`report`):")
    for what, cmd, hours in report_commands(args.seeds, args.threads, args.nanogpt):
        print(f"# {what}: about {_duration(hours)}\n{shlex.join(cmd)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", default="list", choices=["list", "run", "report"])
    p.add_argument("groups", nargs="*", help="with run: group names")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nanogpt", default=NANO, help=f"a nanoGPT checkout (default {NANO})")
    p.add_argument("--variant", action="append", default=[],
                   help="with run: an extra arm for every group ('NAME=OVERRIDES')")
    p.add_argument("--dry-run", action="store_true", help="with run/report: print only")
    p.add_argument("--no-record", action="store_true", help="passed to the benches")
    args = p.parse_args()
    if args.action == "list":
        list_groups(args)
        return 0
    extra = [a for v in args.variant for a in ("--variant", v)]
    extra += ["--no-record"] if args.no_record else []
    if args.action == "report":
        cmds = [c + (["--no-record"] if args.no_record else [])
                for _, c, _ in report_commands(args.seeds, args.threads, args.nanogpt)]
    else:
        known = {g.name: g for g in GROUPS}
        unknown = [n for n in args.groups if n not in known]
        if unknown or not args.groups:
            raise SystemExit(f"run: name groups from {', '.join(known)}")
        cmds = [known[n].command(args.seeds, args.threads, extra) for n in args.groups]
        if any(not known[n].arms for n in args.groups) and not args.variant:
            raise SystemExit("books-600-confirm needs the arms to confirm: --variant ...")
    for cmd in cmds:
        print("+ " + shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
