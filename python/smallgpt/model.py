"""A small, readable decoder-only GPT.

The architecture is GPT-2's: token embeddings plus learned absolute positions (or rotary
embeddings), ``n_layer`` pre-LayerNorm blocks of causal self-attention and a 4x feed-forward
network, a final LayerNorm and an output head tied to the token embedding.

Parameter names follow the usual ``transformer.wte / transformer.h[i].attn.c_attn / lm_head``
layout so that GPT-2 checkpoints from Hugging Face map onto this module one to one
(:meth:`GPT.from_huggingface`, :meth:`GPT.save_huggingface`).

Everything needed for fast decoding lives here too: :class:`KVCache` is a preallocated
per-layer key/value store that :meth:`GPT.forward` fills when one is passed in. The sampling
loops themselves are in :mod:`smallgpt.generate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from smallgpt.loss import chunked_cross_entropy

__all__ = ["GPT", "GPTConfig", "KVCache"]

_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "relu2")
_POSITIONS = ("learned", "rope")
_NORMS = ("layernorm", "rmsnorm")
_SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
# Fields a GPT-2 config expresses, that are checked by name, or that only affect training
# (initialisation): everything else must be at its default for an export.
_GPT2_EXPRESSED = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
                   "layer_norm_eps", "tie_embeddings", "position", "bias", "activation",
                   "rope_theta", "zero_init_proj", "loss_chunk"}

# Hugging Face `activation_function` names and the exact function each one computes.
_HF_TO_ACT = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}


@dataclass
class GPTConfig:
    """Shape and options of a :class:`GPT`.

    Attributes:
        vocab_size: Number of token ids (the embedding has this many rows).
        block_size: Longest sequence the model accepts (context length).
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide ``n_embd``.
        n_embd: Width of the residual stream.
        dropout: Dropout probability on embeddings, attention weights and residual branches.
        bias: Whether Linear and LayerNorm layers have a bias (GPT-2: True).
        activation: Feed-forward non-linearity: ``"relu"``, ``"gelu"`` (exact),
            ``"gelu_tanh"`` (GPT-2's tanh approximation) or ``"relu2"`` (ReLU squared,
            modded-nanogpt).
        tie_embeddings: Share the output head's weight with the token embedding.
        position: ``"learned"`` absolute position embeddings or ``"rope"`` rotary embeddings.
        rope_theta: Base of the rotary frequencies (``position="rope"`` only).
        layer_norm_eps: Epsilon of every normalisation layer (GPT-2: 1e-5).
        norm: ``"layernorm"`` (GPT-2) or ``"rmsnorm"`` (no mean subtraction, no bias).
        norm_weight: Whether the norms have a learned gain; ``False`` makes them
            parameter-free (nanochat).
        qk_norm: RMS-normalise queries and keys per head (parameter-free) before attention.
        logit_softcap: If positive, logits become ``cap * tanh(logits / cap)``.
        zero_init_proj: Initialise the attention and MLP output projections to zero, so every
            block starts as the identity.
        value_embeds: Give the first ``value_embeds`` blocks a value embedding each
            (modded-nanogpt): a token-embedding table of its own whose row for the current
            token is mixed into the attention values, ``v = l0 * v + l1 * ve[token]``, with
            ``(l0, l1)`` learned per block (starting at 0.5, 0.5). 0 = off.
        loss_chunk: When positive, the training loss (``forward`` with targets) runs the head
            and cross-entropy ``loss_chunk`` rows at a time (:mod:`smallgpt.loss`): the same
            loss and gradients without the full ``(B*T, vocab_size)`` logits; ``forward``
            then returns ``(None, loss)``. Memory and speed only; 0 = the plain path.

    Every option added after GPT-2 is off by default, so the defaults describe GPT-2 and
    such models export to Hugging Face.
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    position: str = "learned"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    norm: str = "layernorm"
    norm_weight: bool = True
    qk_norm: bool = False
    logit_softcap: float = 0.0
    zero_init_proj: bool = False
    value_embeds: int = 0
    loss_chunk: int = 0

    def __post_init__(self) -> None:
        try:
            self.validate()
        except ValueError as e:
            raise ValueError(f"GPTConfig.{e}") from None

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one (``field: why``).

        ``vocab_size = 0`` is allowed here and means "not known yet" (the trainer takes it
        from the data); :class:`GPT` refuses such a config.
        """
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            low = 0 if name == "vocab_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a non-negative" if low == 0 else "a positive"
                raise ValueError(f"{name} must be {what} integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.position not in _POSITIONS:
            raise ValueError(f"position must be one of {_POSITIONS}, got {self.position!r}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("position: rotary positions need an even head size "
                             "(n_embd // n_head)")
        if not float(self.rope_theta) > 0.0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not float(self.layer_norm_eps) > 0.0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if not float(self.logit_softcap) >= 0.0:
            raise ValueError(f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap!r}")
        for name, high in (("value_embeds", self.n_layer), ("loss_chunk", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (
                    high is not None and value > high):
                limit = f"0 to n_layer ({high})" if high is not None else ">= 0"
                raise ValueError(f"{name} must be an integer {limit} (0 = off), got {value!r}")

    def gpt2_incompatibilities(self) -> list[str]:
        """What a Hugging Face GPT-2 model cannot represent, one ``name = value`` phrase per
        option (empty: exportable). Besides the options checked by name, any other field set
        away from its default is named too, so a new option is never dropped silently."""
        bad = []
        if self.position != "learned":
            bad.append(f"position = {self.position!r} (GPT-2 learns absolute positions)")
        if not self.bias:
            bad.append("bias = False (GPT-2's linear and LayerNorm layers have biases)")
        if self.activation not in _ACT_TO_HF:
            bad.append(f"activation = {self.activation!r}")
        for f in dataclasses.fields(self):
            if f.name in _GPT2_EXPRESSED:
                continue
            value = getattr(self, f.name)
            if value != f.default:
                bad.append(f"{f.name} = {value!r} (GPT-2 has no such option)")
        return bad

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build a config from a dict (as saved in checkpoints).

        Unknown keys and missing shape keys (``vocab_size``, ``block_size``, ``n_layer``,
        ``n_head``, ``n_embd``) raise ``ValueError``; missing option keys take their defaults,
        which are what older files meant.
        """
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig key(s) {unknown}; valid keys: {sorted(valid)}"
            )
        missing = [k for k in _SHAPE_KEYS if k not in d]
        if missing:
            raise ValueError(f"GPTConfig is missing {', '.join(missing)}")
        return cls(**d)


