"""The learning-rate schedule: linear warmup, then a cosine that may follow the clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["lr_at", "Schedule"]


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

    def time_progress(self, elapsed: float, reserve: float) -> float:
        """Fraction of the training time used, the final evaluation's reserve left out."""
        if self.max_time <= 0:
            return 0.0
        return elapsed / max(self.max_time - reserve, 1e-9)

    def __call__(self, step: int, time_progress: float = 0.0) -> float:
        """The learning rate at ``step``."""
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.decay_steps,
                     time_progress)

    def factor(self, step: int, time_progress: float = 0.0) -> float:
        """The learning rate at ``step`` as a fraction of the peak ``lr``."""
        return self(step, time_progress) / self.lr
