"""Training loop (smallgpt.train): schedule, optimizer, accumulation, resume, checkpoints, DDP."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers import VOCAB, read_metrics, synthetic_tokens, tiny_cfg

from smallgpt.checkpoint import CheckpointError
from smallgpt.config import ConfigError, TrainConfig
from smallgpt.data import write_shard
from smallgpt.model import GPT, GPTConfig
from smallgpt.train import (
    HardwareError,
    TrainingDiverged,
    TrainingError,
    configure_optimizer,
    load_checkpoint,
    lr_at,
    peak_flops,
    train,
)
from smallgpt.train import trainer as trainer_module

# ---------------------------------------------------------------- pieces


def test_lr_schedule_values() -> None:
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "decay_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    vals = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # the clock can push the cosine ahead of the step count, never behind it
    assert lr_at(20, **kw, time_progress=0.5) == pytest.approx(0.55)
    assert lr_at(20, **kw, time_progress=1.0) == pytest.approx(0.1)
    assert lr_at(100, **kw, time_progress=0.0) == lr_at(100, **kw)
    assert lr_at(0, 1.0, 0.0, 0, 10) == pytest.approx(1.0)


def test_optimizer_decays_only_matrices() -> None:
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"),
                              embed_lr=5e-3)
    decay, emb, no_decay = opt.param_groups
    assert decay["weight_decay"] == emb["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    # the position table is only looked up: it takes embed_lr; the tied wte/head does not
    assert emb["params"] == [model.transformer.wpe.weight] and emb["lr"] == 5e-3
    assert decay["lr"] == 1e-3 and model.transformer.wte.weight in decay["params"]
    n_params = len(list(model.parameters()))
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params


def test_peak_flops_cpu_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert 1e9 < peak < 1e14
    monkeypatch.setenv("SMALLGPT_PEAK_FLOPS", "123e9")
    assert peak_flops(torch.device("cpu"), torch.float32) == 123e9


# ---------------------------------------------------------------- runs


class FakeClock:
    """A perf_counter that advances a fixed amount per call: time-bounded runs become
    deterministic whatever the machine's load."""

    def __init__(self, tick: float) -> None:
        self.now = 1000.0
        self.tick = tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)


def test_missing_matplotlib_is_one_warning_line(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from smallgpt.train.metrics import plot_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_metrics(tmp_path) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smallgpt-train: warning: matplotlib")
    assert "smallgpt[plot]" in err[0] and not (tmp_path / "loss_curve.png").exists()


def test_run_outputs_checkpoints_and_metrics(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_cfg(out, data_dir, max_steps=7, plot=True, keep_last=2, save_interval=2)
    summary = train(cfg)
    assert summary["step"] == 7 and summary["stopped"] == "max_steps"
    assert summary["tokens_per_step"] == 4 * 16
    names = sorted(p.name for p in out.iterdir())
    # saves at 2, 4, 6 and the end (7); keep the last two numbered ones
    assert "ckpt_0000006.pt" in names and "ckpt_0000007.pt" in names
    assert "ckpt_0000004.pt" not in names and "ckpt_0000002.pt" not in names
    for name in ("ckpt_latest.pt", "ckpt_best.pt", "tokenizer.json", "metrics.jsonl",
                 "loss_curve.png", "config.json"):
        assert name in names
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    raw = torch.load(out / "ckpt_latest.pt", weights_only=True)  # plain data only
    assert raw["format"] == "smallgpt-checkpoint" and raw["version"] == 2
    for key in ("optimizer", "scaler", "rng", "data", "elapsed_s", "threads", "tokens_seen"):
        assert key in raw["trainer"]
    ck = load_checkpoint(out / "ckpt_latest.pt")
    assert ck.step == 7 and ck.trainer["tokens_seen"] == 7 * 64
    assert ck.tokenizer == '{"fake": "tokenizer"}'
    assert ck.model_config.vocab_size == VOCAB  # 48 is a multiple of 16
    assert ck.train_config["data"]["batch_size"] == 4
    ck.build_model()  # the weights fit the config
    recs = read_metrics(out)
    best = load_checkpoint(out / "ckpt_best.pt")
    assert best.metrics["val_loss"] == pytest.approx(min(r["val_loss"] for r in recs
                                                         if "val_loss" in r))
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    for r in steps:
        for key in ("lr", "grad_norm", "tokens_per_sec", "mfu", "elapsed_s"):
            assert key in r and math.isfinite(r[key])
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
        assert r["tokens"] == r["step"] * 64
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]
    for r in evals:
        # bytes per token is 3 in this fixture
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / 3, rel=1e-6)
        assert r["val_tokens"] == 699


