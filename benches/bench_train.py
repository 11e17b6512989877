"""Training throughput against the machine's limit, and where a step's time goes, per preset.

    python benches/bench_train.py                      # the CPU presets and three sizes
    python benches/bench_train.py --sizes books-cpu --variants preset --seconds 20
    python benches/bench_train.py --sizes books-cpu --variants preset --model-set loss_chunk=256
    python benches/bench_train.py --device cuda        # GPU: adds T=1024 for GPT-2 124M
    python benches/bench_train.py --compare ../base    # this code and another checkout's,
                                                       # interleaved in one run

**Sizes.** ``shakespeare-cpu``, ``shakespeare-cpu@300`` (the preset's ``[[by_time]]`` row for
a 300 s budget) and ``books-cpu`` are built from the packaged presets (their model, batch,
optimizer, dtype and head dtype; vocabulary 512 for the quickstart's BPE, 50,304 for GPT-2's),
so they follow the presets as they change. ``quickstart``, ``10m``, ``gpt2-124m`` and
``quickstart-modern`` are fixed shapes trained with AdamW. Variants: ``preset`` (the preset's
own dtype), ``fp32``, ``bf16`` (autocast), ``+compile``. ``--model-set KEY=VALUE`` changes a
``GPTConfig`` field of every size (e.g. ``loss_chunk=256`` for the chunked head + loss).

**Throughput.** Each (size, variant) runs two warm-up steps and then full optimizer steps
(a batch from a real :class:`smallgpt.data.ShardDataset` over random tokens, forward,
backward, clipping, the optimizer) for about ``--seconds`` seconds; ``--repeats`` rounds go
over every (size, variant) in turn and the fastest round counts. The achieved FLOP/s is
``GPT.flops_per_token(T) * tokens/s`` (6 N + attention, PaLM's count); it is given as a share
of the **measured peak**: the best rate of a timed ``2048 x 2048`` matmul in the same dtype,
in the same process, on the same threads, measured just before each round of the size (the
highest of the rounds counts; not a datasheet figure: :func:`smallgpt.train.peak_flops`'s
nominal MFU is shown next to it).

**Where the time goes.** Eager variants then run the same steps split into pieces, each timed
with ``time.perf_counter`` (CPU ops are synchronous; on CUDA the device is synchronised
around every piece): *data* (the loader's next batch, moved to the device), *fwd blocks*
(``GPT.hidden_states``: embeddings, blocks, final norm), *fwd head* (``GPT.head_loss``: the
output layer and the cross-entropy, on the hidden states detached from the blocks), *bwd
head* (``loss.backward()``, which stops at the detached hidden states), *bwd blocks*
(``h.backward(grad of h)``), *optimizer* (clipping, every optimizer's step, zeroing). The
split computes exactly what the plain step does; only the autograd graph is cut in two at
the hidden states. The table gives each piece's milliseconds and share, and the head's
share of the model's FLOPs (``6 V C`` per token of ``flops_per_token``) beside the head's
share of the time. (With ``loss_chunk`` the head's gradients are formed in its forward pass,
so *fwd head* holds nearly all of the head's time.)

With ``--compare TREE`` every (size, variant) is measured for this checkout and for TREE (a
checkout of another commit with its extension built), alternately, each in a fresh process
that imports that tree's ``python/`` folder, and the table gives both and their ratio.
Tables are printed and appended to ``benches/RESULTS.md`` (``--no-record``: printed only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if "--worker" not in sys.argv:  # a --compare child imports the tree PYTHONPATH names
    sys.path.insert(0, str(ROOT / "python"))

import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from smallgpt.config import OptimSection, build_config  # noqa: E402
from smallgpt.model import GPT, GPTConfig  # noqa: E402
from smallgpt.train import (  # noqa: E402
    build_optimizers,
    configure_optimizer,
    cpu_supports_fast_bf16,
    peak_flops,
    resolve_dtype,
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
#: Sizes read from presets: name -> (preset, max_time that picks its [[by_time]] row or None)
PRESET_SIZES: Dict[str, Any] = {
    "shakespeare-cpu": ("shakespeare-cpu", None),
    "shakespeare-cpu@300": ("shakespeare-cpu", 300.0),
    "books-cpu": ("books-cpu", None),
}
DEFAULT_SIZES = "shakespeare-cpu,shakespeare-cpu@300,books-cpu,quickstart,10m,gpt2-124m"
DEFAULT_THREADS = torch.get_num_threads()
VARIANTS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "fp32+compile": (torch.float32, True),
    "bf16+compile": (torch.bfloat16, True),
}
PIECES = ("data", "fwd blocks", "fwd head", "bwd head", "bwd blocks", "optimizer")


@dataclass
class Spec:
    """What one size trains: model, batch, sequence length, optimizer and precision."""

    config: GPTConfig
    batch: int
    seq: int
    optim: Optional[OptimSection] = None  # None: AdamW at 1e-4 (the fixed sizes)
    dtype: str = "float32"  # the preset's dtype (the "preset" variant)
    head_dtype: str = "same"


def spec_of(size: str, device: torch.device, batch: Optional[int], mult: int,
            model_set: Optional[Dict[str, Any]] = None) -> Spec:
    """The :class:`Spec` of a size name (a preset size or a fixed shape), with the
    ``GPTConfig`` fields of ``model_set`` changed."""
    spec = _spec(size, device, batch, mult)
    if model_set:
        spec.config = GPTConfig(**{**spec.config.to_dict(), **model_set})
    return spec


def _spec(size: str, device: torch.device, batch: Optional[int], mult: int) -> Spec:
    if size in PRESET_SIZES:
        preset, max_time = PRESET_SIZES[size]
        cfg = build_config(preset, overrides={"max_time": max_time} if max_time else None)
        vocab = cfg.data.quickstart_vocab if not cfg.data.path and preset.startswith(
            "shakespeare") else 50257
        m = cfg.data.vocab_multiple
        model = GPTConfig(**{**cfg.model.to_dict(), "vocab_size": (vocab + m - 1) // m * m})
        return Spec(model, batch or cfg.data.batch_size, cfg.data.seq_len or model.block_size,
                    cfg.optim, cfg.dtype, cfg.head_dtype)
    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; known: {', '.join([*PRESET_SIZES, *SIZES])}")
    kw, B, T_cpu, T_gpu = SIZES[size]
    T = T_gpu if device.type == "cuda" else T_cpu
    B = batch or (B * mult if device.type == "cuda" else B)
    return Spec(GPTConfig(block_size=T, **kw), B, T)


def measured_peak(device: torch.device, dtype: torch.dtype, n: int = 2048,
                  seconds: float = 1.0) -> float:
    """The best FLOP/s of an ``n x n`` matmul in ``dtype`` on this process's threads, over
    about ``seconds``."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    _sync(device)
    a @ b  # warm-up: kernel selection, page faults
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds or best == 0.0:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(spec: Spec, folder: Path) -> Any:
    """A real data loader over random tokens (enough for many distinct batches)."""
    from smallgpt.data import ShardDataset, write_meta, write_shard

    n = max(1 << 20, 32 * spec.batch * (spec.seq + 1))
    toks = np.random.default_rng(0).integers(0, spec.config.vocab_size, n)
    write_shard(folder / "train_000000.bin", toks)
    write_meta(folder, {"format": "smallgpt-shards", "version": 1, "vocab_size":
                        spec.config.vocab_size, "splits": {"train": {
                            "documents": 1, "tokens": n, "shards": ["train_000000.bin"]}}})
    return ShardDataset(folder, "train", spec.seq, spec.batch, "random", 0)


