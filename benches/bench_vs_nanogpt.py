"""smallgpt against nanoGPT on the same books, the same tokens and the same wall time.

    python benches/bench_vs_nanogpt.py NANOGPT_CHECKOUT [--minutes 10] [--threads 2]

1. Data: ``../shared/data/corpus/en_gutenberg_01.txt`` (about 20 MB of English books) for
   training and a separate book for validation (Washington Irving's "Abbotsford and Newstead
   Abbey", the third book of ``en_gutenberg_02.txt``, cut out with the manifest), tokenized
   once with GPT-2's vocabulary by ``smallgpt-tokenize``. nanoGPT gets the same token streams
   in its own layout (``data/<name>/train.bin`` / ``val.bin``, raw uint16).
2. nanoGPT: its own ``train.py`` (copied from the checkout into a scratch folder at run time,
   never vendored) with ``config/train_shakespeare_char.py`` scaled to the CPU the way its
   README does (``--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4
   --n_head=4 --n_embd=128 --dropout=0.0``). Its cosine schedule is fitted to the budget:
   a short calibration run measures its seconds per iteration, and ``max_iters`` =
   ``lr_decay_iters`` is what fits in the budget (a checkpoint every tenth of them). The
   process is stopped at 110 % of the budget if it runs over; its last checkpoint counts, and
   its wall time is reported.
3. smallgpt: ``smallgpt-train --preset books-cpu --max-time <budget>`` on the same shards.
4. Both final models are evaluated by the same code (``smallgpt-train --eval-only``, fp32) on
   every token of the validation book, each with its own context length; bits per byte =
   summed nats / ln 2 / UTF-8 bytes of the book.

Both runs use the same number of threads, one after the other. The table is printed and
appended to ``benches/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
VAL_BOOK = "Abbotsford and Newstead Abbey"
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
               "--n_embd=128", "--dropout=0.0", "--eval_iters=20", "--log_interval=1",
               "--always_save_checkpoint=True", "--dataset=books"]


def prepare(work: Path) -> Path:
    """Token shards for both: ours in ``work/shards``, nanoGPT's in ``work/nano/data/books``."""
    shards = work / "shards"
    if (shards / "meta.json").exists():
        return shards
    src = work / "text"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED / "corpus" / "en_gutenberg_01.txt", src / "a_train.txt")
    with open(SHARED / "gutenberg_manifest.tsv", encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f, delimiter="\t") if r["title"] == VAL_BOOK)
    with open(SHARED / row["file"], "rb") as f:
        f.seek(int(row["byte_offset"]))
        (src / "z_val.txt").write_bytes(f.read(int(row["byte_length"])))
    # Two documents; a validation fraction of 0.5 makes the last one (the book) the val split.
    subprocess.run([sys.executable, "-m", "smallgpt.cli.tokenize", str(src), "--out",
                    str(shards), "--gpt2", str(SHARED / "gpt2"), "--val-fraction", "0.5",
                    "--quiet", "--overwrite"], check=True)
    from smallgpt.data import read_shard, split_files

    nano = work / "nano" / "data" / "books"
    nano.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.bin"), ("val", "val.bin")):
        toks = np.concatenate([np.asarray(read_shard(p)) for p in split_files(shards, split)])
        toks.astype(np.uint16).tofile(nano / name)
    return shards


