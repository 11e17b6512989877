"""Optimizers and their parameter groups.

``optim.name = "adamw"``: AdamW for everything, weight decay on matrices only (linear weights
and embeddings; not on biases and norm gains), torch's fused kernel on CUDA and CPU.

``optim.name = "muon"``: Muon (momentum, then Newton–Schulz orthogonalisation of the update)
for the 2-D weight matrices inside the transformer blocks, AdamW for the rest (embeddings,
head, norms, biases), as in modded-nanogpt and nanochat. On GPUs ``torch.optim.Muon`` is used
where the installed torch has it (2.9 and later); otherwise, and on CPUs, :class:`Muon` below:
the same update (tested equal to torch's), with the Newton–Schulz iteration in fp32 on CPUs.

Every group carries ``base_lr``: the schedule sets ``lr = base_lr * factor`` each step, so
groups with different rates follow one schedule.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Tuple

import torch

from smallgpt.config import OptimSection

__all__ = ["Muon", "build_optimizers", "configure_optimizer", "newton_schulz", "set_lr",
           "split_params"]

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)


def configure_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple, eps: float,
    device: torch.device, embed_lr: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: linear weights, embeddings) only; the
    input embeddings (when not tied to the head) at ``embed_lr`` if set."""
    return _adamw(model, list(model.parameters()), lr, weight_decay, betas, eps, device,
                  embed_lr)


def _input_embeddings(model: torch.nn.Module) -> set:
    """Parameters that are only looked up (token embedding when untied, position table,
    value embeddings)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    found = set()
    for name, p in model.named_parameters():
        lookup = name.endswith(("wte.weight", "wpe.weight")) or ".ve." in f".{name}"
        if lookup and p is not head:
            found.add(id(p))
    return found


def _adamw(model: torch.nn.Module, params: List[torch.nn.Parameter], lr: float,
           weight_decay: float, betas: tuple, eps: float, device: torch.device,
           embed_lr: float = 0.0) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    emb = _input_embeddings(model)
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in emb],
         "weight_decay": weight_decay, "base_lr": lr},
        {"params": [p for p in params if id(p) in emb], "weight_decay": weight_decay,
         "base_lr": embed_lr or lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": lr},
    ]
    kwargs: Dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    for g in groups:
        g["lr"] = g["base_lr"]
    if device.type in ("cuda", "cpu"):
        # One kernel per step instead of a dozen passes over the parameters: on a CPU the
        # AdamW step over GPT-2's 50k x C embedding costs a third of the foreach one.
        kwargs["fused"] = True
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)


def split_params(model: torch.nn.Module) -> Tuple[List[torch.nn.Parameter],
                                                  List[torch.nn.Parameter]]:
    """``(hidden matrices, the rest)``: the 2-D weights inside the transformer blocks go to
    Muon; embeddings, the head (tied or not), norm gains and biases to AdamW."""
    hidden, rest = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        inside_block = ".h." in f".{name}" or name.startswith("h.")
        (hidden if inside_block and p.dim() == 2 else rest).append(p)
    return hidden, rest


def build_optimizers(model: torch.nn.Module, o: OptimSection,
                     device: torch.device) -> List[torch.optim.Optimizer]:
    """The optimizers of a run: ``[AdamW]``, or ``[Muon, AdamW]`` with ``o.name == "muon"``.

    A list, so that optimizers for different kinds of parameter sit side by side; each is
    stepped, clipped and checkpointed alike."""
    betas = (o.beta1, o.beta2)
    if o.name == "adamw":
        return [configure_optimizer(model, o.lr, o.weight_decay, betas, o.eps, device,
                                    o.embed_lr)]
    hidden, rest = split_params(model)
    groups = [{"params": hidden, "base_lr": o.muon_lr}]
    kw = dict(lr=o.muon_lr, weight_decay=o.muon_weight_decay, momentum=o.muon_momentum,
              nesterov=True)
    muon: torch.optim.Optimizer
    if device.type == "cuda" and hasattr(torch.optim, "Muon"):
        muon = torch.optim.Muon(groups, **kw)
    else:
        # On CPUs the iteration runs in fp32: CPUs without native bf16 (AVX2) emulate it at a
        # large cost, and on those with it fp32 was as fast for these sizes (RESULTS.md).
        cpu = device.type == "cpu"
        muon = Muon(groups, ns_dtype=torch.float32 if cpu else torch.bfloat16, **kw)
    return [muon, _adamw(model, rest, o.lr, o.weight_decay, betas, o.eps, device, o.embed_lr)]


def set_lr(optimizers: List[torch.optim.Optimizer], factor: float) -> None:
    """Set every group's rate to ``base_lr * factor``."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: Tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise ``g`` (``U S V^T -> U S' V^T`` with ``S'`` near 1) by a
    quintic Newton–Schulz iteration, in bf16 as Keller Jordan's Muon and torch's do, or in
    ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype, copy=True)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D parameters (torch < 2.9).

    The same update as ``torch.optim.Muon``: ``buf = lerp(buf, g, 1 - momentum)``; the
    Nesterov update ``lerp(g, buf, momentum)`` is orthogonalised by :func:`newton_schulz`,
    scaled by ``sqrt(max(1, rows / cols))``, and applied after decoupled weight decay.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 eps: float = 1e-7, ns_dtype: torch.dtype = torch.bfloat16) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps)
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            m = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - m)
                update = p.grad.lerp(buf, m) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"], group["eps"],
                                       dtype=self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss
