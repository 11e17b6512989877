"""The training loop: AdamW + warmup/cosine, accumulation, mixed precision, DDP, checkpoints.

Entry point: :func:`train` (the ``smallgpt-train`` CLI is a thin wrapper around it).

Checkpoints (``torch.save`` dicts, written atomically) in ``cfg.out``:

* ``ckpt_latest.pt``: the most recent save (every ``save_interval`` steps, at the end, on
  Ctrl-C); ``ckpt_<step>.pt``: the last ``keep_last`` saves; ``ckpt_best.pt``: the lowest
  validation loss seen.
* keys: ``model``, ``model_config``, ``train_config``, ``optimizer``, ``scaler``, ``step``,
  ``schedule``, ``rng`` (per rank), ``data`` (per rank), ``tokenizer`` (JSON string),
  ``elapsed_s``, ``best_val_loss``, ``val_loss``, ``val_bpb``. Only plain Python values and
  tensors are stored so ``torch.load(..., weights_only=True)`` reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from smallgpt.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, validate
from smallgpt.data import ShardDataset, load_meta

__all__ = [
    "TrainingError",
    "TrainingDiverged",
    "train",
    "lr_at",
    "configure_optimizer",
    "prepare_shakespeare",
    "peak_flops",
    "load_checkpoint",
    "evaluate",
]

CKPT_LATEST = "ckpt_latest.pt"
CKPT_BEST = "ckpt_best.pt"
_CKPT_NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")
LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """A run cannot start or continue (bad data folder, vocabulary mismatch, ...)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------- quickstart data