class Run:
    """A model, its optimizers and data for one (size, variant), ready to step."""

    def __init__(self, spec: Spec, variant: str, device: torch.device, folder: Path) -> None:
        from smallgpt.train.hardware import resolve_head_dtype

        base, _, threads = variant.partition("@")
        if threads:
            torch.set_num_threads(int(threads.rstrip("t")))
        if base == "preset":
            self.dtype, compiled = resolve_dtype(spec.dtype, device), False
        else:
            self.dtype, compiled = VARIANTS[base]
        torch.manual_seed(0)
        self.spec, self.device, self.compiled = spec, device, compiled
        self.model = GPT(spec.config).to(device)
        self.model.head_dtype = resolve_head_dtype(spec.head_dtype, device, self.dtype)
        if spec.optim is None:
            self.opts = [configure_optimizer(self.model, 1e-4, 0.1, (0.9, 0.95), 1e-8, device)]
            self.clip = 1.0
        else:
            self.opts = build_optimizers(self.model, spec.optim, device)
            self.clip = spec.optim.grad_clip or float("inf")
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.data = _loader(spec, folder)

    def ctx(self) -> Any:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def batch(self) -> Any:
        x, y = self.data.step_batches()[0]
        return x.to(self.device), y.to(self.device)

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        for opt in self.opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        x, y = self.batch()
        with self.ctx():
            _, loss = self.fwd(x, y)
        loss.backward()
        self.optimizer_step()

    def split_step(self, times: Dict[str, float]) -> None:
        """One step in timed pieces (see the module's docstring); adds seconds to ``times``."""
        clock = _Clock(self.device, times)
        x, y = clock("data", self.batch)
        with self.ctx():
            h = clock("fwd blocks", lambda: self.model.hidden_states(x))
            cut = h.detach().requires_grad_(True)
            _, loss = clock("fwd head", lambda: self.model.head_loss(cut, y))
        clock("bwd head", loss.backward)
        clock("bwd blocks", lambda: h.backward(cut.grad))
        clock("optimizer", self.optimizer_step)


