"""Decoding speed of smallgpt's generate(): KV cache vs no cache, and vs transformers.

Measures greedy decoding (batch 1, 8-token prompt) in tokens per second:

* the quickstart model (shakespeare-cpu preset: 1 layer, 128 wide, RoPE, context 64), a
  4-layer variant of it, and a
  ~10M-parameter model (6 layers, 384 wide, context 256), for 256 and 1024 new tokens, with
  and without the KV cache;
* a randomly initialised GPT-2 small (124M, transformers' GPT2LMHeadModel) loaded into smallgpt
  with GPT.from_huggingface, against transformers' own generate() on the same weights (128
  greedy tokens, 32 with 4 beams), checking that both produce the same tokens.

Each figure is the best of ``--repeats`` runs (decoding on a shared CPU is noisy). Each table
is printed and appended to benches/RESULTS.md as a run block (``harness.append_run``: "KV cache
vs no cache" and "vs transformers, GPT-2 124M"; a ``--quick`` run's titles say so) unless
``--no-append``.

    python benches/bench_sample.py                 # full run (a few minutes on 2 cores)
    python benches/bench_sample.py --quick         # smaller token counts, one repeat
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

import harness  # noqa: E402

from smallgpt.model import GPT, GPTConfig  # noqa: E402

SIZES_HEADER = ["model", "non-emb params", "new tokens", "no cache tok/s", "KV cache tok/s",
                "speed-up", "same tokens in context"]
HF_HEADER = ["model", "new tokens", "transformers tok/s", "smallgpt tok/s",
             "smallgpt / transformers", "same tokens"]


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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="64/256 tokens, one repeat")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--no-append", "--no-record", dest="no_append", action="store_true",
                    help="print only; do not write benches/RESULTS.md")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    lengths = [64, 256] if args.quick else [256, 1024]
    extra = {"Load average at start": harness.load_average()}

    print("model | params | new tokens | no cache tok/s | cache tok/s | speed-up | same tokens")
    size_rows = bench_sizes(lengths, repeats)
    hf_rows: list[list[str]] = []
    if not args.no_hf:
        import transformers

        extra["transformers"] = transformers.__version__
        print("model | new tokens | transformers tok/s | smallgpt tok/s | ratio | same tokens")
        hf_rows = bench_vs_transformers(64 if args.quick else 128, repeats)

    suffix = " (quick smoke test)" if args.quick else ""
    blocks = [("KV cache vs no cache", harness.md_table(SIZES_HEADER, size_rows) + (
        f"\n\nGreedy decoding, batch 1, 8-token prompt; best of {repeats} run(s) with the "
        "cache, fewer without it (one past 256 new tokens)."))]
    if hf_rows:
        blocks.append(("vs transformers, GPT-2 124M", harness.md_table(HF_HEADER, hf_rows) + (
            f"\n\nRandomly initialised GPT-2 small (transformers' GPT2LMHeadModel) loaded with "
            f"GPT.from_huggingface; batch 1, 8-token prompt; best of {min(repeats, 2)} run(s) "
            "each.")))
    for title, body in blocks:
        harness.append_run("bench_sample", title + suffix, body, extra=extra,
                           record=not args.no_append)


if __name__ == "__main__":
    main()
