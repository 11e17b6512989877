"""smallgpt against nanoGPT on the same books, the same tokens and the same wall time.

    python benches/bench_vs_nanogpt.py NANOGPT_CHECKOUT                 # report set, 3 seeds
    python benches/bench_vs_nanogpt.py NANOGPT --set tune --budgets ''  # a tuning check
    python benches/bench_vs_nanogpt.py NANOGPT --minutes 0.5 --seeds 1 --budgets 0.25 \\
        --no-record                                                     # smoke test

1. Data: the books of ``benches/recipe_data.py`` (``--set report`` by default: books no
   tuning has read; ``--set tune`` for decisions), tokenized once with GPT-2's vocabulary by
   ``smallgpt-tokenize``; nanoGPT gets the same token streams in its own layout
   (``data/<name>/train.bin`` / ``val.bin``, raw uint16).
2. nanoGPT: its own ``train.py`` (copied from the checkout into a scratch folder at run time,
   never vendored) with ``config/train_shakespeare_char.py`` scaled to the CPU the way its
   README does (``--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4
   --n_head=4 --n_embd=128 --dropout=0.0``). Its cosine schedule is fitted to the budget: a
   calibration run (once per invocation) measures its seconds per iteration, and
   ``max_iters`` = ``lr_decay_iters`` is what fits in 85 % of the budget (its evaluations,
   checkpoints and start-up take the rest), rounded to a multiple of ten so that its last
   evaluation, and checkpoint, falls on its last iteration. It is stopped at 110 % of the
   budget if it runs over; its last checkpoint counts. nanoGPT seeds its RNG with 1337 and
   has no option for it: seed ``s`` runs its unchanged ``train.py`` through a small launcher
   that adds ``s`` to every ``torch.manual_seed`` call (so seed 0 is nanoGPT as shipped).
3. smallgpt: ``smallgpt-train --preset books-cpu --max-time <budget> --seed s`` on the same
   shards (``--extra`` adds overrides, e.g. to try an option on the tune set).
4. Every model, both projects', is scored by one evaluator: ``smallgpt-train --eval-only``
   (fp32) on every token of the validation text, each with its own context length; bits per
   byte = summed nats / ln 2 / UTF-8 bytes of the text.
5. Seeds are interleaved (nanoGPT s1, smallgpt s1, nanoGPT s2, smallgpt s2, ...), so a drift
   of the machine hits both arms alike; the table gives mean ± standard deviation over the
   seeds, and a difference within the larger spread is reported as a tie
   (:func:`harness.compare`).

**Time to reach nanoGPT's figure.** Each seed also trains smallgpt with each shorter budget
of ``--budgets`` (minutes, default 3, 4, 5, 6; their order rotates from seed to seed), and
the report gives the shortest budget whose mean val_bpb beats nanoGPT's mean at the full
budget, and the shortest that beats it by more than the spread. These are separate runs,
not checkpoints of the long run: a user with five minutes types ``--max-time 300``, whose
learning-rate schedule decays within those five minutes (and whose preset may pick another
shape for that budget); a checkpoint taken halfway through a 10-minute run has seen the same
steps at a still-high learning rate, which understates what five minutes give. The cost is
machine time: ``seeds x (2 x minutes + sum(budgets))`` minutes plus evaluations (about two
hours for the defaults).

Results are printed and appended to ``benches/RESULTS.md`` (:func:`harness.append_run`);
``--no-record`` prints only. Every finished run is also kept in ``WORK/runs.jsonl``;
``--reuse`` takes runs of the same settings and commit from there instead of repeating them
(after an interruption).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import harness
import numpy as np
import recipe_data

ROOT = harness.ROOT
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--dropout=0.0", "--eval_iters=20", "--log_interval=1",
               "--always_save_checkpoint=True"]
NANO_TOKENS_PER_ITER = 12 * 64
# Our launcher, not nanoGPT's code: it shifts nanoGPT's fixed seed and runs its train.py.
SEEDED = """import runpy, sys
import torch
offset = int(sys.argv.pop(1))
_seed = torch.manual_seed
torch.manual_seed = lambda s: _seed(s + offset)
runpy.run_path("train.py", run_name="__main__")
"""


def nano_data(shards: Path, nano: Path, name: str) -> None:
    """Our shards as nanoGPT's ``data/<name>/{train,val}.bin`` (uint16, one stream each)."""
    from smallgpt.data import read_shard, split_files

    dest = nano / "data" / name
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        toks = np.concatenate([np.asarray(read_shard(p)) for p in split_files(shards, split)])
        toks.astype(np.uint16).tofile(dest / f"{split}.bin")


