"""Decoding speed of smallgpt's generate(): KV cache vs no cache, and vs transformers.

Measures greedy decoding (batch 1, 8-token prompt) in tokens per second:

* the quickstart model (shakespeare-cpu preset: 1 layer, 128 wide, RoPE, context 64), a
  4-layer variant of it, and a
  ~10M-parameter model (6 layers, 384 wide, context 256), for 256 and 1024 new tokens, with
  and without the KV cache;
* a randomly initialised GPT-2 small (124M, transformers' GPT2LMHeadModel) loaded into smallgpt
  with GPT.from_huggingface, against transformers' own generate() on the same weights (128
  greedy tokens, 32 with 4 beams), checking that both produce the same tokens.

Each figure is the best of ``--repeats`` runs (decoding on a shared CPU is noisy). The table is
printed and appended, with date, machine and command, to benches/RESULTS.md under
"## bench_sample" (``--no-append`` to skip).

    python benches/bench_sample.py                 # full run (a few minutes on 2 cores)
    python benches/bench_sample.py --quick         # smaller token counts, one repeat
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from smallgpt.model import GPT, GPTConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## bench_sample"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_rate(fn, n_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Best tokens/s over ``repeats`` calls of ``fn`` (which returns the output ids)."""
    best = 0.0
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = max(best, n_tokens / dt)
    assert out is not None
    return best, out


def bench_sizes(lengths: list[int], repeats: int) -> list[list[str]]:
    rows = []
    shapes = [
        (
            "quickstart (shakespeare-cpu: 1L x 128, RoPE, ctx64)",
            GPTConfig(vocab_size=512, block_size=64, n_layer=1, n_head=4, n_embd=128,
                      position="rope"),
        ),
        (
            "4L x 128 ctx64 (0.9M)",
            GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128),
        ),
        (
            "10.8M ctx256",
            GPTConfig(vocab_size=512, block_size=256, n_layer=6, n_head=6, n_embd=384),
        ),
    ]
    for name, cfg in shapes:
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, 8))
        model.generate(prompt, 8, temperature=0)  # warm-up
        for n in lengths:
            cached, a = best_rate(partial(model.generate, prompt, n, temperature=0), n, repeats)
            plain, b = best_rate(
                partial(model.generate, prompt, n, temperature=0, use_cache=False),
                n,
                1 if n > 256 else max(1, repeats - 1),  # the slow path: fewer repeats
            )
            # Past the context the cache is rebuilt from half a window, so outputs may differ
            # from the sliding window after block_size tokens; within it they are identical.
            within = min(cfg.block_size, 8 + n)
            same = torch.equal(a[:, :within], b[:, :within])
            rows.append(
                [
                    name,
                    f"{model.num_params() / 1e6:.1f}M",
                    str(n),
                    f"{plain:.0f}",
                    f"{cached:.0f}",
                    f"{cached / plain:.1f}x",
                    "yes" if same else "NO",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def bench_vs_transformers(n: int, repeats: int) -> list[list[str]]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50257 tokens
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = GPT.from_huggingface(tmp)
    prompt = torch.randint(0, cfg.vocab_size, (1, 8))
    mask = torch.ones_like(prompt)

    with torch.no_grad():  # warm-up
        hf.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    ours.generate(prompt, 4, temperature=0)
    rows = []
    for label, beams in (("greedy", 1), ("beam 4", 4)):
        k = n if beams == 1 else n // 4
        reps = min(repeats, 2)
        hf_rate, ref = best_rate(
            partial(
                hf.generate,
                prompt,
                attention_mask=mask,
                max_new_tokens=k,
                do_sample=False,
                num_beams=beams,
                eos_token_id=None,
                pad_token_id=0,
            ),
            k,
            reps,
        )
        our_rate, got = best_rate(
            partial(ours.generate, prompt, k, temperature=0, num_beams=beams), k, reps
        )
        same = torch.equal(ref, got)
        rows.append(
            [
                f"GPT-2 124M {label}",
                str(k),
                f"{hf_rate:.1f}",
                f"{our_rate:.1f}",
                f"{our_rate / hf_rate:.2f}x",
                "yes" if same else "NO",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def append_results(text: str) -> None:
    """Append ``text`` at the end of the bench_sample section (created if missing)."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if HEADING not in old:
        new = old.rstrip("\n") + f"\n\n{HEADING}\n\n{text}\n"
    else:
        start = old.index(HEADING) + len(HEADING)
        nxt = old.find("\n## ", start)
        end = len(old) if nxt < 0 else nxt + 1
        new = old[:end].rstrip("\n") + f"\n\n{text}\n" + ("\n" + old[end:] if nxt >= 0 else "")
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="64/256 tokens, one repeat")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--no-append", action="store_true", help="do not write benches/RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    lengths = [64, 256] if args.quick else [256, 1024]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    print("model | params | new tokens | no cache tok/s | cache tok/s | speed-up | same tokens")
    size_rows = bench_sizes(lengths, repeats)
    hf_rows: list[list[str]] = []
    if not args.no_hf:
        print("model | new tokens | transformers tok/s | smallgpt tok/s | ratio | same tokens")
        hf_rows = bench_vs_transformers(64 if args.quick else 128, repeats)

    import transformers

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = (
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), transformers {transformers.__version__}, "
        f"load average {load:.1f} at start"
    )
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    parts = [
        f"### {stamp}",
        "",
        f"Machine: {machine}.  ",
        f"Command: `{cmd}`.  ",
        f"Greedy decoding, batch 1, 8-token prompt; best of {repeats} run(s) with the cache, "
        f"fewer without it and for transformers (at most 2).",
        "",
        table(
            [
                "model",
                "non-emb params",
                "new tokens",
                "no cache tok/s",
                "KV cache tok/s",
                "speed-up",
                "same tokens in context",
            ],
            size_rows,
        ),
    ]
    if hf_rows:
        parts += [
            "",
            table(
                [
                    "model",
                    "new tokens",
                    "transformers tok/s",
                    "smallgpt tok/s",
                    "smallgpt / transformers",
                    "same tokens",
                ],
                hf_rows,
            ),
        ]
    text = "\n".join(parts)
    print()
    print(text)
    if not args.no_append:
        append_results(text)
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
