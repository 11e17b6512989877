"""Short training runs of GPU presets: tokens/s and MFU (run by benches/gpu_check.sh).

    python benches/gpu_train.py --seconds 45 --presets gpt2-124m,gpt2-124m-modern

Tokenizes the bundled Tiny Shakespeare with GPT-2's vocabulary (the committed
tests/fixtures/gpt2 files) into a temporary folder, then runs ``smallgpt-train --preset P``
on it for about ``--seconds`` seconds of training after torch.compile's warm-up, logging every
step, and prints the median tokens/s and MFU (bf16 peak of the device, from
smallgpt.train.hardware) over the steps after the first five.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILE_ALLOWANCE_S = 90.0  # torch.compile of GPT-2 small takes about a minute


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--presets", default="gpt2-124m,gpt2-124m-modern")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shakespeare-gpt2"
        text = ROOT / "python" / "smallgpt" / "assets" / "tinyshakespeare.txt"
        subprocess.run([sys.executable, "-m", "smallgpt.cli.tokenize", str(text), "--out",
                        str(data), "--gpt2", str(ROOT / "tests" / "fixtures" / "gpt2"),
                        "--val-fraction", "0.1", "--quiet"], check=True)
        rows = [run(preset, data, Path(tmp) / preset, args.seconds)
                for preset in args.presets.split(",")]
    print(f"\n{'preset':22s} {'steps':>6s} {'tokens/s':>12s} {'MFU':>7s} {'tokens/step':>12s}")
    for r in rows:
        print(f"{r['preset']:22s} {r['steps']:6d} {r['tps']:12,.0f} {r['mfu']:7.1%} "
              f"{r['tokens_per_step']:12,d}")
    return 0


def run(preset: str, data: Path, out: Path, seconds: float) -> dict:
    cmd = [sys.executable, "-m", "smallgpt.cli.train", "--preset", preset, "--data", str(data),
           "--out", str(out), "--max-steps", "0", "--max-time", str(seconds + COMPILE_ALLOWANCE_S),
           "--log-interval", "1", "--eval-interval", "0", "--set", "save_interval=0",
           "--set", "data.final_eval_full=false", "--set", "data.eval_tokens=65536",
           "--no-plot", "--no-progress"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_sec" in r]
    warm = [r for r in steps if r["step"] > 5] or steps
    return {"preset": preset, "steps": steps[-1]["step"] if steps else 0,
            "tps": statistics.median(r["tokens_per_sec"] for r in warm),
            "mfu": statistics.median(r["mfu"] for r in warm),
            "tokens_per_step": steps[-1]["tokens"] // max(steps[-1]["step"], 1)}


if __name__ == "__main__":
    sys.exit(main())
