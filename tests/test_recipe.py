"""The modern recipe: Muon and the block options (RMSNorm, QK-norm, ReLU², soft-capping,
zero-initialised projections, no biases, untied head, value embeddings), each with the KV
cache, resume and torch.compile; the chunked head + loss, the head's dtype and the WSD
schedule."""

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
    "value_embeds": dict(value_embeds=2),
    "all": dict(norm="rmsnorm", norm_weight=False, qk_norm=True, activation="relu2",
                logit_softcap=3.0, zero_init_proj=True, bias=False, tie_embeddings=False,
                position="rope", value_embeds=1, loss_chunk=7),
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
    # the training path: value embeddings and the chunked loss (loss_chunk) compile too
    model.train()
    _, loss = compiled(seq, seq)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, eager = model(seq, seq)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


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


# ---------------------------------------------------------------- the chunked head + loss


def _loss_and_grads(model: GPT, seq: torch.Tensor, targets: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    _, loss = model(seq, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [dict(), dict(logit_softcap=3.0, tie_embeddings=False)])
def test_chunked_loss_equals_the_plain_path(kw: Dict[str, Any]) -> None:
    """Value and every parameter's gradient, fp32, with ignored targets and a last chunk
    shorter than the others; the logits are never returned."""
    plain = _model(**kw).train()
    chunked = _model(**kw, loss_chunk=7).train()
    chunked.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 40, (3, 16), generator=g)
    targets = torch.randint(0, 40, (3, 16), generator=g)
    targets[0, :4] = -1
    loss_a, grads_a = _loss_and_grads(plain, seq, targets)
    loss_b, grads_b = _loss_and_grads(chunked, seq, targets)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7,
                                   msg=name)
    assert chunked(seq, targets)[0] is None
    with torch.no_grad():  # no targets: the logits, as before
        torch.testing.assert_close(chunked(seq), plain(seq))


def test_chunked_loss_under_bf16_autocast_and_compile() -> None:
    from smallgpt.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(4)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (50,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = chunked_cross_entropy(h, w, t, 16).detach()
    assert low.dtype == torch.float32 and abs(float(low) - float(ref.detach())) < 0.05
    compiled = torch.compile(chunked_cross_entropy)
    out = compiled(h, w, t, 16)
    gh, gw = torch.autograd.grad(out, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, t, 0)


def test_head_dtype_is_the_heads_only() -> None:
    from smallgpt.train.hardware import cpu_supports_fast_bf16, resolve_head_dtype

    model = _model().train()
    seq = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(5))
    model.head_dtype = torch.bfloat16
    logits, loss = model(seq, seq)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert model(seq).dtype == torch.float32  # evaluation keeps the run's precision
    cpu = torch.device("cpu")
    assert resolve_head_dtype("same", cpu, torch.float32) is None
    assert resolve_head_dtype("float32", cpu, torch.float32) is None
    assert resolve_head_dtype("float32", cpu, torch.bfloat16) == torch.float32
    assert resolve_head_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
    native = torch.bfloat16 if cpu_supports_fast_bf16() else None
    assert resolve_head_dtype("auto", cpu, torch.float32) == native


# ---------------------------------------------------------------- value embeddings


def test_value_embeddings_are_lookup_tables_for_adamw() -> None:
    cfg = dict(vocab_size=40, block_size=8, n_layer=3, n_head=2, n_embd=8)
    plain, ve = GPT(GPTConfig(**cfg)), GPT(GPTConfig(**cfg, value_embeds=2))
    names = [n for n, _ in ve.named_parameters()]
    assert "transformer.ve.1.weight" in names and "transformer.ve.2.weight" not in names
    assert "transformer.h.1.attn.ve_lambda" in names
    assert "transformer.h.2.attn.ve_lambda" not in names
    # lookup tables are left out of the FLOP count; the two mixing weights per block are not
    assert ve.num_params() == plain.num_params() + 2 * 2
    hidden, _ = split_params(ve)
    assert all(p.dim() == 2 and p.shape != (40, 8) for p in hidden)
    assert any("value_embeds" in x for x in ve.config.gpt2_incompatibilities())
    assert not GPTConfig(**cfg, loss_chunk=64).gpt2_incompatibilities()


# ---------------------------------------------------------------- schedule and validation


def test_wsd_schedule_shape() -> None:
    from smallgpt.train.schedule import Schedule, lr_at

    s = Schedule(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, schedule="wsd",
                 decay_fraction=0.25)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert all(s(step) == 1.0 for step in range(10, 86))  # stable until 75 % of the decay
    assert s(85) == 1.0 and s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    middle = [s(step) for step in range(85, 111)]
    assert all(a > b for a, b in zip(middle, middle[1:]))  # strictly decreasing ...
    steps = [b - a for a, b in zip(middle, middle[1:])]
    assert max(steps) - min(steps) < 1e-9  # ... and linear
    # the clock drives it like the cosine: 90 % of the time used = 60 % into the decay
    assert s(20, time_progress=0.9) == pytest.approx(1.0 - 0.9 * 0.6)
    assert lr_at(50, 1.0, 0.1, 10, 110) < 1.0  # the cosine is already decaying there
    with pytest.raises(ValueError, match="decay_fraction"):
        Schedule(1.0, 0.1, 0, 10, schedule="wsd", decay_fraction=0.0)
    with pytest.raises(ValueError, match="schedule"):
        Schedule(1.0, 0.1, 0, 10, schedule="step")


@pytest.mark.parametrize("key, value, match", [
    ("optim.schedule", "linear", "optim.schedule"),
    ("optim.decay_fraction", "0", "decay_fraction"),
    ("optim.decay_fraction", "1.5", "decay_fraction"),
    ("head_dtype", "float8", "head_dtype"),
    ("model.loss_chunk", "-1", "loss_chunk"),
    ("model.value_embeds", "3", "value_embeds"),
])
def test_new_options_are_validated(key: str, value: str, match: str) -> None:
    from smallgpt.config import ConfigError, build_config, validate

    cfg = build_config(overrides={"model.n_layer": "2", key: value})
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
    with pytest.raises(ValueError, match="value_embeds"):
        GPTConfig(n_layer=2, value_embeds=3)
    with pytest.raises(ValueError, match="loss_chunk"):
        GPTConfig(loss_chunk=True)


def test_new_options_train_and_resume_exactly(tmp_path: Path, data_dir: Path) -> None:
    extra = {"model__loss_chunk": 24, "model__value_embeds": 1, "optim__schedule": "wsd",
             "optim__decay_fraction": 0.5, "optim__decay_steps": 8, "head_dtype": "float32",
             "eval_interval": 4, "save_interval": 0}
    straight = train(tiny_cfg(tmp_path / "straight", data_dir, max_steps=8, **extra))
    train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=4, **extra))
    train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=8, **extra), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "halves" / "ckpt_latest.pt")
    assert "transformer.ve.0.weight" in a.model
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    recs = read_metrics(tmp_path / "straight")
    lrs = [r["lr"] for r in recs if "lr" in r]
    # warmup of 2 steps, stable while under half of the decay's 6 steps, then linear decay
    assert len(lrs) == 8 and lrs[0] < lrs[1]
    assert lrs[1:6] == [pytest.approx(1e-2)] * 5 and lrs[5] > lrs[6] > lrs[7]
    assert straight["val_loss"] < [r["loss"] for r in recs if "loss" in r][0]