@dataclass
class BlockParams:
    """The tensors one block reads, gathered from its modules (see :func:`block_forward`)."""

    ln1_w: torch.Tensor | None
    ln1_b: torch.Tensor | None
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2_w: torch.Tensor | None
    ln2_b: torch.Tensor | None
    fc_w: torch.Tensor
    fc_b: torch.Tensor | None
    p_w: torch.Tensor
    p_b: torch.Tensor | None
    ve_lambda: torch.Tensor | None = None


@dataclass
class DecodePlan:
    """The parameters :meth:`GPT.decode_step` reads, gathered once per generation."""

    wte: torch.Tensor
    wpe: torch.Tensor | None
    layers: list[BlockParams]
    lnf_w: torch.Tensor | None
    lnf_b: torch.Tensor | None
    head: torch.Tensor
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None
    value_embeds: list[torch.Tensor] = dataclasses.field(default_factory=list)


class KVCache:
    """Preallocated keys and values for every layer, for incremental decoding.

    ``k`` and ``v`` have shape ``(n_layer, batch, n_head, max_len, head_dim)``. ``pos`` is the
    number of positions already written; :meth:`GPT.forward` with ``cache=`` appends the new
    positions and advances it. ``max_len`` is at most the model's ``block_size``; callers that
    want to generate past it must rebuild the cache from a cropped window
    (:mod:`smallgpt.generate` does this).
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: Union[torch.device, str, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise ValueError(f"cache length must be in [1, {config.block_size}], got {max_len}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        """Number of positions the cache can hold."""
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        """Number of sequences in the cache."""
        return self.k.shape[1]

    def reset(self) -> None:
        """Forget every cached position (the storage is kept)."""
        self.pos = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate sequences: row ``i`` becomes old row ``index[i]`` (beam search).

        Only the ``pos`` filled positions are copied.
        """
        if index.numel() != self.batch_size:
            raise ValueError(f"reorder needs {self.batch_size} indices, got {index.numel()}")
        p = self.pos
        self.k[:, :, :, :p] = self.k[:, index, :, :p]
        self.v[:, :, :, :p] = self.v[:, index, :, :p]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache of sequences ``start .. stop - 1`` that shares this one's storage.

        Writes through the view land in this cache; the view has its own ``pos`` (0). A
        server keeps one cache of many slots and prefills or decodes a few rows at a time.
        """
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop} out of a cache of {self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.pos = 0
        return view


def _rope_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, 2, H, D), queries and keys together (one rotation instead of two: decoding one
    # token at a time is dominated by per-op overhead); cos/sin: (T, 1, 1, D/2). The two
    # halves of each head are rotated as pairs.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _norm(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
          cfg: GPTConfig) -> torch.Tensor:
    # torch.* rather than F.*: the F wrappers add a Python-level check per call, which shows
    # when decoding one token at a time.
    if cfg.norm == "rmsnorm":
        return torch.rms_norm(x, (x.shape[-1],), w, cfg.layer_norm_eps)
    return torch.layer_norm(x, (x.shape[-1],), w, b, cfg.layer_norm_eps)


def _activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if kind == "relu":
        return F.relu(h)
    if kind == "relu2":
        return F.relu(h).square()
    return F.gelu(h)


def _qk(qk: torch.Tensor, cfg: GPTConfig,
        rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Queries and keys together (``(..., 2, H, D)``) after QK-norm and rotary positions."""
    if cfg.qk_norm:
        qk = torch.rms_norm(qk, (qk.shape[-1],), None, cfg.layer_norm_eps)
    return qk if rope is None else _apply_rope(qk, *rope)


