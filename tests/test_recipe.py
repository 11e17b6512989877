"""The modern recipe: Muon and the block options (RMSNorm, QK-norm, ReLU², soft-capping,
zero-initialised projections, no biases, untied head), each with the KV cache, resume and
torch.compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from helpers import read_metrics, tiny_cfg

from smallgpt.model import GPT, GPTConfig
from smallgpt.train import load_checkpoint, train
from smallgpt.train.optim import Muon, build_optimizers, newton_schulz, split_params

OPTIONS: Dict[str, Dict[str, Any]] = {
    "rmsnorm": dict(norm="rmsnorm"),
    "rmsnorm-parameter-free": dict(norm="rmsnorm", norm_weight=False),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "softcap": dict(logit_softcap=3.0),
    "zero_init_proj": dict(zero_init_proj=True),
    "no-bias-untied": dict(bias=False, tie_embeddings=False),
    "all": dict(norm="rmsnorm", norm_weight=False, qk_norm=True, activation="relu2",
                logit_softcap=3.0, zero_init_proj=True, bias=False, tie_embeddings=False,
                position="rope"),
}


def _model(**kw: Any) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16),
                       **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():  # zero-initialised projections would hide the attention path
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cached_decoding_equals_uncached(name: str) -> None:
    model = _model(**OPTIONS[name])
    seq = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache(3)
        prefill = model(seq[:, :5], cache=cache)
        torch.testing.assert_close(prefill, full[:, :5], rtol=1e-5, atol=1e-5)
        for t in range(5, 12):
            torch.testing.assert_close(model.decode_step(seq[:, t : t + 1], cache), full[:, t],
                                       rtol=1e-5, atol=1e-5)
    cached = model.generate(seq[:, :4], 10, temperature=0)
    uncached = model.generate(seq[:, :4], 10, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    if OPTIONS[name].get("logit_softcap"):
        assert full.abs().max() <= OPTIONS[name]["logit_softcap"]


def test_options_change_the_model_as_documented() -> None:
    assert GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8,
                         norm="rmsnorm", norm_weight=False, bias=False)).num_params() == \
        40 * 8 + 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8
    z = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=8,
                      zero_init_proj=True))
    assert all(not b.attn.c_proj.weight.detach().any() and
               not b.mlp.c_proj.weight.detach().any() for b in z.transformer.h)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="logit_softcap"):
        GPTConfig(logit_softcap=-1.0)


def test_options_compile() -> None:
    model = _model(**OPTIONS["all"])
    seq = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(seq), model(seq), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Muon


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_orthogonalises(dtype: torch.dtype) -> None:
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g, dtype=dtype).float()
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and 0.5 < float(s.min()) and float(s.max()) < 1.5
    # the same directions as g's SVD (U V^T), up to the spread of singular values
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(o.flatten(), (u @ vt).flatten(), dim=0)
    assert cos > 0.95


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch < 2.9 has no Muon to compare")
def test_our_muon_equals_torchs() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(24, 8)
    ours = torch.nn.Parameter(w0.clone())
    theirs = torch.nn.Parameter(w0.clone())
    a = Muon([ours], lr=0.02, weight_decay=0.1, momentum=0.9)
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.9)
    for step in range(4):
        g = torch.randn(24, 8, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
        torch.testing.assert_close(ours.data, theirs.data, rtol=0, atol=0)
    assert not torch.equal(ours.data, w0)


def test_muon_routes_hidden_matrices_only() -> None:
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=8,
                          tie_embeddings=False))
    hidden, rest = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert "lm_head.weight" in {names[id(p)] for p in rest}
    assert "transformer.wte.weight" in {names[id(p)] for p in rest}
    assert len(hidden) + len(rest) == len(list(model.parameters()))
    from smallgpt.config import OptimSection

    opts = build_optimizers(model, OptimSection(name="muon", muon_lr=0.03),
                            torch.device("cpu"))
    assert len(opts) == 2 and opts[0].param_groups[0]["base_lr"] == 0.03


def test_muon_training_lowers_loss_and_resumes_exactly(tmp_path: Path,
                                                       data_dir: Path) -> None:
    extra = {"optim__name": "muon", "optim__muon_lr": 0.02, "model__dropout": 0.1,
             "optim__decay_steps": 8, "eval_interval": 4, "save_interval": 0,
             "model__norm": "rmsnorm", "model__qk_norm": True, "model__activation": "relu2"}
    straight = train(tiny_cfg(tmp_path / "straight", data_dir, max_steps=8, **extra))
    train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=4, **extra))
    train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=8, **extra), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "halves" / "ckpt_latest.pt")
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    # both optimizers' states are in the checkpoint and were restored
    assert any("momentum_buffer" in s for s in a.trainer["optimizer"]["state"].values())
    la = [r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "halves") if "loss" in r]
    assert la == lb
    assert straight["val_loss"] < la[0]
