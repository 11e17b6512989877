"""CUDA-only checks (run by benches/gpu_check.sh on a GPU machine; skipped without CUDA).

bf16 autocast, fp16 with a GradScaler, SDPA's kernels with RoPE, QK-norm and dropout, the CUDA
RNG through a checkpoint, torch.compile under DDP, fused AdamW against the unfused update, the
DDP and FSDP2 code paths over NCCL with one process (FSDP2 with torch.optim.Muon on sharded
parameters), and resume on CUDA. The CPU suite's tests marked ``device`` (generation, the
sampling CLI, evaluation, fine-tuning) run on the GPU too under ``SMALLGPT_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import pytest
import torch
from helpers import read_metrics, tiny_cfg

from smallgpt.model import GPT, GPTConfig
from smallgpt.train import Trainer, load_checkpoint, train
from smallgpt.train.optim import build_optimizers, configure_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_cfg(out: Path, data: Path, **kw: Any):  # type: ignore[no-untyped-def]
    kw.setdefault("dtype", "auto")
    return tiny_cfg(out, data, device="cuda", **kw)


def losses(out: Path) -> List[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.fixture
def no_tf32() -> Any:
    """fp32 comparisons in fp32: the trainer turns TF32 on (conftest restores the flags)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_bf16_autocast_trains(tmp_path: Path, data_dir: Path) -> None:
    t = Trainer(gpu_cfg(tmp_path / "r", data_dir, max_steps=20, eval_interval=0))
    assert t.dtype == torch.bfloat16 and t.device.type == "cuda"
    summary = t.fit()
    t.close()
    first = read_metrics(tmp_path / "r")[0]["loss"]
    assert summary["val_loss"] < first


def test_fp16_with_grad_scaler_trains(tmp_path: Path, data_dir: Path) -> None:
    t = Trainer(gpu_cfg(tmp_path / "r", data_dir, max_steps=12, eval_interval=0,
                        dtype="float16"))
    try:
        assert t.scaler.is_enabled() and t.dtype == torch.float16
        t.fit()
    finally:
        t.close()
    got = losses(tmp_path / "r")
    assert got[-1] < got[0]
    assert load_checkpoint(tmp_path / "r" / "ckpt_latest.pt").trainer["scaler"]["scale"] > 1


def test_sdpa_flash_kernel_is_selected() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=256)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, 64, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
        _, loss = model(idx, idx)  # raises if the flash kernel cannot run this call
    loss.backward()
    assert torch.isfinite(loss)


def test_sdpa_on_cuda_with_rope_qk_norm_and_dropout(no_tf32: None) -> None:
    """The modern attention (RoPE, QK-norm) on CUDA's kernels: in eval mode the CPU's logits;
    in training mode dropout is applied, follows the CUDA seed, and trains under the flash
    kernel in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=128,
                    position="rope", qk_norm=True, norm="rmsnorm", dropout=0.1)
    model = GPT(cfg)
    idx = torch.randint(0, 64, (3, 64))
    with torch.no_grad():
        cpu = model.eval()(idx)
        gpu = model.cuda()(idx.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    model.train()
    with torch.no_grad():
        torch.cuda.manual_seed(1)
        a = model(idx.cuda())
        torch.cuda.manual_seed(1)
        b = model(idx.cuda())
        torch.cuda.manual_seed(2)
        c = model(idx.cuda())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, gpu, atol=1e-3)  # dropout was applied
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
        _, loss = model(idx.cuda(), idx.cuda())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cuda_rng_state_round_trip() -> None:
    from smallgpt.train.trainer import _rng_state, _set_rng_state

    dev = torch.device("cuda", 0)
    state = _rng_state(dev)
    assert "cuda" in state
    first = torch.rand(5, device=dev)
    torch.rand(7, device=dev)
    _set_rng_state(state, dev)
    assert torch.equal(torch.rand(5, device=dev), first)


def test_resume_on_cuda(tmp_path: Path, data_dir: Path) -> None:
    # dropout > 0: the CUDA RNG has to come back from the checkpoint for the runs to agree
    extra = {"optim__decay_steps": 8, "eval_interval": 4, "save_interval": 0,
             "dtype": "float32", "model__dropout": 0.1}
    train(gpu_cfg(tmp_path / "straight", data_dir, max_steps=8, **extra))
    train(gpu_cfg(tmp_path / "halves", data_dir, max_steps=4, **extra))
    train(gpu_cfg(tmp_path / "halves", data_dir, max_steps=8, **extra), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "halves" / "ckpt_latest.pt")
    assert "cuda" in a.trainer["rng"][0]
    for k in a.model:  # CUDA kernels may reorder sums: close, not bit-equal
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5)
    assert losses(tmp_path / "halves") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)


def test_ddp_over_a_compiled_model_with_fused_adamw(tmp_path: Path, data_dir: Path) -> None:
    """DDP(torch.compile(model)), as the trainer wraps it, with fused AdamW (Muon's AdamW
    half too) trains like the eager model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from smallgpt.config import OptimSection

    extra = {"max_steps": 4, "eval_interval": 0, "save_interval": 0, "dtype": "float32",
             "parallel": "ddp"}
    t = Trainer(gpu_cfg(tmp_path / "compiled", data_dir, compile=True, **extra))
    try:
        assert isinstance(t.train_module, DDP)
        assert isinstance(t.train_module.module, torch._dynamo.eval_frame.OptimizedModule)
        assert all(opt.defaults.get("fused") for opt in t.optimizers)
        t.fit()
    finally:
        t.close()
    train(gpu_cfg(tmp_path / "eager", data_dir, **extra))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).cuda()
    muon, adamw = build_optimizers(model, OptimSection(name="muon"), torch.device("cuda"))
    assert adamw.defaults.get("fused")


def test_fused_adamw_matches_the_unfused_update(no_tf32: None) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64)
    a = GPT(cfg).cuda()
    b = GPT(cfg).cuda()
    b.load_state_dict(a.state_dict())
    fused = configure_optimizer(a, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cuda"))
    assert fused.defaults["fused"]
    index = {id(p): i for i, p in enumerate(a.parameters())}
    params_b = list(b.parameters())
    groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"],
               "params": [params_b[index[id(p)]] for p in g["params"]]}
              for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            g = torch.randn(pa.shape, device="cuda", generator=gen)
            pa.grad, pb.grad = g, g.clone()
        fused.step()
        plain.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distributed_code_path_with_one_process(tmp_path: Path, data_dir: Path,
                                                parallel: str) -> None:
    import torch.distributed as dist

    cfg = gpu_cfg(tmp_path / parallel, data_dir, max_steps=4, eval_interval=2,
                  parallel=parallel, optim__name="muon")
    t = Trainer(cfg)
    assert "nccl" in str(dist.get_backend()).lower()
    t.fit()
    t.close()
    resumed = gpu_cfg(tmp_path / parallel, data_dir, max_steps=6, eval_interval=2,
                      parallel=parallel, optim__name="muon")
    assert train(resumed, resume=True)["step"] == 6
