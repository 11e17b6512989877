"""The output head and its loss, in row chunks: cross-entropy without the ``(N, V)`` logits.

With GPT-2's 50,257-token vocabulary and a small model, the head is most of a training step's
FLOPs and memory: the plain path (``lm_head`` then ``F.cross_entropy``) keeps a ``(N, V)``
logits tensor, its fp32 copy and its gradient alive at once. :func:`chunked_cross_entropy`
computes the same loss and gradients a chunk of rows at a time, as Liger-Kernel's fused
linear cross-entropy does: the forward pass of each chunk also forms that chunk's gradient
(``softmax - one_hot``) and folds it into ``grad_h`` and ``grad_W`` at once, so at most
``chunk x V`` logits exist at any time, and the head's matmuls are as many as in the plain
path (one forward, two for the gradients). The backward pass only scales the stored
gradients by the incoming gradient of the loss.

Softmax and loss are computed in fp32 (as the plain path's ``logits.float()``); the matmuls
run in ``compute_dtype`` (the autocast dtype under autocast, else the inputs' dtype).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["chunked_cross_entropy"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``softcap(h @ weight.T)`` against ``targets`` (-1: ignored)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, softcap: float, compute_dtype: torch.dtype) -> torch.Tensor:
        need_grad = h.requires_grad or weight.requires_grad
        w = weight.to(compute_dtype)
        n = h.shape[0]
        count = (targets != -1).sum()
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad \
            else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad \
            else None
        for start in range(0, n, chunk):
            hc = h[start : start + chunk].to(compute_dtype)
            tc = targets[start : start + chunk]
            keep = tc != -1
            safe = tc.clamp(min=0)
            logits = (hc @ w.T).float()
            capped: Optional[torch.Tensor] = None
            if softcap > 0:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            loss_sum = loss_sum + ((lse - picked) * keep).sum()
            if grad_h is None or grad_w is None:
                continue
            # d loss_sum / d logits = softmax - one_hot(target), on kept rows; the logits
            # buffer becomes the gradient in place.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
            g.mul_(keep[:, None])
            if capped is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                g.mul_(1.0 - capped * capped)
            g = g.to(compute_dtype)
            grad_h[start : start + chunk] = (g @ w).float()
            grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * scale).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int, softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the logits ``softcap(h @ weight.T)`` against ``targets``.

    Equals ``F.cross_entropy(softcap(h @ weight.T).float(), targets, ignore_index=-1)`` (to
    fp32 rounding) in value and in the gradients of ``h`` and ``weight``, without ever holding
    more than ``chunk`` rows of logits.

    Args:
        h: hidden states ``(..., C)``.
        weight: the head ``(V, C)``.
        targets: token ids with ``h``'s leading shape; ``-1`` marks positions left out.
        chunk: rows per chunk (positive).
        softcap: if positive, logits are ``softcap * tanh(logits / softcap)``.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h2.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match h {tuple(h.shape)}")
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        compute = torch.get_autocast_dtype(dev)
    else:
        compute = torch.promote_types(h.dtype, weight.dtype)
    # Autocast must not re-cast inside: the function picks its matmul dtype itself.
    with torch.autocast(dev, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h2, weight, t, chunk, float(softcap), compute)
