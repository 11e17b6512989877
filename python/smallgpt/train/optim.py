"""Optimizers and their parameter groups.

AdamW with weight decay on matrices only (linear weights and embeddings; not on biases and
norm weights), the fused kernel on CUDA. Every group carries ``base_lr``: the schedule sets
``lr = base_lr * factor`` each step, so groups with different rates follow one schedule.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from smallgpt.config import OptimSection

__all__ = ["build_optimizers", "configure_optimizer", "set_lr"]


def configure_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple, eps: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: linear weights, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay,
         "base_lr": lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": lr},
    ]
    kwargs: Dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def build_optimizers(model: torch.nn.Module, o: OptimSection,
                     device: torch.device) -> List[torch.optim.Optimizer]:
    """The optimizers of a run (a list, so that optimizers for different kinds of parameter
    can sit side by side; each is stepped, clipped and checkpointed alike)."""
    return [configure_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, device)]


def set_lr(optimizers: List[torch.optim.Optimizer], factor: float) -> None:
    """Set every group's rate to ``base_lr * factor``."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
