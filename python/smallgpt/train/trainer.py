"""The :class:`Trainer`: one object whose attributes are the whole state of a training run.

Reading order: ``__init__`` sets the run up (device, process group, run folder, data, model,
optimizer, resume), :meth:`Trainer.train_step` is one optimizer step, :meth:`Trainer.evaluate`
one pass over the validation split, :meth:`Trainer.fit` the loop with its stopping rules,
logging and checkpoints, and :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict`
what a checkpoint holds of the trainer. The pieces it uses have modules of their own:
:mod:`.hardware`, :mod:`.distributed`, :mod:`.schedule`, :mod:`.optim`, :mod:`.metrics`,
:mod:`smallgpt.checkpoint` and :mod:`smallgpt.data`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from smallgpt.checkpoint import (
    Checkpoint,
    CheckpointError,
    LoadedModel,
    RunFolder,
    load_model,
    nonfinite_tensors,
    write_json,
)
from smallgpt.config import TrainConfig, config_to_dict, default_out, validate
from smallgpt.data import (
    ShardDataset,
    data_identity,
    default_cache_dir,
    identity_differences,
    load_meta,
    prepare_shakespeare,
)
from smallgpt.model import GPT, GPTConfig
from smallgpt.train.distributed import Dist, init_distributed, no_sync, wrap_model
from smallgpt.train.hardware import (
    auto_threads,
    peak_flops,
    resolve_device,
    resolve_dtype,
    resolve_head_dtype,
)
from smallgpt.train.metrics import MetricsLogger
from smallgpt.train.optim import build_optimizers, set_lr
from smallgpt.train.schedule import Schedule

__all__ = ["Trainer", "TrainingError", "TrainingDiverged", "evaluate_only", "train"]

LN2 = math.log(2.0)
Record = Dict[str, Any]


class TrainingError(RuntimeError):
    """A run cannot start or continue (bad data folder, vocabulary mismatch, ...)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class _Data:
    """The run's data folder, read once at setup."""

    folder: Path
    train: ShardDataset
    val: ShardDataset
    vocab_size: int
    tokenizer_json: Optional[str]
    val_bytes: Optional[float]
    identity: Dict[str, Any]