def setup_nanogpt(checkout: Path, nano: Path) -> None:
    """nanoGPT's files (from the checkout, unchanged) and our seed launcher."""
    nano.mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copyfile(checkout / name, nano / name)
    (nano / "config").mkdir(exist_ok=True)
    shutil.copyfile(checkout / "config" / "train_shakespeare_char.py",
                    nano / "config" / "train_shakespeare_char.py")
    (nano / "seeded.py").write_text(SEEDED, encoding="utf-8")


def _nanogpt(nano: Path, seed: int, extra: List[str], threads: int, limit_s: float,
             log: Path) -> float:
    """nanoGPT's train.py (through the launcher) until done or ``limit_s``; returns wall s."""
    cmd = [sys.executable, "seeded.py", str(seed), *NANOGPT_CPU, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=nano, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.perf_counter() - t0


def calibrate(nano: Path, dataset: str, threads: int, work: Path) -> float:
    """nanoGPT's seconds per iteration on this machine (median of iterations 10..60)."""
    log = work / "nanogpt-calibration.log"
    _nanogpt(nano, 0, [f"--dataset={dataset}", "--max_iters=60", "--lr_decay_iters=60",
                       "--eval_interval=1000", f"--out_dir={work / 'nano-cal'}"],
             threads, 900, log)
    out = log.read_text(encoding="utf-8", errors="replace")
    times = [float(m) for m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", out)][10:]
    if not times:
        raise SystemExit(f"nanoGPT calibration failed:\n{out[-2000:]}")
    return statistics.median(times) / 1000.0


def nano_iters(per_iter_s: float, budget_s: float) -> int:
    """Iterations that fit in 85 % of the budget, a multiple of 10 (at least 10)."""
    return max(10, int(budget_s * 0.85 / per_iter_s) // 10 * 10)


def run_nanogpt(nano: Path, dataset: str, seed: int, iters: int, budget_s: float,
                threads: int, work: Path) -> Dict[str, Any]:
    out_dir = work / f"nano-s{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    wall = _nanogpt(nano, seed, [f"--dataset={dataset}", f"--max_iters={iters}",
                                 f"--lr_decay_iters={iters}", f"--eval_interval={iters // 10}",
                                 f"--out_dir={out_dir}"],
                    threads, budget_s * 1.1, work / f"nano-s{seed}.log")
    if not (out_dir / "ckpt.pt").is_file():
        raise SystemExit(f"nanoGPT wrote no checkpoint; see {work / f'nano-s{seed}.log'}")
    return {"wall_s": wall, "ckpt": str(out_dir / "ckpt.pt")}


def nanogpt_to_smallgpt(ckpt: Path, shards: Path, dest: Path) -> int:
    """nanoGPT's checkpoint as a smallgpt checkpoint file (same parameter names); returns
    nanoGPT's iteration."""
    import torch

    from smallgpt.checkpoint import Checkpoint
    from smallgpt.model import GPTConfig

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    a = raw["model_args"]
    cfg = GPTConfig(vocab_size=a["vocab_size"], block_size=a["block_size"],
                    n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"],
                    bias=a["bias"], activation="gelu", position="learned")
    state = {k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()
             if not k.endswith(".attn.bias")}
    tok = (shards / "tokenizer.json").read_text(encoding="utf-8")
    Checkpoint(cfg, state, tokenizer=tok, step=int(raw["iter_num"])).save(dest)
    return int(raw["iter_num"])


class Runs:
    """Finished runs in ``WORK/runs.jsonl``, keyed by their settings and the commit."""

    def __init__(self, path: Path, reuse: bool) -> None:
        self.path = path
        self.done: Dict[str, Dict[str, Any]] = {}
        if reuse and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                self.done[rec["key"]] = rec
        elif path.exists():
            path.unlink()

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.done.get(key)

    def add(self, key: str, rec: Dict[str, Any]) -> Dict[str, Any]:
        rec = {**rec, "key": key}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[key] = rec
        return rec


def _print_run(rec: Dict[str, Any]) -> None:
    print(f"{rec['arm']:>14s} seed {rec['seed']}: val_bpb {rec['val_bpb']:.4f} "
          f"({rec['steps']} steps, {rec['wall_s']:.0f} s)", flush=True)


def nano_arm(args: argparse.Namespace, ctx: Dict[str, Any], seed: int) -> Dict[str, Any]:
    key = f"nano|{ctx['key']}|{ctx['iters']}|{seed}"
    rec = ctx["runs"].get(key)
    if rec is None:
        work, nano = args.work, args.work / "nano"
        r = run_nanogpt(nano, ctx["dataset"], seed, ctx["iters"], args.minutes * 60,
                        args.threads, work)
        model = work / f"nanogpt-s{seed}.pt"
        step = nanogpt_to_smallgpt(Path(r["ckpt"]), ctx["shards"], model)
        ev = harness.eval_smallgpt(model, ctx["shards"], args.threads,
                                   work / f"eval-nano-s{seed}.log")
        rec = ctx["runs"].add(key, {"arm": "nanoGPT", "minutes": args.minutes, "seed": seed,
                                    "steps": step, "tokens": step * NANO_TOKENS_PER_ITER,
                                    "wall_s": r["wall_s"], **ev})
    _print_run(rec)
    return rec


def ours_arm(args: argparse.Namespace, ctx: Dict[str, Any], seed: int,
             minutes: float) -> Dict[str, Any]:
    key = f"ours|{ctx['key']}|{args.preset}|{args.extra}|{minutes:g}|{seed}"
    rec = ctx["runs"].get(key)
    if rec is None:
        out = args.work / f"smallgpt-{minutes:g}m-s{seed}"
        train_args = ["--preset", args.preset, "--data", str(ctx["shards"]), "--max-time",
                      str(minutes * 60), "--seed", str(seed), *shlex.split(args.extra)]
        r = harness.train_smallgpt(train_args, out, args.threads)
        ev = harness.eval_smallgpt(Path(str(r["ckpt"])), ctx["shards"], args.threads,
                                   out.with_name(out.name + "-eval.log"))
        rec = ctx["runs"].add(key, {"arm": f"smallgpt {minutes:g} min", "minutes": minutes,
                                    "seed": seed, **r, **ev})
    _print_run(rec)
    return rec


def main() -> int:
    args = parse_args()
    budget = args.minutes * 60.0
    shards = recipe_data.books(args.set, args.work / "data", args.shared)
    sys.path.insert(0, str(ROOT / "python"))
    dataset = f"books-{args.set}"
    setup_nanogpt(args.nanogpt.resolve(), args.work / "nano")
    nano_data(shards, args.work / "nano", dataset)
    ctx: Dict[str, Any] = {"shards": shards, "dataset": dataset,
                           "runs": Runs(args.work / "runs.jsonl", args.reuse),
                           "key": f"{args.set}|{harness.commit()}|{args.threads}"}
    cal_key = f"calibration|{ctx['key']}"
    cal = ctx["runs"].get(cal_key)
    if args.nano_iters:
        cal = {"per_iter_s": budget * 0.85 / args.nano_iters}
    elif cal is None:
        cal = ctx["runs"].add(cal_key, {"per_iter_s": calibrate(args.work / "nano", dataset,
                                                                args.threads, args.work)})
    per_iter = float(cal["per_iter_s"])
    ctx["iters"] = args.nano_iters or nano_iters(per_iter, budget)
    print(f"nanoGPT: {per_iter:.4f} s/iteration -> {ctx['iters']} iterations for "
          f"{args.minutes:g} minutes", flush=True)
    nano: List[Dict[str, Any]] = []
    ours: Dict[float, List[Dict[str, Any]]] = {m: [] for m in [args.minutes, *args.budgets]}
    for i, seed in enumerate(args.seeds):
        nano.append(nano_arm(args, ctx, seed))
        ours[args.minutes].append(ours_arm(args, ctx, seed, args.minutes))
        shift = i % max(len(args.budgets), 1)
        for minutes in args.budgets[shift:] + args.budgets[:shift]:
            ours[minutes].append(ours_arm(args, ctx, seed, minutes))
    body = report(args, per_iter, ctx["iters"], nano, ours)
    harness.append_run("bench_vs_nanogpt", f"{args.set} set, {args.minutes:g} minutes, "
                       f"{args.threads} threads", body, threads=args.threads,
                       record=not args.no_record)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nanogpt", type=Path, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--set", choices=recipe_data.SETS, default="report",
                   help="the books to train and score on (default: report)")
    p.add_argument("--minutes", type=float, default=10.0, help="the budget of both arms")
    p.add_argument("--budgets", default="3,4,5,6",
                   help="shorter smallgpt budgets in minutes, for the crossing ('' = none)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="books-cpu")
    p.add_argument("--extra", default="", help="overrides for every smallgpt run")
    p.add_argument("--nano-iters", type=int, default=0,
                   help="nanoGPT's iterations, a multiple of 10 (default 0: calibrated)")
    p.add_argument("--work", type=Path, default=Path("/tmp/smallgpt-vs-nanogpt"))
    p.add_argument("--shared", type=Path, help="the shared data folder (default: found)")
    p.add_argument("--reuse", action="store_true",
                   help="take finished runs of the same settings from WORK/runs.jsonl")
    p.add_argument("--no-record", action="store_true", help="print only (no RESULTS.md)")
    args = p.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    args.seeds = harness.parse_seeds(args.seeds)
    if args.nano_iters < 0 or args.nano_iters % 10:
        raise SystemExit("--nano-iters must be a multiple of 10 (0: calibrate)")
    try:
        args.budgets = sorted({float(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"--budgets: expected minutes, got {args.budgets!r}") from None
    if args.minutes <= 0 or any(not 0 < b < args.minutes for b in args.budgets):
        raise SystemExit("--minutes must be positive and every --budgets value below it")
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def _git_rev(path: Path) -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path,
                         capture_output=True, text=True)
    return res.stdout.strip() or f"from {path} (not a git work tree)"


def _row(name: str, recs: List[Dict[str, Any]]) -> List[str]:
    vals = [r["val_bpb"] for r in recs]
    return [name, ", ".join(f"{v:.4f}" for v in vals), harness.fmt_mean(vals, 4),
            f"{statistics.fmean(r['steps'] for r in recs):.0f}",
            f"{statistics.fmean(r['tokens'] for r in recs):,.0f}",
            f"{statistics.fmean(r['wall_s'] for r in recs):.0f}"]


def crossing(nano_vals: List[float], ours: Dict[float, List[Dict[str, Any]]],
             minutes: float) -> List[str]:
    """The shortest budgets that beat nanoGPT's mean at ``minutes``: on the mean, and by more
    than the spread."""
    target = statistics.fmean(nano_vals)
    on_mean = beyond = None
    for m in sorted(ours):
        vals = [r["val_bpb"] for r in ours[m]]
        if on_mean is None and statistics.fmean(vals) < target:
            on_mean = m
        verdict = harness.compare(nano_vals, vals, names=("nanoGPT", "smallgpt"))
        if beyond is None and verdict.startswith("smallgpt better"):
            beyond = m
    tried = ", ".join(f"{m:g}" for m in sorted(ours))
    return [f"Time smallgpt needs to reach nanoGPT's {minutes:g}-minute mean ({target:.4f}), "
            f"budgets tried {tried} minutes: mean below it from "
            + (f"**{on_mean:g} minutes**" if on_mean is not None else "none of them")
            + "; better by more than the spread from "
            + (f"**{beyond:g} minutes**" if beyond is not None else "none of them") + "."]


def report(args: argparse.Namespace, per_iter: float, iters: int,
           nano: List[Dict[str, Any]], ours: Dict[float, List[Dict[str, Any]]]) -> str:
    first = ours[args.minutes][0]
    nano_vals = [r["val_bpb"] for r in nano]
    full = [r["val_bpb"] for r in ours[args.minutes]]
    over = [r["wall_s"] for r in nano if r["wall_s"] > args.minutes * 60 * 1.05]
    rows = [_row(f"nanoGPT CPU recipe (4L x 128, T=64, B=12), {args.minutes:g} min", nano)]
    rows += [_row(f"smallgpt `--preset {args.preset}` {m:g} min", ours[m])
             for m in sorted(ours, reverse=True)]
    lead = statistics.fmean(nano_vals) - statistics.fmean(full)
    lines = [
        f"Data: the books' **{args.set}** set (`benches/recipe_data.py`); validation: every "
        f"token of its validation text ({first['val_tokens']:,} GPT-2 tokens), scored by "
        "`smallgpt-train --eval-only` (fp32) for both. Seeds "
        f"{', '.join(map(str, args.seeds))}, interleaved; nanoGPT {_git_rev(args.nanogpt)}, "
        f"{iters} iterations planned from {per_iter:.4f} s/iteration"
        + (f"; it ran past 105 % of the budget in {len(over)} run(s) (its last checkpoint "
           "counts)" if over else "") + "."
        + (f" smallgpt overrides: `{args.extra}`." if args.extra else ""),
        "",
        harness.md_table(["run", "val_bpb per seed", "mean ± sd", "steps", "tokens seen",
                          "wall s"], rows),
        "",
        f"At {args.minutes:g} minutes smallgpt leads by **{lead:+.4f} bpb** (positive: lower "
        "bits per byte); " + harness.compare(nano_vals, full, names=("nanoGPT", "smallgpt"))
        + ".",
    ]
    if args.budgets:
        lines += [""] + crossing(nano_vals, ours, args.minutes)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
