"""Training throughput: tokens/s and MFU, fp32 eager vs faster settings, for three model sizes.

    python benches/bench_train.py                      # CPU: quickstart, ~10M, GPT-2 124M @ T=64
    python benches/bench_train.py --device cuda        # GPU: adds T=1024 for GPT-2 124M
    python benches/bench_train.py --sizes gpt2-124m --variants fp32,bf16 --seconds 20 --all
    python benches/bench_train.py --compare ../base    # this code and another checkout's,
                                                       # interleaved in one run

With ``--compare TREE`` every (size, variant) is measured for this checkout and for TREE (a
checkout of another commit with its extension built), alternately, each in a fresh process
that imports that tree's ``python/`` folder, and the table gives both and their ratio.

Each (size, variant) runs a few warm-up steps and then full optimizer steps (forward,
backward, clip, AdamW) on random tokens for about ``--seconds`` seconds. MFU is
``flops_per_token * tokens/s / peak`` with the peak from :func:`smallgpt.train.peak_flops`
(on CPU: threads x clock x FLOPs/cycle; see its docstring). The "best" line per size is the
fastest variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
if "--worker" not in sys.argv:  # a --compare child imports the tree PYTHONPATH names
    sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from smallgpt.model import GPT, GPTConfig  # noqa: E402
from smallgpt.train import (  # noqa: E402
    configure_optimizer,
    cpu_supports_fast_bf16,
    peak_flops,
)

# name -> (GPTConfig kwargs, batch size, CPU block size, GPU block size)
SIZES: Dict[str, Any] = {
    "quickstart": (dict(vocab_size=512, n_layer=1, n_head=4, n_embd=128, position="rope"),
                   16, 64, 64),
    "10m": (dict(vocab_size=2048, n_layer=6, n_head=6, n_embd=384), 16, 128, 256),
    "gpt2-124m": (dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768), 4, 64, 1024),
    # the quickstart's size with every modern block option (this code only)
    "quickstart-modern": (dict(vocab_size=512, n_layer=1, n_head=4, n_embd=128, position="rope",
                               norm="rmsnorm", norm_weight=False, qk_norm=True,
                               activation="relu2", bias=False, logit_softcap=15.0),
                          16, 64, 64),
}
DEFAULT_THREADS = torch.get_num_threads()
VARIANTS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "fp32+compile": (torch.float32, True),
    "bf16+compile": (torch.bfloat16, True),
}


def bench_one(
    size: str,
    variant: str,
    device: torch.device,
    seconds: float,
    batch: int | None,
    gpu_batch_mult: int,
) -> Dict[str, Any]:
    kw, B, T_cpu, T_gpu = SIZES[size]
    T = T_gpu if device.type == "cuda" else T_cpu
    if device.type == "cuda":
        B *= gpu_batch_mult
    B = batch or B
    base, _, threads = variant.partition("@")
    dtype, compiled = VARIANTS[base]
    if threads:
        torch.set_num_threads(int(threads.rstrip("t")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, **kw)).to(device)
    opt = configure_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8, device)
    fwd = torch.compile(model) if compiled else model
    x = torch.randint(0, kw["vocab_size"], (B, T), device=device)
    y = torch.randint(0, kw["vocab_size"], (B, T), device=device)

    def ctx() -> Any:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def step() -> None:
        with ctx():
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    sync()
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        sync()
        if time.perf_counter() - t0 >= seconds and n >= 3:
            break
    dt = time.perf_counter() - t0
    tps = n * B * T / dt
    peak = peak_flops(device, dtype)  # uses the current thread count on CPU
    torch.set_num_threads(DEFAULT_THREADS)
    mfu = model.flops_per_token(T) * tps / peak if peak else 0.0
    return {
        "size": size,
        "variant": variant,
        "B": B,
        "T": T,
        "params_M": model.num_params() / 1e6,
        "tok_s": tps,
        "mfu": mfu,
        "ms_step": 1000 * dt / n,
        "warmup_s": warm,
    }


def _worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints its row as JSON (``--compare`` children)."""
    r = bench_one(args.sizes, args.variants, torch.device(args.device), args.seconds,
                  args.batch, args.gpu_batch_mult)
    print("RESULT " + json.dumps(r), flush=True)