class _Clock:
    """Times calls into a dict of seconds, synchronising the device around each."""

    def __init__(self, device: torch.device, times: Dict[str, float]) -> None:
        self.device, self.times = device, times

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        _sync(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out


def _timed(fn: Callable[[], None], device: torch.device, seconds: float) -> tuple:
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        if time.perf_counter() - t0 >= seconds and n >= 3:
            return n, time.perf_counter() - t0


def bench_one(size: str, variant: str, device: torch.device, seconds: float,
              batch: Optional[int], gpu_batch_mult: int, split: bool = True,
              model_set: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Throughput (and, for eager variants, the time per piece) of one (size, variant)."""
    spec = spec_of(size, device, batch, gpu_batch_mult, model_set)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(spec, variant, device, Path(tmp))
        peak = measured_peak(device, run.dtype)
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up (and compilation)
            run.step()
        _sync(device)
        warm = time.perf_counter() - t0
        n, dt = _timed(run.step, device, seconds)
        times: Dict[str, float] = {}
        m = 0
        if split and not run.compiled:
            m, _ = _timed(lambda: run.split_step(times), device, seconds)
    tps = n * spec.batch * spec.seq / dt
    nominal = peak_flops(device, run.dtype)  # uses the current thread count on CPU
    torch.set_num_threads(DEFAULT_THREADS)
    flops = run.model.flops_per_token(spec.seq)
    c = spec.config
    return {"size": size, "variant": variant, "B": spec.batch, "T": spec.seq,
            "params_M": run.model.num_params() / 1e6, "tok_s": tps, "ms_step": 1000 * dt / n,
            "warmup_s": warm, "achieved": flops * tps, "peak": peak,
            "of_peak": flops * tps / peak, "mfu": flops * tps / nominal if nominal else 0.0,
            "head_flops": 6.0 * c.vocab_size * c.n_embd / flops,
            "pieces_ms": {k: 1000 * v / m for k, v in times.items()} if m else {}}


def _worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints its row as JSON (``--compare`` children)."""
    r = bench_one(args.sizes, args.variants, torch.device(args.device), args.seconds,
                  args.batch, args.gpu_batch_mult, split=False)
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


def _skipped(size: str, variant: str, device: torch.device, all_variants: bool) -> bool:
    """Variants not worth minutes: ``preset`` for fixed shapes; on CPUs, bf16 without native
    bf16 and compile, except for the quickstart's size (or with ``--all``)."""
    if variant.partition("@")[0] == "preset":
        return size not in PRESET_SIZES
    slow = ("bf16" in variant and not cpu_supports_fast_bf16()) or "compile" in variant
    small = size in ("quickstart", "shakespeare-cpu")
    return device.type == "cpu" and slow and not small and not all_variants


def _better(old: Optional[Dict[str, Any]], new: Dict[str, Any]) -> Dict[str, Any]:
    """The faster run of a pair, against the higher of the two measured peaks."""
    if old is None:
        return new
    keep = dict(new if new["tok_s"] > old["tok_s"] else old)
    keep["peak"] = max(old["peak"], new["peak"])
    keep["of_peak"] = keep["achieved"] / keep["peak"]
    keep["runs"] = old.get("runs", 1) + 1
    return keep


def _print_row(r: Dict[str, Any]) -> None:
    print(f"{r['size']:<20} {r['variant']:<13} {r['params_M']:>7.2f}M {r['B']:>4}x{r['T']:<4} "
          f"{r['tok_s']:>9.0f} {r['ms_step']:>8.1f} {r['achieved'] / 1e9:>8.1f} "
          f"{100 * r['of_peak']:>6.1f}% {r['peak'] / 1e9:>8.1f} {100 * r['mfu']:>6.1f}%",
          flush=True)


def tables(rows: List[Dict[str, Any]]) -> str:
    """The throughput table and the time-per-piece table, in Markdown."""
    main = harness.md_table(
        ["size", "variant", "params", "B x T", "tok/s", "ms/step", "GFLOP/s",
         "% of measured peak", "measured peak GFLOP/s", "nominal MFU"],
        [[r["size"], r["variant"], f"{r['params_M']:.2f}M", f"{r['B']}x{r['T']}",
          f"{r['tok_s']:.0f}", f"{r['ms_step']:.1f}", f"{r['achieved'] / 1e9:.1f}",
          f"{100 * r['of_peak']:.1f}%", f"{r['peak'] / 1e9:.1f}", f"{100 * r['mfu']:.1f}%"]
         for r in rows])
    split = [r for r in rows if r["pieces_ms"]]
    pieces = harness.md_table(
        ["size", "variant", *PIECES, "head share of time", "head share of FLOPs"],
        [[r["size"], r["variant"]]
         + [f"{r['pieces_ms'].get(k, 0):.1f} ms ({_share(r, [k]):.0f}%)" for k in PIECES]
         + [f"{_share(r, ['fwd head', 'bwd head']):.0f}%", f"{100 * r['head_flops']:.0f}%"]
         for r in split])
    return main + "\n\nTime per optimizer step, by piece:\n\n" + pieces


def _share(r: Dict[str, Any], keys: List[str]) -> float:
    total = sum(r["pieces_ms"].values())
    return 100.0 * sum(r["pieces_ms"].get(k, 0.0) for k in keys) / total if total else 0.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"comma list from {','.join([*PRESET_SIZES, *SIZES])}")
    p.add_argument("--variants", default="preset,fp32,bf16,fp32+compile",
                   help=f"comma list from preset,{','.join(VARIANTS)} (suffix @Nt: N threads)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per variant")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--gpu-batch-mult", type=int, default=4,
                   help="multiply the fixed sizes' batch sizes on CUDA")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--all", action="store_true",
                   help="also run bf16/compile on the larger sizes of CPUs without native bf16")
    p.add_argument("--compare", metavar="TREE", help="another checkout to measure alongside")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds over every (size, variant), the fastest counts; with "
                   "--compare: runs per tree")
    p.add_argument("--no-record", action="store_true", help="print only (no RESULTS.md)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a GPTConfig field for every size, e.g. loss_chunk=256")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model_set = dict(_model_field(kv) for kv in args.model_set)
    return args