class Trainer:
    """Trains (or resumes) the GPT that a :class:`TrainConfig` describes.

    Args:
        cfg: the run's configuration (validated here).
        resume: continue from ``<out>/ckpt_latest.pt``: model, optimizer, schedule, data
            cursor, every RNG and the thread count are restored, so N steps + resume + N steps
            equals 2N steps bit for bit (on CPU, without a clock-driven schedule).
        overwrite: start afresh in a folder that holds another run, deleting its files.
            Without it such a folder is refused.
        on_log: called with every metrics record.
        model_overrides: the ``model.*`` keys the user set explicitly; with ``init_from``
            they must agree with the pretrained model (only ``dropout`` may differ).
        eval_only: only evaluate (the ``init_from`` or ``resume`` model): nothing is written
            to the run folder and no optimizer is built.
        data_changed_ok: resume although the data folder's contents (tokenizer, shards) are
            not those the run trained on; without it such a resume is refused.

    While it trains, the run folder is locked (rank 0 holds an OS file lock; see
    :meth:`smallgpt.checkpoint.RunFolder.lock`): a second process gets ``RunInUseError``.

    State (attributes): ``step``, ``tokens_seen``, ``best_val_loss``, ``last_eval``, the
    clock (``elapsed``), the final-evaluation reserve, plus ``model``, ``optimizers``,
    ``scaler`` and the data loaders.

    Raises:
        ConfigError, TrainingError, HardwareError, CheckpointError: at setup, with messages
            meant for the user.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 on_log: Optional[Callable[[Record], None]] = None,
                 model_overrides: Iterable[str] = (), eval_only: bool = False,
                 data_changed_ok: bool = False) -> None:
        validate(cfg)
        self.eval_only = eval_only
        self.data_changed_ok = data_changed_ok
        self._t0 = time.perf_counter()
        self.cfg = cfg
        self.model_overrides = {k.split(".", 1)[-1] for k in model_overrides}
        if not cfg.out:
            cfg.out = default_out(cfg)
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        try:
            self.dist: Dist = init_distributed(cfg.parallel, self.device)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        try:
            self._setup(resume, overwrite, on_log)
        except BaseException:
            if hasattr(self, "run"):
                self.run.unlock()
            self.dist.close()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self, resume: bool, overwrite: bool,
               on_log: Optional[Callable[[Record], None]]) -> None:
        cfg = self.cfg
        self.run = RunFolder(cfg.out)
        ckpt = self._open_run_folder(resume, overwrite)
        self._setup_threads(ckpt)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        pretrained = self._load_pretrained() if cfg.init_from and ckpt is None else None
        block = (ckpt.model_config if ckpt else pretrained.model.config if pretrained
                 else cfg.model).block_size
        self.seq_len = cfg.data.seq_len or block
        if self.seq_len > block:
            raise TrainingError(f"data.seq_len ({self.seq_len}) exceeds the model's context "
                                f"(block_size {block})")
        self.data = self._load_data()
        if ckpt is not None:
            self._check_resume(ckpt)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = self._build_model(ckpt, pretrained)
        self.model_config: GPTConfig = self.model.config
        if ckpt is None and not self.eval_only:
            # Only now that data and model are known good may an old run be replaced.
            if self.dist.master:
                self.run.prepare_new_run(overwrite)
            self.dist.barrier()
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        self.model.head_dtype = resolve_head_dtype(cfg.head_dtype, self.device, self.dtype)
        wrapped = wrap_model(self.model, self.dist) if self.dist.mode == "fsdp" else self.model
        self.optimizers = [] if self.eval_only else \
            build_optimizers(self.model, cfg.optim, self.device)
        # fp16 gradients underflow without loss scaling (bf16 and fp32 have fp32's range);
        # resolve_dtype allows fp16 on CUDA and CPU only
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type if fp16 else "cpu", enabled=fp16)
        # Dropout draws from a per-rank stream.
        torch.manual_seed(cfg.seed + self.dist.rank)
        self._init_state()
        if ckpt is not None and not self.eval_only:
            self.load_state_dict({**ckpt.trainer, "model": ckpt.model}, ckpt.metrics)
        elif ckpt is not None:
            self.model.load_state_dict(ckpt.model)
            self.step = ckpt.step
        compiled = torch.compile(wrapped) if cfg.compile else wrapped
        self.eval_module = compiled
        self.train_module = wrap_model(compiled, self.dist) if self.dist.mode == "ddp" \
            else compiled
        o = cfg.optim
        self.schedule = Schedule(o.lr, o.min_lr, o.warmup_steps, o.decay_steps or cfg.max_steps,
                                 cfg.max_time, o.schedule, o.decay_fraction)
        self.tokens_per_step = cfg.data.batch_size * self.seq_len
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak = peak_flops(self.device, self.dtype) * self.dist.world_size
        if ckpt is not None and self.dist.master and not self.eval_only:
            self.run.tidy_for_resume(ckpt.step)
        if self.peak <= 0 and not self.eval_only:
            self._print(f"note: the peak FLOP/s of {_device_name(self.device)} is unknown, so "
                        "MFU is not reported (set SMALLGPT_PEAK_FLOPS to give it)", True)
        self._write_run_files()
        self.metrics = MetricsLogger(
            self.run.path, enabled=self.dist.master and not self.eval_only,
            append=ckpt is not None,
            tensorboard=cfg.tensorboard, wandb=cfg.wandb, trackio=cfg.trackio,
            run_name=self.run.path.name, config=config_to_dict(cfg), on_log=on_log)
        self._plan_final_eval()

    def _init_state(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.best_val_loss = math.inf
        self.best_written = False
        self.last_eval: Record = {}
        self.eval_rate = 0.0  # evaluated tokens per second, all ranks together
        self.save_s = 0.0  # seconds the last checkpoint took
        self.final_eval_tokens = 0
        self.eval_reserve = 0.0

    def _open_run_folder(self, resume: bool, overwrite: bool) -> Optional[Checkpoint]:
        if resume:
            if self.dist.master and not self.eval_only and self.run.path.is_dir():
                self.run.lock()  # before reading: the checkpoint must not change under us
            ckpt = self.run.load_latest()
            if self.eval_only:
                return ckpt
            if ckpt.version < 2 or not ckpt.trainer:
                raise CheckpointError(
                    f"{self.run.latest} was written by an older smallgpt (format version "
                    f"{ckpt.version}); it can be sampled, exported or used with --init-from, "
                    "but not resumed")
            return ckpt
        if not self.eval_only:
            self.run.check_new_run(overwrite)  # changes nothing: see _setup
        return None

    def _setup_threads(self, ckpt: Optional[Checkpoint]) -> None:
        """CPU threads: the configured count, else the count the run started with (resume),
        else one per idle core."""
        if self.device.type == "cpu":
            n = self.cfg.threads or (int(ckpt.trainer.get("threads", 0)) if ckpt else 0)
            if n == 0 and not self.dist.enabled:
                n = auto_threads()
            if n > 0:
                torch.set_num_threads(n)
        self.threads = torch.get_num_threads()

    def _load_data(self) -> _Data:
        cfg, d = self.cfg, self.dist
        if cfg.data.path:
            folder = Path(cfg.data.path)
            if not folder.is_dir():
                raise TrainingError(f"data folder {folder} does not exist")
        else:
            cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
            try:
                if d.master:
                    prepare_shakespeare(cache, cfg.data.quickstart_vocab)
                d.barrier()
                folder = prepare_shakespeare(cache, cfg.data.quickstart_vocab)
            except OSError as e:
                raise TrainingError(f"cannot prepare the quickstart data in {cache}: "
                                    f"{e.strerror or e}") from None
        T = self.seq_len
        try:
            meta = load_meta(folder)
            train = ShardDataset(folder, "train", T, cfg.data.batch_size, cfg.data.sampling,
                                 cfg.seed, d.rank, d.world_size, cfg.data.micro_batch_size)
            val = ShardDataset(folder, "val", T, d.world_size, "sequential", cfg.seed, d.rank,
                               d.world_size)
            tok_file = folder / str(meta.get("tokenizer", "tokenizer.json"))
            tok_json = tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
            identity = data_identity(folder, meta)
        except (OSError, ValueError) as e:
            raise TrainingError(str(e).splitlines()[0] if str(e) else repr(e)) from None
        vocab = meta.get("vocab_size")
        vocab = int(vocab) if isinstance(vocab, int) else train.max_token() + 1
        val_bytes = meta["splits"].get("val", {}).get("bytes")
        return _Data(folder, train, val, vocab, tok_json, float(val_bytes) if val_bytes else None,
                     identity)

    def _check_resume(self, ckpt: Checkpoint) -> None:
        """What a resume may change: settings take effect (the optimizer's hyperparameters and
        the schedule follow the configuration), but the optimizer, the model's shape and the
        data are those of the run, or the resume is refused by name."""
        before = ckpt.train_config or {}
        old_optim = (before.get("optim") or {}).get("name")
        if old_optim and old_optim != self.cfg.optim.name and not self.eval_only:
            raise TrainingError(
                f"--resume: the run was trained with optim.name = {old_optim!r} and cannot "
                f"continue with {self.cfg.optim.name!r} (another optimizer's state); start a "
                f"new run from it with --init-from {self.run.path}")
        for name in sorted(self.model_overrides - {"dropout"}):
            want, have = getattr(self.cfg.model, name), getattr(ckpt.model_config, name)
            if want != have:
                raise TrainingError(
                    f"--resume: model.{name} = {want!r} differs from the run's {have!r}; a "
                    "resumed run keeps its model's shape (only model.dropout may change)")
        old_ident = ckpt.trainer.get("data_identity")
        if old_ident and not self.data_changed_ok and not self.eval_only:
            diff = identity_differences(old_ident, self.data.identity)
            if diff:
                raise TrainingError(
                    f"--resume: the data in {self.data.folder} is not what the run trained on "
                    f"({'; '.join(diff)}); if that is meant, resume with --data-changed-ok")

    def _build_model(self, ckpt: Optional[Checkpoint], pretrained: Optional[LoadedModel]) -> GPT:
        if ckpt is not None:
            model_cfg = GPTConfig(**{**ckpt.model_config.to_dict(),
                                     "dropout": self.cfg.model.dropout})
            ckpt.validate_weights(str(self.run.latest))
            state = None
        elif pretrained is not None:
            model_cfg, state = self._pretrained(pretrained)
        else:
            model_cfg, state = self._model_config(), None
        self._check_token_ids(model_cfg.vocab_size)
        model = GPT(model_cfg)
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.device)

    def _model_config(self) -> GPTConfig:
        m = self.cfg.model
        data_vocab = self.data.vocab_size
        if m.vocab_size == 0:
            mult = self.cfg.data.vocab_multiple
            vocab = (data_vocab + mult - 1) // mult * mult
        elif data_vocab > m.vocab_size:
            raise TrainingError(
                f"data in {self.data.folder} has vocabulary size {data_vocab}, larger than "
                f"the model's model.vocab_size {m.vocab_size}")
        else:
            vocab = m.vocab_size
        return GPTConfig(**{**m.to_dict(), "vocab_size": vocab})

    def _load_pretrained(self) -> LoadedModel:
        try:
            return load_model(self.cfg.init_from)
        except CheckpointError as e:
            raise CheckpointError(f"--init-from: {e}") from None

    def _pretrained(self, src: LoadedModel) -> Tuple[GPTConfig, Dict[str, torch.Tensor]]:
        """Shape and weights of ``init_from``; the command line may change dropout only."""
        pre = src.model.config
        ours = self.cfg.model
        for name in sorted(self.model_overrides - {"dropout"}):
            if getattr(ours, name) != getattr(pre, name):
                raise TrainingError(
                    f"model.{name} = {getattr(ours, name)!r} differs from the pretrained "
                    f"model's {getattr(pre, name)!r} ({src.source}); only model.dropout may "
                    "change when fine-tuning")
        self._check_vocab_match(src.tokenizer, pre.vocab_size, src.source)
        config = GPTConfig(**{**pre.to_dict(), "dropout": ours.dropout})
        self.cfg.model = GPTConfig(**config.to_dict())  # config.json says what was trained
        return config, src.model.state_dict()

    def _check_vocab_match(self, tok: Any, model_vocab: int, source: Path) -> None:
        data_vocab = self.data.vocab_size
        same = True
        if tok is not None and self.data.tokenizer_json is not None:
            from smallgpt.tokenizer import Tokenizer

            try:
                data_tok = Tokenizer.from_json_str(self.data.tokenizer_json)
                same = data_tok.to_json_str() == tok.to_json_str()
            except ValueError:
                same = True  # an unreadable data tokenizer is left to the size check
        if not same or data_vocab > model_vocab or model_vocab - data_vocab >= 128:
            raise TrainingError(
                f"the data in {self.data.folder} uses a {data_vocab}-token vocabulary but the "
                f"model in {source} has {model_vocab} tokens"
                + ("" if same else " and another tokenizer")
                + "; tokenize the data with the model's tokenizer (GPT-2: smallgpt-tokenize "
                "--gpt2 DIR)")

    def _check_token_ids(self, vocab: int) -> None:
        for ds in (self.data.train, self.data.val):
            top = ds.max_token()
            if top >= vocab:
                raise TrainingError(
                    f"the {ds.split} shards in {self.data.folder} hold token id {top}, but the "
                    f"model's vocabulary has {vocab} ids; were they made with another "
                    "tokenizer?")

    def _write_run_files(self) -> None:
        if not self.dist.master or self.eval_only:
            return
        write_json(self.run.config_json, config_to_dict(self.cfg))
        if self.data.tokenizer_json is not None:
            self.run.write_text(self.run.tokenizer, self.data.tokenizer_json)

    # ------------------------------------------------------------------ clock and budget

    @property
    def elapsed(self) -> float:
        """Seconds of this run so far, earlier sessions (before a resume) included."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def _plan_final_eval(self, train_tokens_per_s: float = 0.0) -> None:
        """Decide how many tokens the final evaluation reads and how long to reserve for it.

        ``max_time`` covers the final evaluation and checkpoint: their time is estimated from
        the measured evaluation speed (before the first evaluation, from the training speed:
        a forward pass is about a third of a training step) and kept free. When the whole
        validation split would take over half the budget, the final evaluation reads only
        what fits in a quarter of it (at least ``data.eval_tokens``), and says so. With
        ``data.eval_tokens = 0`` the evaluations during the run read the whole split, so the
        final one does too: ``ckpt_best.pt`` compares losses on the same tokens.
        """
        cfg = self.cfg
        full = self.data.val.eval_token_count(0)
        want = full if cfg.data.final_eval_full else self.data.val.eval_token_count(
            cfg.data.eval_tokens)
        rate = self.eval_rate or 2.5 * train_tokens_per_s
        self.final_eval_tokens = want
        if cfg.max_time <= 0 or rate <= 0:
            self.eval_reserve = 0.0
            return
        if want / rate > 0.5 * cfg.max_time:
            fit = int(rate * 0.25 * cfg.max_time)
            compared = cfg.data.eval_tokens > 0 or cfg.eval_interval > 0
            floor = self.data.val.eval_token_count(cfg.data.eval_tokens) if compared else 0
            self.final_eval_tokens = min(want, max(fit, floor, 1))
        self.eval_reserve = 1.2 * self.final_eval_tokens / rate + self.save_s + 0.2

    # ------------------------------------------------------------------ one step

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def forward_backward(self) -> torch.Tensor:
        """Accumulate the gradient of the next global batch into ``.grad``; returns its mean
        loss over all ranks. Under DDP/FSDP the gradients are averaged over the ranks on the
        last micro-step only."""
        batches = self.data.train.step_batches()
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with no_sync(self.train_module, self.dist, i == len(batches) - 1):
                with self._autocast():
                    _, loss = self.train_module(x, y)
                loss = loss / len(batches)
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.dist.all_reduce_sum(loss_sum)
        return loss_sum / self.dist.world_size

    def _clip(self) -> float:
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def train_step(self, time_progress: float = 0.0) -> Record:
        """One optimizer step over one global batch; returns ``loss``, ``lr``, ``grad_norm``.

        Raises:
            TrainingDiverged: the loss is NaN or infinite (nothing is updated).
        """
        factor = self.schedule.factor(self.step, time_progress)
        set_lr(self.optimizers, factor)
        loss = float(self.forward_backward())
        if not math.isfinite(loss):
            self._diverged(f"loss became {loss} at step {self.step + 1}")
        grad_norm = self._clip()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # (With fp16's GradScaler an overflow only skips the step.)
            self._diverged(f"the gradient norm became {grad_norm} at step {self.step + 1}")
        try:
            for opt in self.optimizers:
                self.scaler.step(opt)
        except RuntimeError as e:  # an update too large for float32 ("without overflow")
            if "overflow" not in str(e):
                raise
            self._diverged(f"the update overflowed at step {self.step + 1} (learning rate "
                           f"{factor * self.cfg.optim.lr:g})")
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return {"loss": loss, "lr": factor * self.cfg.optim.lr, "grad_norm": grad_norm}

    @torch.no_grad()
    def _probe_loss(self) -> float:
        """The loss of the current weights on the first validation window (each rank its
        own): what a checkpoint is checked with before it is written."""
        x, y, _ = next(self.data.val.iter_eval(self.seq_len * self.dist.world_size, 1,
                                                equal_batches=True))
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                logits = self.eval_module(x.to(self.device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                   ignore_index=-1)
        finally:
            self.model.train(was_training)
        return float(loss) if bool((y != -1).any()) else 0.0

    def _diverged(self, what: str) -> None:
        """Stop without touching the weights, naming the checkpoint to go back to (every
        checkpoint is written from finite weights: see :meth:`_save`)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        kept = f"; last good checkpoint: {self.run.latest}" if self.run.latest.exists() else ""
        raise TrainingDiverged(f"{what}; stopping{kept}")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, max_tokens: int = 0, sample_tokens: int = 0) -> Record:
        """Loss over the first ``max_tokens`` validation tokens (0: the whole split).

        Returns ``val_loss`` (nats/token), ``val_bpb`` (bits per UTF-8 byte, when the data
        folder records the split's bytes), ``val_tokens``, ``eval_s``, and the same three
        figures as ``sample_*`` for the first ``sample_tokens`` tokens (the windows of a
        smaller budget are a prefix of a larger one's, so one pass gives both). Under DDP or
        FSDP every rank evaluates its share and the sums are all-reduced.
        """
        t0 = time.perf_counter()
        ebs = self.cfg.data.eval_batch_size or self.data.train.micro_batch_size
        n_sample = len(self.data.val.eval_windows(sample_tokens or max_tokens))
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        module = self.eval_module
        was_training = self.model.training
        self.model.eval()
        bar = self._eval_bar(max_tokens, ebs)
        for x, y, index in self.data.val.iter_eval(max_tokens, ebs, equal_batches=True):
            if bar is not None:
                bar.update(1)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = module(x)
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                   reduction="none").view(y.shape).double().sum(1)
            count = (y != -1).sum(1).double()
            in_sample = (index.to(self.device) < n_sample) & (index.to(self.device) >= 0)
            totals += torch.stack([nats.sum(), count.sum(), (nats * in_sample).sum(),
                                   (count * in_sample).sum()])
        if bar is not None:
            bar.close()
        self.model.train(was_training)
        self.dist.all_reduce_sum(totals)
        nats_all, n_all, nats_s, n_s = (float(v) for v in totals)
        rec: Record = {**self._figures("val", nats_all, n_all),
                       **self._figures("sample_val", nats_s, n_s)}
        rec["eval_s"] = time.perf_counter() - t0
        if rec["eval_s"] > 0:
            self.eval_rate = n_all / rec["eval_s"]
        return rec

    def _eval_bar(self, max_tokens: int, batch_size: int) -> Any:
        """A progress bar over this rank's evaluation batches: eval-only runs, rank 0, on a
        terminal (training has its own bar)."""
        if not (self.eval_only and self.dist.master and self.cfg.progress
                and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        windows = len(self.data.val.eval_windows(max_tokens))
        total = math.ceil(math.ceil(windows / self.dist.world_size) / batch_size)
        return tqdm(total=total, unit="batch", desc="evaluating", dynamic_ncols=True,
                    leave=False)

    def _figures(self, prefix: str, nats: float, count: float) -> Record:
        rec: Record = {f"{prefix}_loss": nats / max(count, 1.0), f"{prefix}_tokens": int(count)}
        full = self.data.val.eval_token_count(0)
        if self.data.val_bytes:
            # Whole split: every token after each shard's first is predicted, so these are the
            # split's bytes; a prefix uses the split's bytes per token.
            rec[f"{prefix}_bpb"] = nats / LN2 / (self.data.val_bytes * count / max(full, 1))
        return rec

    # ------------------------------------------------------------------ the loop

    def fit(self) -> Record:
        """Train until ``max_steps``, ``max_time`` or Ctrl-C; evaluate and save as configured.

        Returns a summary: ``step``, ``val_loss``, ``val_bpb``, ``val_tokens``,
        ``best_val_loss``, ``elapsed_s``, ``out``, ``stopped`` (``"max_steps"``,
        ``"max_time"`` or ``"interrupt"``), ``signal`` (``"SIGINT"``/``"SIGTERM"`` when one
        stopped it, else None) and ``tokens_per_step``.
        """
        self._announce()
        self.model.train()
        self._window = (time.perf_counter(), 0, 0.0)  # start, tokens, eval seconds
        self._window_step = self.step
        self._first_step_end: Optional[Tuple[float, int]] = None
        saved_step = self.step if self.run.latest.exists() else -1
        bar = self._progress_bar()
        # The handlers stay through the final evaluation and checkpoint: a SIGTERM then must
        # not kill the process before its checkpoint is written.
        with _StopFlag() as flag:
            try:
                while True:
                    stopped = self._should_stop(flag.requested)
                    if stopped:
                        break
                    progress = self.schedule.time_progress(self._shared_clock,
                                                           self._shared_reserve)
                    stats = self.train_step(progress)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}")
                    saved_step = self._after_step(stats, saved_step, bar is None)
            except BaseException:
                if bar is not None:
                    bar.close()
                self.metrics.close()
                raise
            if bar is not None:
                bar.close()
            summary = self._finish(stopped, saved_step)
        summary["signal"] = flag.signal_name or None
        return summary

    def _should_stop(self, interrupt: bool) -> str:
        """The reason to stop before the next step ("" to go on), the same on every rank."""
        budget_hit = self.cfg.max_time > 0 and self.elapsed + self.eval_reserve >= \
            self.cfg.max_time
        stop, (clock, reserve, budget) = self.dist.agree(
            interrupt, [self.elapsed, self.eval_reserve, 1.0 if budget_hit else 0.0])
        self._shared_clock, self._shared_reserve = clock, reserve
        if stop:
            return "interrupt"
        if self.cfg.max_steps > 0 and self.step >= self.cfg.max_steps:
            return "max_steps"
        if budget > 0:
            return "max_time"
        return ""

    def _guess_eval_cost(self) -> None:
        """Until an evaluation has been timed, guess its cost from the training speed, every
        step (a run of a few slow steps must not use up its budget before the first log)."""
        if self.step == 1 or self._first_step_end is None:
            # Step 1 includes one-off warm-up costs: measure from its end.
            self._first_step_end = (time.perf_counter(), self.step)
            return
        t1, s1 = self._first_step_end
        dt = time.perf_counter() - t1
        if dt > 0 and self.step > s1:
            self._plan_final_eval((self.step - s1) * self.tokens_per_step / dt)

    def _after_step(self, stats: Record, saved_step: int, print_lines: bool) -> int:
        cfg, step = self.cfg, self.step
        if self.eval_rate == 0.0 and cfg.max_time > 0:
            self._guess_eval_cost()
        is_last = cfg.max_steps > 0 and step >= cfg.max_steps
        do_eval = cfg.eval_interval > 0 and step % cfg.eval_interval == 0 and not is_last
        rec: Record = {}
        if step % cfg.log_interval == 0 or do_eval or step == 1:
            rec = self._step_record(stats)
        if do_eval:
            ev = self.evaluate(cfg.data.eval_tokens)
            start, tokens, eval_s = self._window
            self._window = (start, tokens, eval_s + ev["eval_s"])
            self._plan_final_eval()
            rec.update(self._eval_fields(ev))
            self.last_eval = {k: rec[k] for k in ("val_loss", "val_bpb") if k in rec}
            if ev["sample_val_loss"] < self.best_val_loss:
                self.best_val_loss = ev["sample_val_loss"]
                self._save(best=True)
            self._print(f"step {step}: val_loss {ev['val_loss']:.4f}"
                        + (f", val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else "")
                        + f" ({self.elapsed:.1f}s)", print_lines)
        if rec:
            self.metrics.log(rec)
            if "val_loss" not in rec and cfg.progress:
                self._print(f"step {step}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, "
                            f"{rec['tokens_per_sec']:.0f} tok/s ({rec['elapsed_s']:.1f}s)",
                            print_lines)
        if cfg.save_interval > 0 and step % cfg.save_interval == 0 and not is_last:
            self._save()
            saved_step = step
        return saved_step

    def _step_record(self, stats: Record) -> Record:
        start, _, eval_s = self._window
        steps_in_window = max(self.step - self._window_step, 1)
        dt = time.perf_counter() - start - eval_s
        tps = steps_in_window * self.tokens_per_step / max(dt, 1e-9)
        self._window = (time.perf_counter(), 0, 0.0)
        self._window_step = self.step
        return {"step": self.step, "loss": stats["loss"], "lr": stats["lr"],
                "grad_norm": stats["grad_norm"], "tokens_per_sec": tps,
                "tokens": self.tokens_seen,
                "mfu": self.flops_per_token * tps / self.peak if self.peak > 0 else None,
                "elapsed_s": self.elapsed}

    @staticmethod
    def _eval_fields(ev: Record) -> Record:
        return {k: ev[k] for k in ("val_loss", "val_bpb", "val_tokens") if k in ev}

    def _finish(self, stopped: str, saved_step: int) -> Record:
        """The final evaluation (skipped on Ctrl-C, to save quickly) and checkpoint."""
        final: Record = {"step": self.step}
        if stopped != "interrupt" and self.step > 0:
            ev = self.evaluate(self.final_eval_tokens, self.cfg.data.eval_tokens)
            final.update(self._eval_fields(ev))
            self.last_eval = {k: final[k] for k in ("val_loss", "val_bpb") if k in final}
            if ev["sample_val_loss"] < self.best_val_loss or not self.best_written:
                self.best_val_loss = min(self.best_val_loss, ev["sample_val_loss"])
                self._save(best=True)
            full = self.data.val.eval_token_count(0)
            part = "" if ev["val_tokens"] >= full else \
                f" on {ev['val_tokens']:,} of {full:,} val tokens (time budget)"
            self._print(f"step {self.step}: val_loss {ev['val_loss']:.4f}"
                        + (f", val_bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else "")
                        + f"{part} ({self.elapsed:.1f}s, stopped by {stopped})", True)
        if self.step != saved_step:
            self._save()
        final["elapsed_s"] = self.elapsed
        if len(final) > 2:
            self.metrics.log({**final, "final": True})
        self.metrics.close(plot=self.cfg.plot and self.step > 0)
        return {"step": self.step, "val_loss": self.last_eval.get("val_loss"),
                "val_bpb": self.last_eval.get("val_bpb"), "val_tokens": final.get("val_tokens"),
                "best_val_loss": self.best_val_loss, "elapsed_s": self.elapsed,
                "out": str(self.run.path), "stopped": stopped,
                "tokens_per_step": self.tokens_per_step}

    # ------------------------------------------------------------------ output

    def _print(self, line: str, enabled: bool) -> None:
        if enabled and self.dist.master:
            print(line, flush=True)

    def _announce(self) -> None:
        accum = self.data.train.accum_steps
        micro = self.data.train.micro_batch_size
        c = self.model_config
        self._print(
            f"smallgpt-train: {self.model.num_params():,} parameters (non-embedding), "
            f"{c.n_layer} layers x {c.n_embd}, vocab {c.vocab_size}; global batch "
            f"{self.cfg.data.batch_size} x {self.seq_len} = {self.tokens_per_step:,} tokens/step "
            f"({micro} per micro-step x {self.dist.world_size} process(es) x {accum} "
            f"accumulation step(s)); device "
            f"{self.device}, {str(self.dtype).replace('torch.', '')}"
            + (f" (head and loss {str(self.model.head_dtype).replace('torch.', '')})"
               if self.model.head_dtype is not None else "")
            + f", {self.threads} CPU "
            f"thread(s), parallel {self.dist.mode}; data {self.data.folder}; out "
            f"{self.run.path}", True)

    def _progress_bar(self) -> Any:
        if not (self.dist.master and self.cfg.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        total = self.cfg.max_steps if self.cfg.max_steps > 0 else None
        return tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: model and optimizer (full, unsharded),
        scaler, counters, clock, data cursor, the RNG states of every rank, the thread count.

        A collective under DDP/FSDP: every rank must call it; rank 0 gets the tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.model, self.optimizers,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "best_val_loss": self.best_val_loss,
            "eval_rate": self.eval_rate,
            "threads": self.threads,
            "world_size": self.dist.world_size,
            "data": self.data.train.state_dict(),
            "data_identity": self.data.identity,
            "rng": self.dist.gather_object(_rng_state(self.device)),
        }

    def load_state_dict(self, state: Dict[str, Any], metrics: Optional[Record] = None) -> None:
        """Restore :meth:`state_dict`'s output (all ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # The optimizer state brings back its hyperparameters (base_lr, weight decay, betas,
        # momentum) too; the configuration of this run is what runs, so they are put back.
        settings = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                    for opt in self.optimizers]
        try:
            set_state_dict(self.model, self.optimizers, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"the checkpoint does not match this model and optimizer: "
                                f"{first}") from None
        for opt, groups in zip(self.optimizers, settings):
            for g, fresh in zip(opt.param_groups, groups):
                g.update(fresh)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.best_written = math.isfinite(self.best_val_loss)
        self.eval_rate = float(state.get("eval_rate", 0.0))
        self.last_eval = dict(metrics or {})
        if state.get("data", {}).get("batch_size") == self.cfg.data.batch_size:
            self.data.train.load_state_dict(state["data"])
        else:
            self._print("note: the global batch changed; the data order restarts", True)
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            _set_rng_state(rngs[self.dist.rank], self.device)
        else:
            self._print(f"note: the checkpoint was written by {len(rngs)} process(es), this "
                        f"run has {self.dist.world_size}; RNG streams restart", True)

    def _save(self, best: bool = False) -> None:
        """Write ``ckpt_best.pt`` or the regular checkpoints (collective; rank 0 writes)."""
        t0 = time.perf_counter()
        state = self.state_dict()
        # An update can blow the weights up while the loss that led to it was still finite:
        # such weights are never written (rank 0 holds the full state; every rank stops
        # together). Finite but huge weights give NaN logits, hence the probe.
        bad = nonfinite_tensors(state["model"]) if self.dist.master else []
        probe = self._probe_loss()
        if self.dist.agree(bool(bad) or not math.isfinite(probe), [])[0]:
            what = f"weights ({bad[0]})" if bad else "loss of the updated weights"
            self._diverged(f"the {what} became non-finite at step {self.step}")
        if not self.dist.master:
            return
        ckpt = Checkpoint(
            model_config=self.model_config, model=state.pop("model"),
            tokenizer=self.data.tokenizer_json, train_config=config_to_dict(self.cfg),
            step=self.step, trainer=state, metrics=dict(self.last_eval))
        if best:
            self.run.save_best(ckpt)
            self.best_written = True
        else:
            self.run.save(ckpt, self.cfg.keep_last)
        self.save_s = time.perf_counter() - t0

    def close(self) -> None:
        """Release the run folder's lock and the process group (if this trainer made it)."""
        self.run.unlock()
        self.dist.close()


# ---------------------------------------------------------------- helpers


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name!r} ({props.total_memory / 2**30:.1f} GiB)"
    return str(device)


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


class _StopFlag:
    """Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and ``kill`` send before killing a
    job) ask the loop to stop after the current step and save a checkpoint; a second one
    aborts at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self._old[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else self.signal_name
        print(f"\nsmallgpt-train: {self.signal_name} received, saving a checkpoint ({again} "
              "again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          on_log: Optional[Callable[[Record], None]] = None,
          model_overrides: Iterable[str] = (), data_changed_ok: bool = False) -> Record:
    """Build a :class:`Trainer`, run :meth:`Trainer.fit` and release the process group.

    Returns the summary of :meth:`Trainer.fit`. Raises what :class:`Trainer` raises, and
    :class:`TrainingDiverged` when the loss becomes NaN/inf (the last good checkpoint is kept).
    """
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, on_log=on_log,
                      model_overrides=model_overrides, data_changed_ok=data_changed_ok)
    try:
        summary = trainer.fit()
        # Every rank is done with its collectives before any rank tears the group down:
        # gloo aborts a peer (std::terminate) whose connection closes under it.
        trainer.dist.barrier()
        return summary
    finally:
        trainer.close()


def evaluate_only(cfg: TrainConfig, resume: bool = False,
                  model_overrides: Iterable[str] = ()) -> Optional[Record]:
    """Evaluate the ``init_from`` (or, with ``resume``, the run's latest) model on the whole
    validation split of ``cfg.data``; writes nothing.

    Returns ``{"val_loss", "val_bpb", "val_tokens", "step", "model"}`` on rank 0 (None on
    other ranks).
    """
    if not resume and not cfg.init_from:
        raise TrainingError("evaluation needs a model: init_from or resume")
    trainer = Trainer(cfg, resume=resume, eval_only=True, model_overrides=model_overrides)
    try:
        ev = trainer.evaluate(0)
        trainer.dist.barrier()  # as in train(): no rank leaves while another still reduces
    finally:
        trainer.close()
    if not trainer.dist.master:
        return None
    out = {k: ev[k] for k in ("val_loss", "val_bpb", "val_tokens") if k in ev}
    return {**out, "step": trainer.step,
            "model": str(cfg.out if resume else cfg.init_from)}