def _measure(tree: Path, args: argparse.Namespace, size: str, variant: str) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree / "python"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--sizes", size,
           "--variants", variant, "--device", args.device, "--seconds", str(args.seconds),
           "--threads", str(args.threads or DEFAULT_THREADS),
           "--gpu-batch-mult", str(args.gpu_batch_mult)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no result"])[-1])
    return json.loads(line[-1][len("RESULT "):])


def _compare(args: argparse.Namespace) -> None:
    here, other = ROOT, Path(args.compare).resolve()
    print(f"{'size':<18} {'variant':<8} {'this tok/s':>11} {'other tok/s':>12} {'ratio':>6}")
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            runs: Dict[str, List[float]] = {"this": [], "other": []}
            for _ in range(args.repeats):  # interleaved: load drifts hit both alike
                for name, tree in (("this", here), ("other", other)):
                    try:
                        runs[name].append(_measure(tree, args, size, variant)["tok_s"])
                    except RuntimeError as e:
                        print(f"{size:<18} {variant:<8} {name}: failed: {e}")
            if runs["this"] and runs["other"]:
                a, b = max(runs["this"]), max(runs["other"])
                print(f"{size:<18} {variant:<8} {a:>11.0f} {b:>12.0f} {a / b:>6.3f}",
                      flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument(
        "--variants", default="fp32,bf16,fp32+compile", help=f"comma list from {','.join(VARIANTS)}"
    )
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per variant")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument(
        "--gpu-batch-mult", type=int, default=4, help="multiply the default batch sizes on CUDA"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--all", action="store_true",
                   help="also run bf16/compile on the larger sizes of CPUs without native bf16")
    p.add_argument("--compare", metavar="TREE", help="another checkout to measure alongside")
    p.add_argument("--repeats", type=int, default=3, help="with --compare: runs per tree")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEFAULT_THREADS
    if args.threads:
        torch.set_num_threads(args.threads)
        DEFAULT_THREADS = args.threads
    if args.worker:
        _worker(args)
        return
    if args.compare:
        _compare(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(
        f"# bench_train: torch {torch.__version__}, device {device} ({name}), "
        f"peak fp32 {peak_flops(device, torch.float32) / 1e12:.3f} TFLOP/s, "
        f"peak bf16 {peak_flops(device, torch.bfloat16) / 1e12:.3f} TFLOP/s"
    )
    print(
        f"{'size':<11} {'variant':<13} {'params':>8} {'B x T':>9} {'tok/s':>10} "
        f"{'ms/step':>9} {'MFU':>7} {'warmup s':>9}"
    )
    rows: List[Dict[str, Any]] = []
    for size in args.sizes.split(","):
        best = None
        for variant in args.variants.split(","):
            slow = ("bf16" in variant and not cpu_supports_fast_bf16()) or "compile" in variant
            if device.type == "cpu" and size != "quickstart" and slow and not args.all:
                continue
            try:
                r = bench_one(size, variant, device, args.seconds, args.batch, args.gpu_batch_mult)
            except Exception as e:  # e.g. no C++ compiler for torch.compile
                print(
                    f"{size:<11} {variant:<13} failed: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:80]}"
                )
                continue
            rows.append(r)
            print(
                f"{size:<11} {variant:<13} {r['params_M']:>7.2f}M {r['B']:>4}x{r['T']:<4} "
                f"{r['tok_s']:>10.0f} {r['ms_step']:>9.1f} {100 * r['mfu']:>6.1f}% "
                f"{r['warmup_s']:>9.1f}",
                flush=True,
            )
            if best is None or r["tok_s"] > best["tok_s"]:
                best = r
        if best is not None:
            base = next((r for r in rows if r["size"] == size and r["variant"] == "fp32"), None)
            gain = f", {best['tok_s'] / base['tok_s']:.2f}x fp32 eager" if base else ""
            print(
                f"{size:<11} best: {best['variant']} {best['tok_s']:.0f} tok/s, "
                f"MFU {100 * best['mfu']:.1f}%{gain}"
            )


if __name__ == "__main__":
    main()