def _attend(qkv: torch.Tensor, cfg: GPTConfig, rope: tuple[torch.Tensor, torch.Tensor] | None,
            cache: KVCache | None, layer: int, dropout_p: float) -> torch.Tensor:
    """Causal attention for ``qkv`` of shape ``(B, T, 3, H, D)``; returns ``(B, T, C)``.

    Through the cache when one is given: the new positions are written first."""
    B, T = qkv.shape[:2]
    qk = _qk(qkv[:, :, :2], cfg, rope)
    q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    mask: torch.Tensor | None = None
    is_causal = T > 1
    if cache is not None:
        start = cache.pos
        cache.k[layer, :, :, start : start + T] = k
        cache.v[layer, :, :, start : start + T] = v
        k = cache.k[layer, :, :, : start + T]
        v = cache.v[layer, :, :, : start + T]
        if start > 0:
            # SDPA's is_causal aligns the mask to the top-left corner, which is wrong once
            # queries start after cached keys: an explicit offset mask.
            is_causal = False
            q_pos = torch.arange(start, start + T, device=q.device)[:, None]
            mask = torch.arange(start + T, device=q.device)[None, :] <= q_pos
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                       is_causal=is_causal)
    return y.transpose(1, 2).reshape(B, T, -1)


@dataclass
class RowPositions:
    """Where each sequence of a decoding batch stands, when they stand at different places.

    Row ``i`` writes its new key and value at position ``pos[i]`` and attends to its first
    ``pos[i] + 1`` positions (``mask``: ``(B, 1, 1, span)``, ``span = max(pos) + 1``). Made by
    :meth:`GPT.decode_step` from ``positions=``.
    """

    pos: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def build(cls, positions: Sequence[int], device: torch.device) -> RowPositions:
        """From one position per row (plain ints, so no device sync is needed for ``span``)."""
        pos = torch.tensor(list(positions), dtype=torch.long, device=device)
        span = max(positions) + 1
        mask = torch.arange(span, device=device)[None, :] <= pos[:, None]
        return cls(pos, torch.arange(len(pos), device=device), mask[:, None, None, :])


def _attend_one(qkv: torch.Tensor, cfg: GPTConfig,
                rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache,
                layer: int, rows: RowPositions | None = None) -> torch.Tensor:
    """:func:`_attend` for one new position per sequence (``qkv``: ``(B, 3, H, D)``): the same
    operations with fewer of them, since decoding a token at a time pays per op. The one
    query may see every cached key, so no mask is needed, unless the rows stand at different
    positions (``rows``): then each writes at its own position and a mask hides the positions
    past it."""
    B = qkv.shape[0]
    qk = _qk(qkv[:, :2], cfg, rope)
    if rows is not None:
        span = rows.mask.shape[-1]
        k_layer, v_layer = cache.k[layer], cache.v[layer]
        k_layer[rows.rows, :, rows.pos] = qk[:, 1]
        v_layer[rows.rows, :, rows.pos] = qkv[:, 2]
        y = F.scaled_dot_product_attention(qk[:, 0, :, None], k_layer[:, :, :span],
                                           v_layer[:, :, :span], attn_mask=rows.mask)
        return y.view(B, 1, -1)
    pos = cache.pos
    cache.k[layer, :, :, pos] = qk[:, 1]
    cache.v[layer, :, :, pos] = qkv[:, 2]
    y = F.scaled_dot_product_attention(qk[:, 0, :, None], cache.k[layer, :, :, : pos + 1],
                                       cache.v[layer, :, :, : pos + 1])
    return y.view(B, 1, -1)


