"""The learning-rate schedule: linear warmup, then a cosine or a warmup-stable-decay (WSD)
shape, whose progress may follow the clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

from smallgpt.config import SCHEDULES

__all__ = ["SCHEDULES", "lr_at", "Schedule"]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
          time_progress: float = 0.0, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then, along
    a progress ``p`` from 0 to 1 reached at ``decay_steps``:

    * ``"cosine"``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``;
    * ``"wsd"`` (warmup-stable-decay): ``lr`` until ``p = 1 - decay_fraction``, then a linear
      decay to ``min_lr`` at ``p = 1``.

    Constant ``min_lr`` after. ``p`` is ``max(step-based progress, time_progress)`` so
    time-limited runs decay fully by their deadline.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = 0.0
    if decay_steps > warmup_steps:
        p = (step - warmup_steps) / (decay_steps - warmup_steps)
    elif decay_steps > 0:
        p = 1.0
    p = min(max(p, time_progress, 0.0), 1.0)
    if schedule == "wsd":
        stable = 1.0 - decay_fraction
        if p <= stable:
            return lr
        return lr + (min_lr - lr) * (p - stable) / decay_fraction
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


@dataclass
class Schedule:
    """:func:`lr_at` with a run's settings; :meth:`factor` scales every group's own LR.

    Optimizers with several groups (AdamW for embeddings, Muon for matrices) keep their own
    base rates; the schedule multiplies each by ``lr_at(...) / lr``.
    """

    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    max_time: float = 0.0
    schedule: str = "cosine"
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")

    def time_progress(self, elapsed: float, reserve: float) -> float:
        """Fraction of the training time used, the final evaluation's reserve left out."""
        if self.max_time <= 0:
            return 0.0
        return elapsed / max(self.max_time - reserve, 1e-9)

    def __call__(self, step: int, time_progress: float = 0.0) -> float:
        """The learning rate at ``step``."""
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.decay_steps,
                     time_progress, self.schedule, self.decay_fraction)

    def factor(self, step: int, time_progress: float = 0.0) -> float:
        """The learning rate at ``step`` as a fraction of the peak ``lr``."""
        return self(step, time_progress) / self.lr