def test_loss_decreases(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path / "r", data_dir, max_steps=60, eval_interval=0, save_interval=0)
    summary = train(cfg)
    first = read_metrics(tmp_path / "r")[0]["loss"]
    assert first == pytest.approx(math.log(VOCAB), rel=0.15)
    # the chain has 2 successors per symbol: optimum is ln 2 ~ 0.69 nats/token
    assert summary["val_loss"] < 0.6 * first


def test_grad_accumulation_matches_large_batch(tmp_path: Path, data_dir: Path) -> None:
    base = {"data__sampling": "sequential", "max_steps": 2, "eval_interval": 0,
            "save_interval": 0, "optim__grad_clip": 0.0}
    train(tiny_cfg(tmp_path / "big", data_dir, data__batch_size=8, **base))
    train(tiny_cfg(tmp_path / "acc", data_dir, data__batch_size=8, data__micro_batch_size=2,
                   **base))
    a = load_checkpoint(tmp_path / "big" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "acc" / "ckpt_latest.pt")
    la = [r["loss"] for r in read_metrics(tmp_path / "big") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "acc") if "loss" in r]
    assert a.trainer["data"] == b.trainer["data"]  # the same global batches
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5)
    assert la == pytest.approx(lb, rel=1e-5)


def test_grad_accumulation_bf16_autocast(tmp_path: Path, data_dir: Path) -> None:
    # The bf16 autocast path: micro-batches round differently from one big batch (8 bits of
    # mantissa), so the gradients agree to bf16 precision, not fp32's.
    from smallgpt.train import Trainer

    grads = []
    for name, micro in (("big", 0), ("acc", 2)):
        t = Trainer(tiny_cfg(tmp_path / name, data_dir, data__batch_size=8, dtype="bfloat16",
                             data__micro_batch_size=micro, data__sampling="sequential"))
        assert t.dtype == torch.bfloat16
        loss = float(t.forward_backward())
        grads.append((loss, torch.cat([p.grad.flatten() for p in t.model.parameters()])))
        t.close()
    (la, ga), (lb, gb) = grads
    assert la == pytest.approx(lb, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.999
    assert float(gb.norm()) == pytest.approx(float(ga.norm()), rel=2e-2)


def test_resume_is_bit_identical(tmp_path: Path, data_dir: Path) -> None:
    # dropout > 0 so the torch RNG state matters; random windows so the data RNG matters.
    extra = {"model__dropout": 0.1, "optim__decay_steps": 8, "eval_interval": 4,
             "save_interval": 0}
    straight = tiny_cfg(tmp_path / "straight", data_dir, max_steps=8, **extra)
    train(straight)
    half = tiny_cfg(tmp_path / "halves", data_dir, max_steps=4, **extra)
    assert train(half)["step"] == 4
    again = tiny_cfg(tmp_path / "halves", data_dir, max_steps=8, **extra)
    assert train(again, resume=True)["step"] == 8
    a = load_checkpoint(tmp_path / "straight" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "halves" / "ckpt_latest.pt")
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    sa, sb = a.trainer["optimizer"]["state"], b.trainer["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name]["exp_avg"], sb[name]["exp_avg"])
        assert torch.equal(sa[name]["exp_avg_sq"], sb[name]["exp_avg_sq"])
    la = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight") if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "halves") if "loss" in r]
    assert la == lb
    assert a.trainer["data"] == b.trainer["data"]


def test_resume_reuses_the_thread_count(tmp_path: Path, data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # threads = 0 (auto) follows the machine's load; a resumed run must reuse the count the
    # run started with or it would not be bit-exact. Pretend the load changed in between.
    calls: List[int] = []

    def auto(answer: int) -> Any:
        def f() -> int:
            calls.append(answer)
            return answer
        return f

    monkeypatch.setattr(trainer_module, "auto_threads", auto(1))
    cfg = tiny_cfg(tmp_path / "t", data_dir, max_steps=2, threads=0, eval_interval=0)
    train(cfg)
    assert load_checkpoint(tmp_path / "t" / "ckpt_latest.pt").trainer["threads"] == 1
    monkeypatch.setattr(trainer_module, "auto_threads", auto(2))
    before = torch.get_num_threads()
    try:
        train(tiny_cfg(tmp_path / "t", data_dir, max_steps=3, threads=0, eval_interval=0),
              resume=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert calls == [1]  # the resumed run did not ask the machine again
    ck = load_checkpoint(tmp_path / "t" / "ckpt_latest.pt")
    assert ck.trainer["threads"] == 1 and ck.step == 3


def test_fp16_autocast_with_grad_scaler_on_cpu(tmp_path: Path, data_dir: Path) -> None:
    """fp16 takes the GradScaler path of older GPUs, on the CPU too: it trains, the scaler's
    state is checkpointed and resumed bit-exactly, and an overflowing step is skipped with the
    scale backed off (parameters untouched)."""
    from smallgpt.train import Trainer

    extra = {"dtype": "float16", "optim__decay_steps": 6, "eval_interval": 0,
             "save_interval": 0}
    train(tiny_cfg(tmp_path / "straight", data_dir, max_steps=6, **extra))
    train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=3, **extra))
    train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=6, **extra), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "halves" / "ckpt_latest.pt")
    assert a.trainer["scaler"]["scale"] == b.trainer["scaler"]["scale"] > 1.0
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    losses = [r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r]
    assert losses[-1] < losses[0]
    t = Trainer(tiny_cfg(tmp_path / "overflow", data_dir, **extra))
    try:
        assert t.scaler.is_enabled() and t.dtype == torch.float16
        t.train_step()  # an ordinary step; then a scale that fp16 gradients overflow at
        t.scaler.update(new_scale=1e30)
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        stats = t.train_step()
        assert not math.isfinite(stats["grad_norm"])
        assert t.scaler.get_scale() == pytest.approx(0.5e30)
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        t.close()