def _mix_values(qkv: torch.Tensor, ve: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``qkv`` (``(..., 3C)``) with its values replaced by ``lam[0] * v + lam[1] * ve``."""
    c = ve.shape[-1]
    v = lam[0] * qkv[..., 2 * c :] + lam[1] * ve.to(qkv.dtype)
    return torch.cat((qkv[..., : 2 * c], v), dim=-1)


def block_forward(
    p: BlockParams,
    x: torch.Tensor,
    cfg: GPTConfig,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache: KVCache | None = None,
    layer: int = 0,
    dropout_p: float = 0.0,
    rows: RowPositions | None = None,
    ve: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    The only definition of the block: training (``GPT.forward``), prefill and one-token
    decoding (:meth:`GPT.decode_step`) all run it. It calls the functional ops on the weights
    directly, since at one token per step a small model's time goes to per-op and per-module
    overhead, not arithmetic. ``dropout_p`` is applied to attention weights and to both
    residual branches (pass 0 outside training). ``rows``: one-token decoding of sequences
    that stand at different positions (see :class:`RowPositions`). ``ve`` is the block's value
    embedding of the tokens (``(B, T, C)``, ``GPTConfig.value_embeds``), mixed into the values
    before they are cached.
    """
    B, T, C = x.shape
    H, D = cfg.n_head, cfg.head_dim
    qkv = F.linear(_norm(x, p.ln1_w, p.ln1_b, cfg), p.qkv_w, p.qkv_b)
    if ve is not None and p.ve_lambda is not None:
        qkv = _mix_values(qkv, ve, p.ve_lambda)
    if cache is not None and T == 1:
        y = _attend_one(qkv.view(B, 3, H, D), cfg, rope, cache, layer, rows)
    else:
        y = _attend(qkv.view(B, T, 3, H, D), cfg, rope, cache, layer, dropout_p)
    y = F.linear(y, p.o_w, p.o_b)
    if dropout_p > 0:
        y = F.dropout(y, dropout_p, training=True)
    x = x + y
    h = F.linear(_norm(x, p.ln2_w, p.ln2_b, cfg), p.fc_w, p.fc_b)
    h = F.linear(_activate(h, cfg.activation), p.p_w, p.p_b)
    if dropout_p > 0:
        h = F.dropout(h, dropout_p, training=True)
    return x + h


def _norm_module(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.layer_norm_eps, elementwise_affine=cfg.norm_weight)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias,
                        elementwise_affine=cfg.norm_weight)


