"""Tests for smallgpt.model: config validation, shapes, causality, training signal, KV cache,
parameter/FLOP accounting and Hugging Face GPT-2 parity (no network: random local models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from smallgpt.model import GPT, GPTConfig


def tiny(**kw: object) -> GPTConfig:
    base: dict[str, object] = dict(
        vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=16, dropout=0.0
    )
    base.update(kw)
    return GPTConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_embd=30, n_head=4),
        dict(n_head=0),
        dict(vocab_size=-1),
        dict(block_size=0),
        dict(n_layer=1.5),
        dict(dropout=1.0),
        dict(dropout=-0.1),
        dict(activation="swish"),
        dict(position="alibi"),
        dict(position="rope", n_embd=18, n_head=2),  # odd head size
        dict(rope_theta=0.0),
        dict(layer_norm_eps=0.0),
    ],
)
def test_config_rejects_bad_values(kw: dict) -> None:
    with pytest.raises(ValueError):
        tiny(**kw)


def test_config_dict_roundtrip_and_unknown_keys() -> None:
    c = tiny(activation="relu", position="rope", tie_embeddings=False)
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict({**c.to_dict(), "n_heads": 3})


def test_gpt_requires_config() -> None:
    with pytest.raises(TypeError):
        GPT({"vocab_size": 10})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("bias", [True, False])
def test_shapes_and_loss(position: str, bias: bool) -> None:
    torch.manual_seed(0)
    m = GPT(tiny(position=position, bias=bias))
    idx = torch.randint(0, 61, (3, 10))
    logits = m(idx)
    assert logits.shape == (3, 10, 61)
    tgt = torch.randint(0, 61, (3, 10))
    logits2, loss = m(idx, tgt)
    assert torch.equal(logits, logits2)
    assert loss.shape == ()
    # A fresh model is close to uniform: loss ~ ln(vocab).
    assert abs(loss.item() - math.log(61)) < 0.3
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), tgt.reshape(-1))
    assert torch.allclose(loss, manual)
    if not bias:
        assert all(not n.endswith(".bias") for n, _ in m.named_parameters())


def test_targets_minus_one_are_ignored() -> None:
    torch.manual_seed(0)
    m = GPT(tiny())
    idx = torch.randint(0, 61, (2, 8))
    tgt = torch.randint(0, 61, (2, 8))
    masked = tgt.clone()
    masked[:, :5] = -1
    logits, loss = m(idx, masked)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 5:].reshape(-1, 61), tgt[:, 5:].reshape(-1)
    )
    assert torch.allclose(loss, expected)


def test_too_long_input_is_an_error() -> None:
    m = GPT(tiny(block_size=8))
    with pytest.raises(ValueError, match="exceeds"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        m(torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_causality(position: str, activation: str) -> None:
    """Changing tokens at positions >= t must not change logits before t."""
    torch.manual_seed(1)
    m = GPT(tiny(position=position, activation=activation)).eval()
    idx = torch.randint(0, 61, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t:] = torch.randint(0, 61, (2, 16 - t))
    a, b = m(idx), m(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_rope_model_is_position_sensitive_without_position_table() -> None:
    m = GPT(tiny(position="rope")).eval()
    assert not hasattr(m.transformer, "wpe")
    assert "rope_cos" not in m.state_dict()  # derived buffers are not checkpointed
    idx = torch.tensor([[5, 7, 5, 7, 5]])
    logits = m(idx)
    # Same token at different positions must see different contexts -> different logits.
    assert not torch.allclose(logits[0, 0], logits[0, 2])


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_overfit_one_batch(position: str) -> None:
    torch.manual_seed(0)
    m = GPT(tiny(position=position, n_embd=32))
    idx = torch.randint(0, 61, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = m(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5
    assert loss.item() < 0.5


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    m = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 61, (2, 8))
    m.train()
    assert not torch.equal(m(idx), m(idx))
    m.eval()
    assert torch.equal(m(idx), m(idx))


def test_gradient_checkpointing_matches_plain_backward() -> None:
    torch.manual_seed(0)
    m = GPT(tiny(position="rope"))
    idx = torch.randint(0, 61, (2, 12))
    _, loss = m(idx, idx)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing = True
    _, loss2 = m(idx, idx)
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


# ----------------------------------------------------------------------------- init / accounting


def test_gpt2_initialisation_and_tying() -> None:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128))
    assert m.lm_head.weight is m.transformer.wte.weight
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 0.002
    fc = m.transformer.h[0].mlp.c_fc.weight
    assert abs(fc.std().item() - 0.02) < 0.002
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in m.transformer.h])
    assert abs(proj.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.count_nonzero(m.transformer.h[0].attn.c_attn.bias) == 0
    untied = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128,
                           tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_num_params_and_flops() -> None:
    c = tiny()
    m = GPT(c)
    V, T, L, C = c.vocab_size, c.block_size, c.n_layer, c.n_embd
    per_block = (2 * 2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (
        4 * C * C + C
    )
    total = V * C + T * C + L * per_block + 2 * C
    assert m.num_params(non_embedding=False) == total
    assert m.num_params() == total - T * C
    assert m.flops_per_token(20) == 6 * (total - T * C) + 12 * L * C * 20
    assert m.flops_per_token() == m.flops_per_token(T)
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.num_params(non_embedding=False) == total + V * C
    assert untied.num_params() == total - T * C  # the lookup table is not counted
    rope = GPT(tiny(position="rope"))
    assert rope.num_params() == rope.num_params(non_embedding=False) == total - T * C


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_matches_full_forward(position: str) -> None:
    torch.manual_seed(0)
    m = GPT(tiny(position=position)).eval()
    idx = torch.randint(0, 61, (2, 20))
    full = m(idx)
    cache = m.new_cache(2)
    parts = [m(idx[:, :6], cache=cache), m(idx[:, 6:11], cache=cache)]
    parts += [m(idx[:, t : t + 1], cache=cache) for t in range(11, 20)]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_kv_cache_limits() -> None:
    m = GPT(tiny(block_size=8)).eval()
    cache = m.new_cache(1)
    m(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds"):
        m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError):
        m.new_cache(1, max_len=9)
    with pytest.raises(ValueError, match="sequences"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=m.new_cache(1))


# ----------------------------------------------------------------------------- Hugging Face

def _hf_model(tmp_path, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0, **kw
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    # Random init leaves biases and LayerNorms trivial; perturb them so the mapping is tested.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation_function": "relu"},
        {"activation_function": "gelu"},
        {"tie_word_embeddings": False, "layer_norm_epsilon": 1e-3},
    ],
)
def test_from_huggingface_logits_parity(tmp_path, kw: dict) -> None:  # type: ignore[no-untyped-def]
    hf = _hf_model(tmp_path, **kw)
    assert (tmp_path / "model.safetensors").exists()
    m = GPT.from_huggingface(tmp_path)
    assert m.config.block_size == 32 and m.config.n_layer == 2 and m.config.n_head == 4
    assert m.config.tie_embeddings == kw.get("tie_word_embeddings", True)
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = m(idx)
    assert (ref - ours).abs().max().item() <= 1e-4


def test_from_huggingface_pytorch_bin(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = _hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}  # clone: no shared storage
    torch.save(sd, tmp_path / "pytorch_model.bin")
    m = GPT.from_huggingface(tmp_path)
    idx = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        assert (hf(idx).logits - m(idx)).abs().max().item() <= 1e-4


def test_from_huggingface_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError):
        GPT.from_huggingface(tmp_path / "nope")
    _hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        GPT.from_huggingface(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["activation_function"] = "silu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation"):
        GPT.from_huggingface(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_save_huggingface_roundtrip(tmp_path, tie: bool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    m = GPT(tiny(activation="gelu_tanh", tie_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    m.save_huggingface(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        assert (hf(idx).logits - m(idx)).abs().max().item() <= 1e-4
    back = GPT.from_huggingface(tmp_path)
    assert back.config == m.config
    with torch.no_grad():
        assert torch.allclose(back(idx), m(idx), atol=1e-6)


@pytest.mark.parametrize("option, value", [
    ("position", "rope"), ("bias", False), ("activation", "relu2"), ("norm", "rmsnorm"),
    ("norm_weight", False), ("qk_norm", True), ("logit_softcap", 15.0)])
def test_save_huggingface_rejects_non_gpt2_shapes(tmp_path, option, value) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    with pytest.raises(ValueError, match=option):
        GPT(tiny(**{option: value})).save_huggingface(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_zero_init_and_untied_models_export_others_are_named() -> None:
    assert GPTConfig(zero_init_proj=True, tie_embeddings=False).gpt2_incompatibilities() == []
    names = [p.split(" ")[0] for p in GPTConfig(norm="rmsnorm", norm_weight=False, qk_norm=True,
                                                logit_softcap=15.0).gpt2_incompatibilities()]
    assert names == ["norm", "norm_weight", "qk_norm", "logit_softcap"]
