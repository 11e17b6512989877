"""Training: the :class:`Trainer` and the components it is made of.

=====================  ====================================================================
module                 job
=====================  ====================================================================
``trainer``            :class:`Trainer`: setup, ``train_step``, ``evaluate``, ``fit``, state
``schedule``           the learning-rate schedule (warmup, cosine, clock-following)
``optim``              optimizers and their parameter groups
``distributed``        process groups, collectives, DDP / FSDP2 wrapping
``hardware``           device, dtype, CPU threads, peak FLOP/s
``metrics``            console, metrics.jsonl, TensorBoard, W&B, trackio, loss plot
=====================  ====================================================================

The checkpoint format lives in :mod:`smallgpt.checkpoint` (the sampler reads it too) and the
data loader in :mod:`smallgpt.data`.
"""

from smallgpt.checkpoint import Checkpoint, CheckpointError, RunFolder
from smallgpt.train.hardware import (
    HardwareError,
    auto_threads,
    cpu_supports_fast_bf16,
    peak_flops,
    resolve_device,
    resolve_dtype,
)
from smallgpt.train.optim import build_optimizers, configure_optimizer
from smallgpt.train.schedule import Schedule, lr_at
from smallgpt.train.trainer import (
    Trainer,
    TrainingDiverged,
    TrainingError,
    evaluate_only,
    train,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "HardwareError",
    "RunFolder",
    "Schedule",
    "Trainer",
    "TrainingDiverged",
    "TrainingError",
    "auto_threads",
    "build_optimizers",
    "configure_optimizer",
    "cpu_supports_fast_bf16",
    "evaluate_only",
    "load_checkpoint",
    "lr_at",
    "peak_flops",
    "resolve_device",
    "resolve_dtype",
    "train",
]


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint file (``weights_only=True``); see :class:`Checkpoint`."""
    return Checkpoint.load(path)