def test_gpu_peak_table_is_exact_by_name_and_memory() -> None:
    from smallgpt.train.hardware import GPU_PEAKS, gpu_peak

    gib = 2**30

    def half(name: str, memory_gib: float) -> Any:
        entry = gpu_peak(name, int(memory_gib * gib))
        return entry.half if entry else None

    # memory as torch.cuda.get_device_properties reports it
    assert half("NVIDIA L4", 22.5) == 121e12
    assert half("NVIDIA L40", 44.5) == 181e12
    assert half("NVIDIA L40S", 44.5) == 362e12
    assert half("NVIDIA H100 80GB HBM3", 79.1) == 989.4e12
    assert half("NVIDIA H100 PCIe", 79.6) == 756.5e12
    assert half("NVIDIA H100 NVL", 93.6) == 835.5e12
    assert half("NVIDIA H200", 139.8) == 989.4e12
    assert half("NVIDIA H200 NVL", 139.8) == 835.5e12
    assert half("NVIDIA B200", 178.4) == 2250e12
    assert half("NVIDIA A100-SXM4-40GB", 39.4) == half("NVIDIA A100-SXM4-80GB", 79.2) == 312e12
    assert half("NVIDIA A100-PCIE-40GB", 39.4) == half("NVIDIA A100 80GB PCIe", 79.2) == 312e12
    assert half("NVIDIA GeForce RTX 4090", 23.6) == 165.2e12
    assert half("NVIDIA GeForce RTX 5090", 31.4) == 209.5e12
    assert gpu_peak("NVIDIA L4", int(22.5 * gib)).single == 60e12  # type: ignore[union-attr]
    assert half("  nvidia   h200 ", 139.8) == 989.4e12  # spacing and case only
    # never a guess: a substring, another memory size, a MIG slice, an unknown card
    assert half("NVIDIA H100", 79.1) is None
    assert half("NVIDIA H200", 79.1) is None
    assert half("NVIDIA L40", 22.5) is None
    assert half("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 9.5) is None
    assert half("NVIDIA RTX 6000 Ada Generation", 47.5) is None
    names = [e.name for e in GPU_PEAKS]
    assert len(names) == len(set(names))
    assert all(e.half >= e.single > 0 for e in GPU_PEAKS)


def test_unknown_peak_gives_null_mfu_said_once(tmp_path: Path, data_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, dtype: 0.0)
    train(tiny_cfg(tmp_path / "r", data_dir, max_steps=3, eval_interval=0))
    recs = [r for r in read_metrics(tmp_path / "r") if "tokens_per_sec" in r]
    assert len(recs) == 3 and all(r["mfu"] is None for r in recs)
    out = capsys.readouterr().out
    assert out.count("MFU is not reported") == 1
    with pytest.raises(HardwareError, match="SMALLGPT_PEAK_FLOPS"):
        monkeypatch.setenv("SMALLGPT_PEAK_FLOPS", "-1")
        peak_flops(torch.device("cpu"), torch.float32)


def test_max_time_counts_every_session(tmp_path: Path, data_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The time budget covers the whole run: a resumed session gets what the earlier ones
    left, and a run that used it up stops at once when resumed."""
    monkeypatch.setattr(trainer_module, "time", FakeClock(0.01))
    extra = {"max_time": 2.0, "eval_interval": 0, "save_interval": 0, "log_interval": 1}
    straight = train(tiny_cfg(tmp_path / "straight", data_dir, max_steps=0, **extra))
    assert straight["stopped"] == "max_time"
    n = straight["step"]
    first = train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=n // 2, **extra))
    assert first["stopped"] == "max_steps"
    second = train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=0, **extra), resume=True)
    assert second["stopped"] == "max_time"
    assert first["elapsed_s"] < second["elapsed_s"] <= 2.0
    # the second session ran about the other half (a budget restarted at resume: n more)
    assert n // 2 < second["step"] <= n + n // 4
    elapsed = [r["elapsed_s"] for r in read_metrics(tmp_path / "halves") if "loss" in r]
    assert elapsed == sorted(elapsed)  # the clock continues across the resume
    again = train(tiny_cfg(tmp_path / "halves", data_dir, max_steps=0, **extra), resume=True)
    assert again["stopped"] == "max_time" and again["step"] == second["step"]


def test_resume_without_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_cfg(tmp_path / "empty", data_dir), resume=True)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, "truncated", "foreign", "pickle"])
def test_resume_from_corrupt_checkpoint(tmp_path: Path, data_dir: Path, content: Any) -> None:
    out = tmp_path / "c"
    train(tiny_cfg(out, data_dir, max_steps=1, eval_interval=0))
    latest = out / "ckpt_latest.pt"
    if content == "truncated":
        data = latest.read_bytes()
        latest.unlink()
        latest.write_bytes(data[: len(data) // 2])
    elif content == "foreign":
        latest.unlink()
        torch.save({"weights": torch.zeros(3)}, latest)
    elif content == "pickle":
        latest.unlink()
        torch.save({"model": {}, "model_config": {}, "evil": FakeClock(1.0)}, latest)
    else:
        latest.unlink()
        latest.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(out, data_dir, max_steps=2), resume=True)
    assert str(latest) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("log_interval", [5, 100000])
def test_max_time_covers_the_final_eval(tmp_path: Path, data_dir: Path, log_interval: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # (with a log interval longer than the run, the budget must still hold)
    clock = FakeClock(0.01)
    monkeypatch.setattr(trainer_module, "time", clock)
    cfg = tiny_cfg(tmp_path / "t", data_dir, max_steps=0, max_time=2.0, eval_interval=0,
                   log_interval=log_interval)
    summary = train(cfg)
    assert summary["stopped"] == "max_time"
    assert summary["step"] > 5
    # The trainer's own clock (setup, steps, final evaluation, checkpoint) stays in budget.
    assert summary["elapsed_s"] <= cfg.max_time
    recs = read_metrics(tmp_path / "t")
    assert recs[-1].get("final") and "val_bpb" in recs[-1]
    # the cosine follows the clock: the last logged lr is close to min_lr
    lrs = [r["lr"] for r in recs if "lr" in r]
    if log_interval == 5:
        assert lrs[-1] < 0.35 * cfg.optim.lr


@pytest.mark.parametrize("eval_tokens", [32, 0])
def test_max_time_cuts_a_final_eval_that_would_not_fit(tmp_path: Path, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       eval_tokens: int) -> None:
    # Evaluation is made to look slow (each clock reading in it costs a lot), so the whole
    # split cannot be read in the budget: the final evaluation reads a prefix and says so.
    clock = FakeClock(0.01)
    monkeypatch.setattr(trainer_module, "time", clock)
    real = trainer_module.Trainer.evaluate

    def slow(self: Any, *a: Any, **kw: Any) -> Any:
        clock.tick = 1.0
        try:
            return real(self, *a, **kw)
        finally:
            clock.tick = 0.01

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", slow)
    cfg = tiny_cfg(tmp_path / "t", data_dir, max_steps=0, max_time=20.0, eval_interval=20,
                   log_interval=5, data__eval_tokens=eval_tokens)
    seen: List[Dict[str, Any]] = []
    summary = train(cfg, on_log=seen.append)
    assert summary["stopped"] == "max_time"
    if eval_tokens:
        assert 32 <= summary["val_tokens"] < 699
        assert summary["elapsed_s"] <= cfg.max_time
    else:  # evaluations during the run read the whole split: so does the final one, and
        # ckpt_best compares like with like (never a prefix's loss against the whole split's)
        assert {r["val_tokens"] for r in seen if "val_tokens" in r} == {summary["val_tokens"]}
        assert summary["val_tokens"] == 699


def test_best_checkpoint_compares_like_with_like(tmp_path: Path, data_dir: Path) -> None:
    # Mid-run evaluations read a 64-token prefix; the final one the whole split. ckpt_best must
    # be chosen on the same prefix every time (the whole split is harder or easier than it).
    cfg = tiny_cfg(tmp_path / "b", data_dir, max_steps=40, eval_interval=10, save_interval=0,
                   data__eval_tokens=64)
    seen: List[Dict[str, Any]] = []
    summary = train(cfg, on_log=seen.append)
    best = load_checkpoint(tmp_path / "b" / "ckpt_best.pt")
    assert summary["best_val_loss"] == pytest.approx(min(
        [r["val_loss"] for r in seen if "val_loss" in r and not r.get("final")]
        + [summary["best_val_loss"]]))
    final = load_checkpoint(tmp_path / "b" / "ckpt_latest.pt")
    # The loss keeps falling on this chain, so the final model is the best on the prefix too.
    assert best.step == final.step == 40


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path: Path, data_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = GPT.forward

    def poisoned(self: GPT, idx: torch.Tensor, targets: Any = None, **kw: Any) -> Any:
        res = original(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 5:
                return res[0], res[1] * float("nan")
        return res

    monkeypatch.setattr(GPT, "forward", poisoned)
    out = tmp_path / "nan"
    cfg = tiny_cfg(out, data_dir, max_steps=10, save_interval=2, eval_interval=0)
    with pytest.raises(TrainingDiverged, match="step 5"):
        train(cfg)
    ck = load_checkpoint(out / "ckpt_latest.pt")
    assert ck.step == 4
    assert all(torch.isfinite(v).all() for v in ck.model.values())


def test_bad_inputs(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(TrainingError, match="does not exist"):
        train(tiny_cfg(tmp_path / "x", tmp_path / "missing"))
    with pytest.raises(TrainingError, match="vocabulary size 48"):
        train(tiny_cfg(tmp_path / "x", data_dir, model__vocab_size=32))
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_cfg(tmp_path / "x", data_dir, optim__lr=-1.0))
    with pytest.raises(ConfigError, match="divisible"):
        train(tiny_cfg(tmp_path / "x", data_dir, model__n_head=3))
    with pytest.raises(ConfigError, match="seed"):
        train(tiny_cfg(tmp_path / "x", data_dir, seed=2**70))
    with pytest.raises(HardwareError, match="tpu"):
        train(tiny_cfg(tmp_path / "x", data_dir, device="tpu"))
    with pytest.raises(TrainingError, match="not divisible by data.micro_batch_size"):
        train(tiny_cfg(tmp_path / "x", data_dir, data__micro_batch_size=3))
    with pytest.raises(ConfigError, match="finite"):
        train(tiny_cfg(tmp_path / "x", data_dir, optim__lr=float("nan")))


def test_token_ids_beyond_the_vocabulary_are_caught_up_front(tmp_path: Path,
                                                             data_dir: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    toks = synthetic_tokens(6000, 1)
    toks[5000] = 60  # the meta says 48
    write_shard(bad / "train_000000.bin", toks)
    with pytest.raises(TrainingError, match="token id 60"):
        train(tiny_cfg(tmp_path / "x", bad))
    assert not (tmp_path / "x" / "ckpt_latest.pt").exists()


def test_used_run_folder_is_refused_unless_asked(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    train(tiny_cfg(out, data_dir, max_steps=2, eval_interval=0))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="--resume.*--overwrite"):
        train(tiny_cfg(out, data_dir, max_steps=3))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    summary = train(tiny_cfg(out, data_dir, max_steps=3, eval_interval=0), overwrite=True)
    assert summary["step"] == 3
    assert load_checkpoint(out / "ckpt_latest.pt").step == 3
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        train(tiny_cfg(not_a_folder, data_dir))


def test_unwritable_out_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "f").write_text("x")  # a folder cannot be made below a file, even by root
    with pytest.raises(CheckpointError, match="cannot write to --out"):
        train(tiny_cfg(tmp_path / "f" / "run", data_dir))


# ---------------------------------------------------------------- distributed


def test_collectives_run_on_the_compute_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # NCCL cannot reduce CPU tensors: every tensor the trainer sends through a collective must
    # live on the compute device. A "meta" device stands in for a GPU here.
    import torch.distributed as dist

    from smallgpt.train.distributed import Dist, backend_for

    class Sent(Exception):
        pass

    seen: List[torch.device] = []

    def fake_all_reduce(t: torch.Tensor, op: Any = None) -> None:
        seen.append(t.device)
        raise Sent  # a meta tensor cannot be read back; what matters is where it was made

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    d = Dist(rank=0, world_size=2, enabled=True, device=torch.device("meta"))
    for call in (lambda: d.agree(False, [1.0, 2.0]),
                 lambda: d.all_reduce_sum(torch.zeros(2, device="meta")),
                 lambda: d.all_reduce_max(torch.zeros(2, device="meta"))):
        with pytest.raises(Sent):
            call()
    assert seen == [torch.device("meta")] * 3
    with pytest.raises(RuntimeError, match="compute device"):
        d.all_reduce_sum(torch.zeros(2))
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, cfg: TrainConfig, result_dir: str,
                 job: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    if job == "grad":
        _save_first_gradient(cfg, os.path.join(result_dir, f"grad{rank}.pt"))
        return
    summary = train(cfg, resume=job == "resume")
    torch.save({"summary": summary}, os.path.join(result_dir, f"rank{rank}.pt"))


def _save_first_gradient(cfg: TrainConfig, path: str) -> None:
    from smallgpt.train import Trainer

    t = Trainer(cfg)
    try:
        loss = t.forward_backward()
        grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters()}
        torch.save({"loss": float(loss), "grads": grads,
                    "tokens_per_step": t.tokens_per_step,
                    "accum": t.data.train.accum_steps}, path)
    finally:
        t.close()


def _spawn(tmp_path: Path, cfg: TrainConfig, job: str = "train", world: int = 2) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(world, _free_port(), cfg, str(tmp_path), job), nprocs=world,
             join=True)


def test_global_batch_gradient_matches_one_process(tmp_path: Path, data_dir: Path) -> None:
    # The same global batch (8 sequences) on 1 process (2 micro-steps of 4) and on 2 processes
    # (1 micro-step of 4 each): same tokens per step, same gradient to fp32 rounding.
    base = {"data__batch_size": 8, "data__micro_batch_size": 4, "eval_interval": 0}
    _spawn(tmp_path, tiny_cfg(tmp_path / "ddp", data_dir, **base), job="grad")
    _save_first_gradient(tiny_cfg(tmp_path / "one", data_dir, **base), str(tmp_path / "one.pt"))
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = [torch.load(tmp_path / f"grad{r}.pt", weights_only=True) for r in (0, 1)]
    assert one["accum"] == 2 and two[0]["accum"] == 1
    assert one["tokens_per_step"] == two[0]["tokens_per_step"] == 8 * 16
    assert two[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for name, g in one["grads"].items():
        # DDP averages the gradient over the ranks: both hold the global batch's gradient.
        torch.testing.assert_close(two[0]["grads"][name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two[1]["grads"][name], g, rtol=1e-4, atol=1e-6)


def test_ddp_two_gloo_processes_match_single_process(tmp_path: Path, data_dir: Path) -> None:
    base = {"max_steps": 3, "eval_interval": 0, "save_interval": 0, "data__batch_size": 4,
            "data__micro_batch_size": 1}
    _spawn(tmp_path, tiny_cfg(tmp_path / "ddp", data_dir, **base))
    train(tiny_cfg(tmp_path / "single", data_dir, **base))
    a = load_checkpoint(tmp_path / "ddp" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "single" / "ckpt_latest.pt")
    assert a.trainer["world_size"] == 2 and len(a.trainer["rng"]) == 2
    for k in a.model:  # Adam divides by tiny second moments: fp32 rounding shows a little
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-3, atol=1e-4)
    la = [r["loss"] for r in read_metrics(tmp_path / "ddp") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "single") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=False)["summary"]
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=False)["summary"]
    assert s0["step"] == s1["step"] == 3
    assert s0["tokens_per_step"] == 4 * 16


def test_ddp_code_path_with_one_process(tmp_path: Path, data_dir: Path) -> None:
    # `--ddp` without torchrun (or under torchrun --nproc_per_node=1) runs the distributed code
    # path in one process: same results as the plain path.
    base = {"max_steps": 3, "eval_interval": 2, "save_interval": 0}
    summary = train(tiny_cfg(tmp_path / "ddp1", data_dir, parallel="ddp", **base))
    plain = train(tiny_cfg(tmp_path / "plain", data_dir, **base))
    assert summary["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
    a = load_checkpoint(tmp_path / "ddp1" / "ckpt_latest.pt")
    b = load_checkpoint(tmp_path / "plain" / "ckpt_latest.pt")
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-6, atol=1e-7)


def test_fsdp2_with_muon_resumes_under_fsdp2_ddp_and_one_process(tmp_path: Path,
                                                                  data_dir: Path) -> None:
    """FSDP2 with 2 gloo processes, Muon on its sharded (DTensor) block matrices: the losses of
    one process over the same global batch; its checkpoint (full tensors) resumes under FSDP2,
    under DDP and in one process, each continuing the straight run."""
    import shutil

    base = {"eval_interval": 2, "save_interval": 0, "data__batch_size": 4,
            "data__micro_batch_size": 1, "optim__name": "muon", "optim__decay_steps": 4}
    _spawn(tmp_path, tiny_cfg(tmp_path / "fsdp", data_dir, max_steps=2, parallel="fsdp",
                              **base))
    for name in ("ddp", "one"):
        shutil.copytree(tmp_path / "fsdp", tmp_path / name)
    _spawn(tmp_path, tiny_cfg(tmp_path / "fsdp", data_dir, max_steps=4, parallel="fsdp",
                              **base), job="resume")
    _spawn(tmp_path, tiny_cfg(tmp_path / "ddp", data_dir, max_steps=4, parallel="ddp",
                              **base), job="resume")
    train(tiny_cfg(tmp_path / "one", data_dir, max_steps=4, **base), resume=True)
    train(tiny_cfg(tmp_path / "straight", data_dir, max_steps=4, **base))
    ref = [r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r]
    b = load_checkpoint(tmp_path / "straight" / "ckpt_latest.pt")
    assert len(ref) == 4
    for name in ("fsdp", "ddp", "one"):
        got = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
        assert got == pytest.approx(ref, rel=1e-4), name
        a = load_checkpoint(tmp_path / name / "ckpt_latest.pt")
        assert a.step == 4 and a.model.keys() == b.model.keys()
        for k in a.model:  # full tensors; Adam divides by tiny second moments: fp32 noise
            torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-3, atol=1e-4)
    assert load_checkpoint(tmp_path / "ddp" / "ckpt_latest.pt").trainer["world_size"] == 2