class CausalSelfAttention(nn.Module):
    """The attention weights of a block: ``c_attn`` (q, k, v) and ``c_proj`` (output), and
    with a value embedding the weights ``ve_lambda`` of its mix into the values."""

    def __init__(self, config: GPTConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        if value_embed:
            self.ve_lambda = nn.Parameter(torch.tensor([0.5, 0.5]))


class MLP(nn.Module):
    """The feed-forward weights of a block (4x expansion): ``c_fc`` and ``c_proj``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)


class Block(nn.Module):
    """A transformer block's parameters (GPT-2's names); the math is :func:`block_forward`.
    ``layer`` is the block's index (the first ``config.value_embeds`` mix value embeddings
    into their attention values)."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        self.ln_1 = _norm_module(config)
        self.attn = CausalSelfAttention(config, layer < config.value_embeds)
        self.ln_2 = _norm_module(config)
        self.mlp = MLP(config)

    def params(self) -> BlockParams:
        """This block's tensors, for :func:`block_forward`."""
        a, m = self.attn, self.mlp
        return BlockParams(
            getattr(self.ln_1, "weight", None), getattr(self.ln_1, "bias", None),
            a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias,
            getattr(self.ln_2, "weight", None), getattr(self.ln_2, "bias", None),
            m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias,
            getattr(a, "ve_lambda", None),
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dropout = self.config.dropout if self.training else 0.0
        return block_forward(self.params(), x, self.config, rope, cache, layer, dropout,
                             ve=ve)


_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def check_weight_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]],
                        source: str) -> None:
    """Compare a config with the shapes of the weights meant for it, before anything is built.

    ``shapes`` maps smallgpt parameter names (``transformer.wte.weight``, ...) to shapes, as
    read from a file's header. A file whose config declares a model far larger than its
    weights (``n_layer = 10**9`` over two layers) would otherwise allocate that model first.

    Raises:
        ValueError: the embedding, the position table or the number of blocks disagree with
            the config (the message names ``source``).
    """
    def expect(name: str, want: tuple[int, ...]) -> None:
        got = shapes.get(name)
        if got is None:
            raise ValueError(f"{source}: no tensor {name!r}")
        if tuple(got) != want:
            raise ValueError(f"{source}: {name} has shape {tuple(got)} but the config declares "
                             f"{want}")

    c = config
    expect("transformer.wte.weight", (c.vocab_size, c.n_embd))
    if c.position == "learned":
        expect("transformer.wpe.weight", (c.block_size, c.n_embd))
    blocks = {int(k.split(".")[2]) for k in shapes
              if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    if len(blocks) != c.n_layer or (blocks and max(blocks) != c.n_layer - 1):
        raise ValueError(f"{source}: the config declares n_layer = {c.n_layer} but the weights "
                         f"hold {len(blocks)} block(s)")
    expect("transformer.h.0.attn.c_attn.weight", (3 * c.n_embd, c.n_embd))


def _hf_name(key: str) -> str:
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


def _read_huggingface_weights(folder: Path) -> tuple[Path, Any]:
    """The weight file and a lazy view of it (``safe_open`` handle or a memory-mapped state
    dict): shapes can be checked before anything large is read."""
    st_path = folder / "model.safetensors"
    bin_path = folder / "pytorch_model.bin"
    if st_path.is_file():
        from safetensors import safe_open

        try:
            return st_path, safe_open(str(st_path), framework="pt")
        except Exception as e:  # SafetensorError: truncated file, absurd header, ...
            raise ValueError(f"{st_path}: not a readable safetensors file "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") \
                from None
    if bin_path.is_file():
        try:
            return bin_path, torch.load(str(bin_path), map_location="cpu", weights_only=True,
                                        mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            return bin_path, torch.load(str(bin_path), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def _huggingface_shapes(view: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes in smallgpt's names and layout (Conv1D weights transposed)."""
    shapes = {}
    for k in view.keys():
        if isinstance(view, dict):
            if not isinstance(view[k], torch.Tensor):
                continue
            shape = tuple(view[k].shape)
        else:
            shape = tuple(view.get_slice(k).get_shape())
        name = _hf_name(k)
        shapes[name] = shape[::-1] if name.endswith(_HF_TRANSPOSED) else shape
    return shapes


def _load_huggingface_weights(model: GPT, path: Path, view: Any) -> None:
    """Copy a Hugging Face GPT-2 folder's tensors into ``model`` (Conv1D -> Linear)."""
    folder = path.parent
    ours = model.state_dict()
    loaded: set[str] = set()
    keys = list(view.keys())
    for key in keys:
        try:
            tensor = view[key] if isinstance(view, dict) else view.get_tensor(key)
        except Exception as e:  # SafetensorError: the data ends early
            raise ValueError(f"{path}: cannot read tensor {key!r} ({e})") from None
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is not a tensor")
        name = _hf_name(key)
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if name not in ours:
            raise ValueError(f"unexpected tensor {key!r} in {folder}")
        if name.endswith(_HF_TRANSPOSED):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise ValueError(
                f"shape mismatch for {key!r}: {tuple(tensor.shape)} vs {tuple(ours[name].shape)}"
            )
        with torch.no_grad():
            ours[name].copy_(tensor.to(ours[name].dtype))
        loaded.add(name)
    expected = set(ours)
    if model.config.tie_embeddings:
        expected.discard("lm_head.weight")
        loaded.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks tensors: {missing[:5]}")


def _hf_field(hf: dict[str, Any], keys: tuple[str, ...], default: Any, kind: type,
              source: Path) -> Any:
    """One field of a Hugging Face ``config.json``, type-checked (the first of ``keys`` set)."""
    for key in keys:
        if key in hf:
            value = hf[key]
            break
    else:
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float \
        else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{source}: {key} must be {'a number' if kind is float else kind.__name__}"
                         f", got {json.dumps(value)}")
    return value


def _config_from_huggingface(cfg_path: Path) -> GPTConfig:
    """The :class:`GPTConfig` of a Hugging Face GPT-2 ``config.json``; ``ValueError`` naming
    the file for anything malformed."""
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"not a GPT-2 checkpoint (model_type={hf.get('model_type')!r})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                         "reorder_and_upcast_attn) are not supported")
    if hf.get("scale_attn_weights", True) is not True:
        raise ValueError("scale_attn_weights=False is not supported")
    act = hf.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in _HF_TO_ACT:
        raise ValueError(f"unsupported activation_function {act!r}")
    try:
        return GPTConfig(
            vocab_size=_hf_field(hf, ("vocab_size",), 50257, int, cfg_path),
            block_size=_hf_field(hf, ("n_positions", "n_ctx"), 1024, int, cfg_path),
            n_layer=_hf_field(hf, ("n_layer",), 12, int, cfg_path),
            n_head=_hf_field(hf, ("n_head",), 12, int, cfg_path),
            n_embd=_hf_field(hf, ("n_embd",), 768, int, cfg_path),
            dropout=0.0,
            bias=True,
            activation=_HF_TO_ACT[act],
            tie_embeddings=bool(_hf_field(hf, ("tie_word_embeddings",), True, bool, cfg_path)),
            position="learned",
            layer_norm_eps=float(_hf_field(hf, ("layer_norm_epsilon",), 1e-5, float, cfg_path)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


class GPT(nn.Module):
    """Decoder-only transformer language model.

    ``model(idx)`` returns logits of shape ``(B, T, vocab_size)``; ``model(idx, targets)``
    returns ``(logits, loss)`` where ``loss`` is the mean cross-entropy over positions whose
    target is not ``-1``.

    Set ``model.gradient_checkpointing = True`` to recompute block activations in the backward
    pass (less memory, about one extra forward of compute) while training.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"expected a GPTConfig, got {type(config).__name__}")
        config.validate()
        if config.vocab_size == 0:
            raise ValueError("GPTConfig.vocab_size is 0 (not set); give the vocabulary size")
        self.config = config
        self.gradient_checkpointing = False
        #: The dtype of the head and loss when ``forward`` gets targets (training): None = the
        #: surrounding autocast (or none); set by the trainer from ``TrainConfig.head_dtype``.
        self.head_dtype: torch.dtype | None = None

        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            "ln_f": _norm_module(config),
        }
        if config.value_embeds:
            modules["ve"] = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd)
                                          for _ in range(config.value_embeds))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

        if config.position == "rope":
            cos, sin = _rope_tables(config)
            # Not persistent: derived from the config, so checkpoints stay position-free.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2: residual projections are scaled so the residual stream's variance does not
        # grow with depth.
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ forward

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final (post-``ln_f``) hidden states ``(B, T, n_embd)`` for token ids ``idx``.

        With ``cache``, ``idx`` holds the positions after ``cache.pos`` and the cache is
        updated in place (``cache.pos`` advances by ``T``).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        limit = self.config.block_size if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(
                f"sequence of length {start + T} exceeds the context of {limit} positions"
            )
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} sequences, idx has {B}")

        x = self.transformer.wte(idx)
        rope = None
        if self.config.position == "learned":
            # A slice of the table equals wpe(arange(start, start + T)) without the lookup.
            x = x + self.transformer.wpe.weight[start : start + T]
        else:
            rope = (
                self.rope_cos[start : start + T, None, None],
                self.rope_sin[start : start + T, None, None],
            )
        if self.training and self.config.dropout > 0:
            x = self.transformer.drop(x)

        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        ves = [table(idx) for table in self.transformer.ve] if self.config.value_embeds else []
        for i, block in enumerate(self.transformer.h):
            ve = ves[i] if i < len(ves) else None
            if use_ckpt and cache is None:
                x = checkpoint(block, x, rope, None, i, ve, use_reentrant=False)
            else:
                x = block(x, rope, cache, i, ve)
        if cache is not None:
            cache.pos = start + T
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor]]:
        """Logits for every position, and the loss when ``targets`` is given.

        Args:
            idx: Token ids, ``(B, T)`` LongTensor with ``T <= block_size``.
            targets: Optional next-token ids ``(B, T)``; entries equal to ``-1`` are ignored.
            cache: Optional :class:`KVCache` for incremental decoding (see
                :meth:`hidden_states`).

        Returns:
            ``logits`` of shape ``(B, T, vocab_size)``, or ``(logits, loss)`` with targets;
            with ``config.loss_chunk`` set, ``(None, loss)`` (the logits are never formed).
            With targets the head and loss run in ``self.head_dtype`` when it is set.
        """
        h = self.hidden_states(idx, cache)
        if targets is None:
            return self._softcap(self.lm_head(h))
        return self.head_loss(h, targets)

    def head_loss(self, h: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The training head and loss on final hidden states ``h`` (:meth:`hidden_states`):
        ``(logits, loss)``, or ``(None, loss)`` with ``config.loss_chunk``; in
        ``head_dtype`` when set. ``forward(idx, targets)`` is ``hidden_states`` then this."""
        with self._head_precision(h):
            if self.head_dtype == torch.float32:
                h = h.float()
            if self.config.loss_chunk > 0:
                loss = chunked_cross_entropy(h, self.lm_head.weight, targets,
                                             self.config.loss_chunk, self.config.logit_softcap)
                return None, loss
            logits = self._softcap(self.lm_head(h))
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _head_precision(self, h: torch.Tensor) -> Any:
        """Autocast for the head and loss: ``head_dtype``'s, or the caller's (None)."""
        if self.head_dtype is None:
            return contextlib.nullcontext()
        if self.head_dtype == torch.float32:
            return torch.autocast(h.device.type, enabled=False)
        return torch.autocast(h.device.type, dtype=self.head_dtype)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def decode_step(
        self, idx: torch.Tensor, cache: KVCache, plan: DecodePlan | None = None,
        positions: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, vocab_size)`` of the next token after one new token per sequence.

        ``idx`` is ``(B, 1)``; its keys and values are appended to ``cache`` (which must have
        room). Runs the same :func:`block_forward` as :meth:`forward`, on weights gathered
        once by :meth:`decode_plan` (an ``nn.Module`` attribute lookup costs about a
        microsecond, and a step needs dozens), without module calls. Inference only (no
        dropout, no autograd).

        ``positions`` (one int per row) decodes sequences of different lengths together, as
        a server batching requests does: row ``i``'s token goes to position ``positions[i]``
        and sees the cache's first ``positions[i]`` positions of that row; ``cache.pos`` is
        neither read nor advanced (the caller keeps each row's length).
        """
        B = idx.shape[0]
        if idx.shape != (B, 1) or cache.batch_size != B:
            raise ValueError(f"decode_step takes (batch, 1) ids for a cache of {cache.batch_size}")
        if positions is not None:
            return self._decode_rows(idx, cache, plan or self.decode_plan(), positions)
        pos = cache.pos
        if pos >= cache.max_len:
            raise ValueError(f"the cache is full ({cache.max_len} positions)")
        cfg = self.config
        plan = plan or self.decode_plan()
        x = F.embedding(idx, plan.wte)
        rope = None
        if plan.wpe is not None:
            x = x + plan.wpe[pos]
        else:  # one position: (head_dim / 2,) rows broadcast over (B, 2, H, head_dim / 2)
            assert plan.rope_cos is not None and plan.rope_sin is not None
            rope = (plan.rope_cos[pos], plan.rope_sin[pos])
        for i, layer in enumerate(plan.layers):
            ve = F.embedding(idx, plan.value_embeds[i]) if i < len(plan.value_embeds) else None
            x = block_forward(layer, x, cfg, rope, cache, i, 0.0, ve=ve)
        cache.pos = pos + 1
        x = _norm(x[:, 0], plan.lnf_w, plan.lnf_b, cfg)
        return self._softcap(F.linear(x, plan.head))

    def _decode_rows(self, idx: torch.Tensor, cache: KVCache, plan: DecodePlan,
                     positions: Sequence[int]) -> torch.Tensor:
        """:meth:`decode_step` for rows at their own positions."""
        B = idx.shape[0]
        if len(positions) != B:
            raise ValueError(f"positions has {len(positions)} entries for {B} rows")
        if min(positions) < 0 or max(positions) >= cache.max_len:
            raise ValueError(f"positions must be in [0, {cache.max_len}), got "
                             f"{min(positions)}..{max(positions)}")
        cfg = self.config
        rows = RowPositions.build(positions, idx.device)
        x = F.embedding(idx, plan.wte)
        rope = None
        if plan.wpe is not None:
            x = x + plan.wpe[rows.pos][:, None]
        else:  # (B, 1, 1, head_dim / 2) broadcast over (B, 2, H, head_dim / 2)
            assert plan.rope_cos is not None and plan.rope_sin is not None
            rope = (plan.rope_cos[rows.pos][:, None, None], plan.rope_sin[rows.pos][:, None, None])
        for i, layer in enumerate(plan.layers):
            ve = F.embedding(idx, plan.value_embeds[i]) if i < len(plan.value_embeds) else None
            x = block_forward(layer, x, cfg, rope, cache, i, rows=rows, ve=ve)
        x = _norm(x[:, 0], plan.lnf_w, plan.lnf_b, cfg)
        return self._softcap(F.linear(x, plan.head))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (:meth:`hidden_states`): the output head, then the
        soft cap when the config has one; what :meth:`forward` returns for the same ``h``."""
        return self._softcap(self.lm_head(h))

    def decode_plan(self) -> DecodePlan:
        """The parameters :meth:`decode_step` reads, gathered into flat lists once. Valid until
        a parameter object is replaced."""
        t = self.transformer
        wpe = t.wpe.weight if self.config.position == "learned" else None
        rope = (self.rope_cos, self.rope_sin) if wpe is None else (None, None)
        ves = [table.weight for table in t.ve] if self.config.value_embeds else []
        return DecodePlan(t.wte.weight, wpe, [b.params() for b in t.h],
                          getattr(t.ln_f, "weight", None), getattr(t.ln_f, "bias", None),
                          self.lm_head.weight, *rope, value_embeds=ves)

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty :class:`KVCache` on the model's device (default length: ``block_size``)."""
        p = self.transformer.wte.weight
        return KVCache(
            self.config, batch_size, max_len, device=p.device, dtype=dtype or p.dtype
        )

    # ------------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters.

        With ``non_embedding=True`` (default) the lookup-only tables are left out: the position
        embedding, the value embeddings, and the token embedding when the head is untied. A
        tied token embedding is counted because it does the output projection's work.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.position == "learned":
                n -= self.transformer.wpe.weight.numel()
            if self.config.value_embeds:
                n -= sum(t.weight.numel() for t in self.transformer.ve)
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        ``6 * N`` for the matrix multiplies with the parameters (PaLM appendix B) plus
        ``12 * n_layer * n_embd * seq_len`` for the attention scores and weighted sums.
        """
        c = self.config
        t = c.block_size if seq_len is None else seq_len
        return 6.0 * self.num_params(non_embedding=True) + 12.0 * c.n_layer * c.n_embd * t

    # ------------------------------------------------------------------ generation

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Extend ``idx`` by up to ``max_new_tokens`` tokens (see ``smallgpt.generate``)."""
        from smallgpt.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def generate_stream(
        self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any
    ) -> Iterator[torch.Tensor]:
        """Yield new tokens step by step; see :func:`smallgpt.generate.generate_stream`."""
        from smallgpt.generate import generate_stream

        return generate_stream(self, idx, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ Hugging Face GPT-2

    @classmethod
    def from_huggingface(
        cls, path: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None
    ) -> GPT:
        """Load a local Hugging Face GPT-2 folder (``config.json`` + weights).

        Reads ``model.safetensors`` or ``pytorch_model.bin``. Hugging Face stores GPT-2's
        projections as ``Conv1D`` (``in x out``); they are transposed into ``nn.Linear``.
        No network access: ``path`` must be a folder on disk. The model is returned in eval mode.
        """
        folder = Path(path)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}")
        config = _config_from_huggingface(cfg_path)
        weights, view = _read_huggingface_weights(folder)
        check_weight_shapes(config, _huggingface_shapes(view), str(weights))
        model = cls(config)
        _load_huggingface_weights(model, weights, view)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def save_huggingface(self, path: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel`` loads.

        Only GPT-2-shaped models can be exported (:meth:`GPTConfig.gpt2_incompatibilities`
        names what stands in the way: rotary positions, no biases, RMSNorm, ...).
        """
        c = self.config
        bad = c.gpt2_incompatibilities()
        if bad:
            raise ValueError(f"GPT-2 cannot represent this model's {', '.join(bad)}; it cannot "
                             "be saved as a Hugging Face GPT-2 folder")
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        hf_config = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_ctx": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": None,
            "activation_function": _ACT_TO_HF[c.activation],
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "layer_norm_epsilon": c.layer_norm_eps,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "use_cache": True,
            "tie_word_embeddings": c.tie_embeddings,
        }
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            if name == "lm_head.weight" and c.tie_embeddings:
                continue  # safetensors refuses shared storage; transformers re-ties it
            t = tensor.detach().cpu().float()
            if name.endswith(_HF_TRANSPOSED):
                t = t.t()
            tensors[name] = t.contiguous()
        tmp = folder / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / "model.safetensors")
        tmp_cfg = folder / "config.json.tmp"
        tmp_cfg.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_cfg, folder / "config.json")