def _model_field(text: str) -> tuple:
    """``'loss_chunk=256'`` → ``("loss_chunk", 256)``, typed as the GPTConfig field is."""
    import dataclasses

    from smallgpt.config import ConfigError, TrainConfig, set_key

    key, sep, value = text.partition("=")
    if not sep or key not in {f.name for f in dataclasses.fields(GPTConfig)}:
        raise SystemExit(f"--model-set: expected a GPTConfig FIELD=VALUE, got {text!r}")
    cfg = TrainConfig()
    try:
        set_key(cfg, f"model.{key}", value)
    except ConfigError as e:
        raise SystemExit(f"--model-set: {e}") from None
    return key, getattr(cfg.model, key)


def main() -> None:
    args = parse_args()
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
    print(f"{'size':<20} {'variant':<13} {'params':>8} {'B x T':>9} {'tok/s':>9} {'ms/step':>8} "
          f"{'GFLOP/s':>8} {'%peak':>7} {'peak':>8} {'MFU':>7}")
    pairs = [(s, v) for s in args.sizes.split(",") for v in args.variants.split(",")
             if not _skipped(s, v, device, args.all)]
    best: Dict[Any, Dict[str, Any]] = {}
    for _ in range(args.repeats):  # rounds over every pair: load drifts hit all alike
        for size, variant in pairs:
            try:
                r = bench_one(size, variant, device, args.seconds, args.batch,
                              args.gpu_batch_mult, model_set=args.model_set)
            except Exception as e:  # e.g. no C++ compiler for torch.compile
                print(f"{size:<20} {variant:<13} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]}")
                continue
            _print_row(r)
            best[(size, variant)] = _better(best.get((size, variant)), r)
    rows = [best[p] for p in pairs if p in best]
    if rows:
        changed = "".join(f", {k}={v}" for k, v in args.model_set.items())
        harness.append_run("bench_train", f"throughput on {device.type}{changed}", tables(rows),
                           threads=DEFAULT_THREADS, record=not args.no_record)


if __name__ == "__main__":
    main()