def _nanogpt_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_nanogpt(work: Path, extra: List[str], threads: int, limit_s: float) -> tuple:
    nano = work / "nano"
    cmd = [sys.executable, "train.py", *NANOGPT_CPU, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=nano, env=_nanogpt_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out, time.perf_counter() - t0


def run_nanogpt(checkout: Path, work: Path, budget_s: float, threads: int) -> Dict[str, Any]:
    """Calibrate, then train nanoGPT for the budget; returns its iterations and wall time."""
    nano = work / "nano"
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copyfile(checkout / name, nano / name)
    (nano / "config").mkdir(exist_ok=True)
    shutil.copyfile(checkout / "config" / "train_shakespeare_char.py",
                    nano / "config" / "train_shakespeare_char.py")
    out, _ = _run_nanogpt(work, ["--max_iters=60", "--lr_decay_iters=60",
                                 "--eval_interval=1000", f"--out_dir={work / 'nano-cal'}"],
                          threads, 600)
    times = [float(m) for m in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", out)][10:]
    if not times:
        raise SystemExit(f"nanoGPT calibration failed:\n{out[-2000:]}")
    per_iter = statistics.median(times) / 1000.0
    # Its ten evaluations (2 x 20 batches each), checkpoints and start-up took ~15 % of a
    # 10-minute budget on a 2-core CPU: plan the schedule so that the run ends in time.
    iters = int(budget_s * 0.85 / per_iter)
    out_dir = work / "nano-run"
    shutil.rmtree(out_dir, ignore_errors=True)
    out, wall = _run_nanogpt(work, [f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                                    f"--eval_interval={max(iters // 10, 1)}",
                                    f"--out_dir={out_dir}"], threads, budget_s * 1.1)
    (work / "nanogpt.log").write_text(out)
    return {"per_iter_s": per_iter, "iters": iters, "wall_s": wall, "ckpt": out_dir / "ckpt.pt",
            "tokens_per_iter": 12 * 64}


def nanogpt_to_smallgpt(ckpt: Path, shards: Path, dest: Path) -> tuple:
    """nanoGPT's checkpoint as a smallgpt checkpoint file (same parameter names); returns
    the file and nanoGPT's iteration."""
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
    return dest, int(raw["iter_num"])


def evaluate(model: Path, shards: Path, threads: int) -> Dict[str, Any]:
    """The whole validation split through ``smallgpt-train --eval-only`` (fp32)."""
    res = subprocess.run([sys.executable, "-m", "smallgpt.cli.train", "--eval-only",
                          "--init-from", str(model), "--data", str(shards), "--dtype",
                          "float32", "--device", "cpu", "--set", f"threads={threads}"],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_smallgpt(shards: Path, work: Path, budget_s: float, threads: int,
                 preset: str) -> Dict[str, Any]:
    out = work / "smallgpt-run"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smallgpt.cli.train", "--preset", preset, "--data",
                    str(shards), "--out", str(out), "--overwrite", "--max-time", str(budget_s),
                    "--set", f"threads={threads}", "--no-progress"], check=True)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "step" in r][-1]
    per_step = [r for r in recs if r.get("tokens")][-1]
    tokens = per_step["tokens"] // per_step["step"] * last["step"]
    return {"wall_s": wall, "steps": last["step"], "tokens": tokens,
            "elapsed_s": last.get("elapsed_s"), "ckpt": out / "ckpt_latest.pt"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nanogpt", type=Path, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--preset", default="books-cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/smallgpt-vs-nanogpt"))
    p.add_argument("--skip-nanogpt", action="store_true", help="reuse the last nanoGPT run")
    args = p.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    budget = args.minutes * 60.0
    shards = prepare(args.work)
    if args.skip_nanogpt:
        nano = json.loads((args.work / "nanogpt.json").read_text())
        nano["ckpt"] = Path(nano["ckpt"])
    else:
        nano = run_nanogpt(args.nanogpt.resolve(), args.work, budget, args.threads)
        (args.work / "nanogpt.json").write_text(json.dumps({**nano, "ckpt": str(nano["ckpt"])}))
    ours = run_smallgpt(shards, args.work, budget, args.threads, args.preset)
    nano_model, nano_iter = nanogpt_to_smallgpt(nano["ckpt"], shards, args.work / "nanogpt.pt")
    nano_eval = {**evaluate(nano_model, shards, args.threads), "step": nano_iter}
    ours_eval = evaluate(ours["ckpt"], shards, args.threads)
    report(args, nano, nano_eval, ours, ours_eval)
    return 0


def _cpu() -> str:
    """CPU model and the vector flags that decide what runs fast (bf16, AVX-512, AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"model name\s*:\s*(.*)", info)
    found = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(found.group(1).split()) if found else set()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model.group(1).strip() if model else platform.machine()} ({' '.join(shown)})"


def _torch_version() -> str:
    import torch

    return torch.__version__


def report(args: argparse.Namespace, nano: Dict[str, Any], nano_eval: Dict[str, Any],
           ours: Dict[str, Any], ours_eval: Dict[str, Any]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    nano_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.nanogpt,
                              capture_output=True, text=True).stdout.strip()
    lines = [
        f"### {datetime.datetime.now():%Y-%m-%d %H:%M}: {args.minutes:g} minutes each, "
        f"{args.threads} threads",
        "",
        f"- machine: {_cpu()}, {os.cpu_count()} cores; torch {_torch_version()}; "
        f"code: {commit}; nanoGPT {nano_rev or '(no git)'}",
        f"- nanoGPT: {nano['iters']} iterations planned from {nano['per_iter_s']:.3f} s/iter; "
        f"its last checkpoint (iteration {nano_eval['step']}) counts"
        + (" (stopped at 110 % of the budget)" if nano["wall_s"] > args.minutes * 66 else ""),
        f"- command: `python benches/bench_vs_nanogpt.py NANOGPT --minutes {args.minutes:g} "
        f"--threads {args.threads} --preset {args.preset}`",
        f"- validation: every token of \"{VAL_BOOK}\" ({ours_eval['val_tokens']:,} GPT-2 "
        "tokens), fp32, each model with its own context",
        "",
        "| run | steps | tokens seen | wall s | val_loss | val_bpb |",
        "|---|---:|---:|---:|---:|---:|",
        f"| nanoGPT CPU recipe (4L x 128, T=64, B=12) | {nano_eval['step']} | "
        f"{nano_eval['step'] * nano['tokens_per_iter']:,} | {nano['wall_s']:.0f} | "
        f"{nano_eval['val_loss']:.4f} | {nano_eval['val_bpb']:.4f} |",
        f"| smallgpt `--preset {args.preset}` | {ours['steps']} | {ours['tokens']:,} | "
        f"{ours['wall_s']:.0f} | {ours_eval['val_loss']:.4f} | {ours_eval['val_bpb']:.4f} |",
        "",
        f"smallgpt is **{nano_eval['val_bpb'] - ours_eval['val_bpb']:+.3f} bpb** better "
        "(positive: lower bits per byte).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(ROOT / "benches" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n## bench_vs_nanogpt\n\n" + text)


if __name__ == "__main__":
    sys.exit(main())