def prepare_shakespeare(cache_dir: Path | str, vocab_size: int = 512) -> Path:
    """Tokenize the bundled Tiny Shakespeare into a shard folder (once) and return it.

    The first 90% of the characters are the training split and the last 10% the validation
    split, as in nanoGPT. A byte-level BPE tokenizer of ``vocab_size`` tokens (GPT-4 split
    pattern, one ``<|endoftext|>`` special token) is trained on the training split. The
    folder name includes the vocabulary size and a hash of the text, so the cache is reused
    until either changes.
    """
    from smallgpt.corpus import tokenize_corpus
    from smallgpt.tokenizer import Tokenizer

    text_path = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt"
    text = text_path.read_text(encoding="utf-8")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    out = Path(cache_dir).expanduser() / f"tinyshakespeare-bpe{vocab_size}-{digest}"
    if (out / "meta.json").exists():
        return out
    train_text = text[: int(len(text) * 0.9)]
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # The tokenizer sees only the training split; the shards come from the same Rust
        # pipeline as `smallgpt-tokenize` (which splits a single document nanoGPT's way).
        tok = Tokenizer.train([train_text], vocab_size=vocab_size, pattern="gpt4",
                              special_tokens=("<|endoftext|>",))
        tokenize_corpus([text_path], tmp, tokenizer=tok, val_fraction=0.1, overwrite=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_cache_dir() -> Path:
    """``$SMALLGPT_CACHE`` or ``$XDG_CACHE_HOME/smallgpt`` or ``~/.cache/smallgpt``."""
    if os.environ.get("SMALLGPT_CACHE"):
        return Path(os.environ["SMALLGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smallgpt"


# ---------------------------------------------------------------- devices and peaks


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return 2.5


def cpu_supports_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul units (AMX-BF16 or AVX512-BF16)."""
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


# Dense peak FLOP/s per GPU: (bf16/fp16 tensor cores, tf32/fp32). Matched by name substring.
_GPU_PEAKS: List[Tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 125e12, 62.5e12),
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one device, for MFU.

    GPUs: a datasheet table by device name (dense, no sparsity). CPUs: a documented estimate,
    ``threads x clock x FLOPs/cycle`` with the clock from ``/proc/cpuinfo`` and 32 fp32
    FLOPs/cycle/core for AVX2+FMA (two 8-wide FMA units), 64 with AVX-512, and 1024 bf16
    FLOPs/cycle/core with AMX. ``$SMALLGPT_PEAK_FLOPS`` overrides everything. Returns 0 when
    unknown (MFU is then reported as 0).
    """
    env = os.environ.get("SMALLGPT_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        low_precision = dtype in (torch.bfloat16, torch.float16)
        for key, half, single in _GPU_PEAKS:
            if key.lower() in name.lower():
                return half if low_precision else single
        return 0.0
    if device.type == "cpu":
        flags = _cpu_flags()
        if dtype == torch.bfloat16 and "amx_bf16" in flags:
            per_cycle = 1024.0
        elif "avx512f" in flags:
            per_cycle = 64.0
        elif "avx2" in flags and "fma" in flags:
            per_cycle = 32.0
        else:
            per_cycle = 8.0
        return torch.get_num_threads() * _cpu_ghz() * 1e9 * per_cycle
    return 0.0


def _cpu_times() -> Tuple[int, int]:
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def auto_threads(sample_s: float = 0.25) -> int:
    """Intra-op threads for a CPU run: the cores that are idle right now.

    OpenMP threads wait for each other at every operation, so one thread sharing a core with
    another busy process stalls all of them: on a 2-core machine with one core busy, 2 threads
    ran the quickstart 3x slower than 1 thread, while on an idle machine 2 threads were 1.6x
    faster than 1. Samples ``/proc/stat`` for ``sample_s`` seconds; keeps torch's default when
    ``OMP_NUM_THREADS`` is set or ``/proc/stat`` is unavailable.
    """
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default
    try:
        idle0, total0 = _cpu_times()
        time.sleep(sample_s)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return default
    if total1 <= total0:
        return default
    idle_cores = (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or default)
    return max(1, min(default, int(idle_cores + 0.5)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this rank's GPU) if available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype; ``auto`` → bf16 on CUDA with bf16 (else fp16) and on CPUs with native
    bf16 (AMX / AVX512-BF16), fp32 otherwise (AVX2-only CPUs run bf16 slower than fp32)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------- optimizer and schedule


def configure_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: Tuple[float, float],
    eps: float, device: torch.device,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: linear weights, embeddings) only.

    Biases and LayerNorm parameters are not decayed. Uses the fused kernel on CUDA.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: Dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
          time_progress: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then a
    cosine from ``lr`` down to ``min_lr`` reached at ``decay_steps``, constant after. The
    cosine's progress is ``max(step-based progress, time_progress)`` so time-limited runs
    decay fully by their deadline.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = 0.0
    if decay_steps > warmup_steps:
        p = (step - warmup_steps) / (decay_steps - warmup_steps)
    elif decay_steps > 0:
        p = 1.0
    p = min(max(p, time_progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


# ---------------------------------------------------------------- distributed


@dataclasses.dataclass
class Dist:
    """Process-group facts for this process (world_size 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False
    owns_group: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (NCCL on GPU, gloo on CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (
            device_name == "auto" and torch.cuda.is_available()
        )
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Dist(rank, local_rank, world, True, owns)


# ---------------------------------------------------------------- checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` atomically (hard link when possible)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: Path | str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint dict written by :func:`train`."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _numbered_checkpoints(out: Path) -> List[Tuple[int, Path]]:
    found = []
    for p in out.glob("ckpt_*.pt"):
        m = _CKPT_NUMBERED.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: ShardDataset, device: torch.device,
    autocast: Callable[[], Any], max_tokens: int = 0, dist_info: Optional[Dist] = None,
) -> Tuple[float, float]:
    """Summed cross-entropy (nats) and number of predicted tokens over the eval pass.

    Under DDP each rank evaluates its share and the totals are all-reduced.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in dataset.iter_eval(max_tokens):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=-1, reduction="sum")
        total[0] += nats.double()
        total[1] += (y != -1).sum()
    if dist_info is not None and dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0]), float(total[1])


# ---------------------------------------------------------------- the run


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nsmallgpt-train: interrupt received, saving a checkpoint (Ctrl-C again to "
              "abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    from smallgpt.model import GPTConfig

    m = cfg.model
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    kw = {k: v for k, v in dataclasses.asdict(m).items() if k in fields}
    kw["vocab_size"] = vocab_size
    return GPTConfig(**kw)


def _resolve_vocab(cfg: TrainConfig, meta: Dict[str, Any], train_ds: ShardDataset,
                   data_dir: Path) -> int:
    data_vocab = meta.get("vocab_size")
    if data_vocab is None:
        data_vocab = max(train_ds.max_token + 1, 1)
    data_vocab = int(data_vocab)
    if cfg.model.vocab_size == 0:
        mult = cfg.model.vocab_multiple
        return ((data_vocab + mult - 1) // mult) * mult
    if data_vocab > cfg.model.vocab_size:
        raise TrainingError(
            f"data in {data_dir} has vocabulary size {data_vocab}, larger than the model's "
            f"model.vocab_size {cfg.model.vocab_size}"
        )
    return cfg.model.vocab_size


def _log(msg: str, dist_info: Dist) -> None:
    if dist_info.master:
        print(msg, flush=True)


def train(cfg: TrainConfig, resume: bool = False,
          on_log: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run (or resume) training as configured and return a summary dict.

    Args:
        cfg: the run's configuration (validated here).
        resume: continue from ``<cfg.out>/ckpt_latest.pt``; the checkpoint's model, optimizer,
            schedule, data cursor and RNG states are restored. ``cfg`` should be the
            checkpoint's config with any overrides (e.g. a larger ``max_steps``) applied.
        on_log: optional callback receiving every metrics record.

    Returns:
        ``{"step", "val_loss", "val_bpb", "best_val_loss", "elapsed_s", "out",
        "stopped"}`` where ``stopped`` is ``"max_steps"``, ``"max_time"`` or ``"interrupt"``.

    Raises:
        ConfigError: invalid configuration values.
        TrainingError: missing/invalid data folder, vocabulary mismatch, nothing to resume.
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
    """
    t_start = time.perf_counter()
    validate(cfg)
    dist_info = init_distributed(cfg.device)
    try:
        return _train(cfg, resume, on_log, t_start, dist_info)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, on_log: Optional[Callable[[Dict[str, Any]], None]],
           t_start: float, dist_info: Dist) -> Dict[str, Any]:
    device = resolve_device(cfg.device, dist_info.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and not dist_info.enabled:
        torch.set_num_threads(auto_threads())
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    latest = out / CKPT_LATEST

    ckpt: Optional[Dict[str, Any]] = None
    if resume:
        if not latest.exists():
            raise TrainingError(f"--resume: no checkpoint {latest}")
        ckpt = load_checkpoint(latest)

    # ---- data
    if cfg.data.path:
        data_dir = Path(cfg.data.path)
        if not data_dir.is_dir():
            raise TrainingError(f"data folder {data_dir} does not exist")
    else:
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        if dist_info.master:
            data_dir = prepare_shakespeare(cache, cfg.data.quickstart_vocab)
        if dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()
        data_dir = prepare_shakespeare(cache, cfg.data.quickstart_vocab)
    try:
        meta = load_meta(data_dir)
        train_ds = ShardDataset(data_dir, "train", cfg.model.block_size, cfg.data.batch_size,
                                mode=cfg.data.sampling, seed=cfg.seed, rank=dist_info.rank,
                                world_size=dist_info.world_size)
        val_ds = ShardDataset(data_dir, "val", cfg.model.block_size,
                              cfg.data.eval_batch_size or cfg.data.batch_size,
                              mode="sequential", rank=dist_info.rank,
                              world_size=dist_info.world_size)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(str(e)) from None
    vocab_size = _resolve_vocab(cfg, meta, train_ds, data_dir)
    tok_file = data_dir / str(meta.get("tokenizer", "tokenizer.json"))
    tokenizer_json = tok_file.read_text(encoding="utf-8") if tok_file.exists() else None
    val_info = meta["splits"].get("val", {})
    val_bytes_total = val_info.get("bytes")
    final_tokens = 0 if cfg.data.final_eval_full else cfg.data.eval_tokens
    val_eval_tokens = val_ds.eval_token_count(final_tokens)  # for the final-eval time estimate
    full_count = val_ds.eval_token_count(0)

    def bytes_for(max_tokens: int) -> Optional[float]:
        # Whole split: every token after the leading one is predicted, so these are exactly the
        # split's bytes. A prefix sample (data.eval_tokens) uses the split's bytes/token ratio.
        if not val_bytes_total:
            return None
        return float(val_bytes_total) * val_ds.eval_token_count(max_tokens) / max(full_count, 1)

    # ---- model
    torch.manual_seed(cfg.seed)
    model_cfg = _model_config(cfg, vocab_size)
    from smallgpt.model import GPT

    model = GPT(model_cfg).to(device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    raw_model = model
    optimizer = configure_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay,
                                    (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps, device)
    use_scaler = device.type == "cuda" and dtype == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    # Dropout etc. draw from a per-rank stream; the model init above is identical on all ranks.
    torch.manual_seed(cfg.seed + dist_info.rank)

    step = 0
    elapsed_before = 0.0
    best_val = math.inf
    time_reserve = 0.0
    if ckpt is not None:
        try:
            raw_model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise TrainingError(f"checkpoint {latest} does not match the model config: "
                                f"{str(e).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and use_scaler:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        best_val = float(ckpt.get("best_val_loss", math.inf))
        time_reserve = float(ckpt.get("schedule", {}).get("time_reserve", 0.0))
        rngs, datas = ckpt.get("rng") or [], ckpt.get("data") or []
        if len(datas) == dist_info.world_size:
            train_ds.load_state_dict(datas[dist_info.rank])
            _set_rng_state(rngs[dist_info.rank], device)
        else:
            _log(f"note: checkpoint was written by {len(datas)} process(es), this run has "
                 f"{dist_info.world_size}; data order and RNG streams restart", dist_info)

    if cfg.compile:
        model = torch.compile(model)
    ddp_model = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- bookkeeping
    if dist_info.master:
        out.mkdir(parents=True, exist_ok=True)
        if tokenizer_json is not None:
            (out / "tokenizer.json.tmp").write_text(tokenizer_json, encoding="utf-8")
            os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        if ckpt is None:
            # A fresh run into a used folder: drop the old run's checkpoints so keep-last and
            # --resume never pick up a stale one.
            stale = [p for _, p in _numbered_checkpoints(out)] + [latest, out / CKPT_BEST]
            stale = [p for p in stale if p.exists()]
            if stale:
                _log(f"note: starting a new run in {out}; removing {len(stale)} old "
                     "checkpoint(s)", dist_info)
                for p in stale:
                    p.unlink()
    metrics_f = None
    if dist_info.master:
        metrics_f = open(out / "metrics.jsonl", "a" if ckpt is not None else "w",
                         encoding="utf-8")
    tb = None
    if cfg.tensorboard and dist_info.master:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            print("smallgpt-train: warning: tensorboard is not installed; skipping it",
                  file=sys.stderr)

    def autocast() -> Any:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    accum = cfg.optim.grad_accum
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size * accum * dist_info.world_size
    flops_per_token = raw_model.flops_per_token(cfg.model.block_size)
    peak = peak_flops(device, dtype) * dist_info.world_size
    decay_steps = cfg.optim.decay_steps or cfg.max_steps
    max_steps = cfg.max_steps if cfg.max_steps > 0 else sys.maxsize
    _log(f"smallgpt-train: {raw_model.num_params():,} parameters (non-embedding), vocab "
         f"{vocab_size}, {tokens_per_step:,} tokens/step, device {device}, "
         f"{str(dtype).replace('torch.', '')}, {torch.get_num_threads()} CPU threads, world "
         f"size {dist_info.world_size}, data "
         f"{data_dir}", dist_info)

    last_val: Dict[str, Optional[float]] = {"val_loss": None, "val_bpb": None}
    if ckpt is not None:
        last_val = {"val_loss": ckpt.get("val_loss"), "val_bpb": ckpt.get("val_bpb")}

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def gather(obj: Any) -> List[Any]:
        if not dist_info.enabled:
            return [obj]
        import torch.distributed as dist

        objs: List[Any] = [None] * dist_info.world_size
        dist.all_gather_object(objs, obj)
        return objs

    best_written = ckpt is not None  # same value on every rank (save() is collective)

    def save(kind: str, lr: float) -> None:
        """Write checkpoints; ``kind`` is "regular" (latest + numbered) or "best"."""
        nonlocal best_written
        if kind == "best":
            best_written = True
        rng_all = gather(_rng_state(device))
        data_all = gather(train_ds.state_dict())
        if not dist_info.master:
            return
        payload = {
            "format": "smallgpt-checkpoint",
            "version": 1,
            "model": raw_model.state_dict(),
            "model_config": dataclasses.asdict(model_cfg),
            "train_config": config_to_dict(cfg),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "step": step,
            "schedule": {"lr": lr, "decay_steps": decay_steps, "time_reserve": time_reserve},
            "rng": rng_all,
            "data": data_all,
            "world_size": dist_info.world_size,
            "tokenizer": tokenizer_json,
            "elapsed_s": elapsed(),
            "best_val_loss": best_val,
            "val_loss": last_val["val_loss"],
            "val_bpb": last_val["val_bpb"],
        }
        if kind == "best":
            _atomic_save(payload, out / CKPT_BEST)
            return
        if cfg.keep_last > 0:
            numbered = out / f"ckpt_{step:07d}.pt"
            _atomic_save(payload, numbered)
            _atomic_link(numbered, latest)
            for _, old in _numbered_checkpoints(out)[: -cfg.keep_last]:
                old.unlink(missing_ok=True)
        else:
            _atomic_save(payload, latest)

    def run_eval(final: bool = False) -> Dict[str, float]:
        t0 = time.perf_counter()
        max_tokens = final_tokens if final else cfg.data.eval_tokens
        nats, count = evaluate(model, val_ds, device, autocast, max_tokens, dist_info)
        val_loss = nats / max(count, 1)
        rec: Dict[str, float] = {"val_loss": val_loss}
        val_bytes = bytes_for(max_tokens)
        if val_bytes:
            rec["val_bpb"] = nats / LN2 / val_bytes
        last_val["val_loss"] = val_loss
        last_val["val_bpb"] = rec.get("val_bpb")
        rec["eval_s"] = time.perf_counter() - t0
        return rec

    def emit(rec: Dict[str, Any]) -> None:
        if not dist_info.master:
            return
        assert metrics_f is not None
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    tb.add_scalar(k, v, rec["step"])
        if on_log is not None:
            on_log(rec)

    bar = None
    if dist_info.master and cfg.progress and sys.stderr.isatty():
        from tqdm import tqdm

        total = cfg.max_steps if cfg.max_steps > 0 else None
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, leave=True)

    model.train()
    stopped = "max_steps"
    lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, decay_steps)
    window_t0 = time.perf_counter()
    window_tokens = 0
    window_eval_s = 0.0
    trained_any = False
    saved_step = step if ckpt is not None else -1
    stop_tensor = torch.zeros(2, dtype=torch.float64)

    with _StopFlag() as stop_flag:
        while True:
            # Decide whether to stop before doing another step; under DDP all ranks agree and
            # share rank 0's clock (the LR schedule may depend on it).
            now = elapsed()
            stop_tensor[0] = 1.0 if stop_flag.requested else 0.0
            stop_tensor[1] = now
            if dist_info.enabled:
                import torch.distributed as dist

                if not dist_info.master:
                    stop_tensor[1] = 0.0
                dist.all_reduce(stop_tensor, op=dist.ReduceOp.MAX)
                now = float(stop_tensor[1])
            if stop_tensor[0] > 0:
                stopped = "interrupt"
                break
            if step >= max_steps:
                stopped = "max_steps"
                break
            if cfg.max_time > 0 and now + time_reserve >= cfg.max_time:
                stopped = "max_time"
                break

            time_progress = 0.0
            if cfg.max_time > 0:
                time_progress = now / max(cfg.max_time - time_reserve, 1e-9)
            lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps,
                       decay_steps, time_progress)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = train_ds.next_batch()
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                sync = contextlib.nullcontext()
                if dist_info.enabled and micro < accum - 1:
                    sync = ddp_model.no_sync()
                with sync:
                    with autocast():
                        _, loss = ddp_model(x, y)
                    loss = loss / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if use_scaler:
                scaler.unscale_(optimizer)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip)
            if dist_info.enabled:
                import torch.distributed as dist

                dist.all_reduce(loss_sum)  # gloo has no AVG
                loss_sum /= dist_info.world_size
            loss_val = float(loss_sum)
            if not math.isfinite(loss_val):
                if bar is not None:
                    bar.close()
                if metrics_f is not None:
                    metrics_f.close()
                kept = f"; last good checkpoint: {latest}" if latest.exists() else ""
                raise TrainingDiverged(f"loss became {loss_val} at step {step + 1}; "
                                       f"stopping{kept}")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step
            trained_any = True

            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}")

            is_last = step >= max_steps
            rec: Dict[str, Any] = {}
            do_eval = cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not is_last
            if step % cfg.log_interval == 0 or do_eval or step == 1:
                dt = time.perf_counter() - window_t0 - window_eval_s
                tps = window_tokens / max(dt, 1e-9)
                rec = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_sec": tps,
                       "mfu": flops_per_token * tps / peak if peak > 0 else 0.0,
                       "elapsed_s": elapsed()}
                window_t0, window_tokens, window_eval_s = time.perf_counter(), 0, 0.0
                if time_reserve == 0.0 and cfg.max_time > 0 and step > 1:
                    # Before the first eval, guess its cost (a forward is ~1/3 of a train
                    # step); step 1 is skipped as it includes one-off warm-up costs.
                    time_reserve = min(val_eval_tokens / max(3.0 * tps, 1.0) + 0.2,
                                       0.25 * cfg.max_time)
            if do_eval:
                ev = run_eval()
                window_eval_s += ev["eval_s"]
                # The final eval may read more tokens than this one (data.final_eval_full);
                # scale, plus margin for the checkpoint.
                sample = max(val_ds.eval_token_count(cfg.data.eval_tokens), 1)
                time_reserve = ev["eval_s"] * 1.2 * val_eval_tokens / sample + 0.3
                rec.update({k: v for k, v in ev.items() if k != "eval_s"})
                rec["elapsed_s"] = elapsed()
                if ev["val_loss"] < best_val:
                    best_val = ev["val_loss"]
                    save("best", lr)
                if bar is None and dist_info.master:
                    bpb = f", val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
                    print(f"step {step}: val_loss {ev['val_loss']:.4f}{bpb} "
                          f"({rec['elapsed_s']:.1f}s)", flush=True)
            if rec:
                emit(rec)
                if bar is None and dist_info.master and "val_loss" not in rec and \
                        cfg.progress:
                    print(f"step {step}: loss {loss_val:.4f}, lr {lr:.2e}, "
                          f"{rec['tokens_per_sec']:.0f} tok/s ({rec['elapsed_s']:.1f}s)",
                          flush=True)
            if cfg.save_interval > 0 and step % cfg.save_interval == 0 and not is_last:
                save("regular", lr)
                saved_step = step

    if bar is not None:
        bar.close()
    # ---- final eval and checkpoint (skipped on Ctrl-C: save what we have, quickly)
    final: Dict[str, Any] = {"step": step, "elapsed_s": elapsed()}
    if stopped != "interrupt" and step > 0:
        ev = run_eval(final=True)
        final.update({k: v for k, v in ev.items() if k != "eval_s"})
        final["elapsed_s"] = elapsed()
        if ev["val_loss"] < best_val or not best_written:
            best_val = min(best_val, ev["val_loss"])
            save("best", lr)
        if dist_info.master:
            bpb = f", val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
            print(f"step {step}: val_loss {ev['val_loss']:.4f}{bpb} "
                  f"({final['elapsed_s']:.1f}s, stopped by {stopped})", flush=True)
        emit({**final, "final": True})
    if step != saved_step:
        save("regular", lr)
    if metrics_f is not None:
        metrics_f.close()
    if tb is not None:
        tb.close()
    if dist_info.master and cfg.plot and trained_any:
        _plot(out)
    return {"step": step, "val_loss": last_val["val_loss"], "val_bpb": last_val["val_bpb"],
            "best_val_loss": best_val, "elapsed_s": elapsed(), "out": str(out),
            "stopped": stopped}


def _plot(out: Path) -> None:
    """Write ``loss_curve.png`` from ``metrics.jsonl`` if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train_pts: List[Tuple[int, float]] = []
    val_pts: List[Tuple[int, float]] = []
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                train_pts.append((rec["step"], rec["loss"]))
            if "val_loss" in rec:
                val_pts.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train_pts], [v for _, v in train_pts], lw=0.8, label="train")
    if val_pts:
        ax.plot([s for s, _ in val_pts], [v for _, v in val_pts], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / "loss_curve.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "loss_curve.png")


def config_from_checkpoint(path: Path | str) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return config_from_dict(ckpt["train_config"])
    except (KeyError, ConfigError) as e:
        raise TrainingError(f"{path}: cannot read its train_config ({e})") from None
