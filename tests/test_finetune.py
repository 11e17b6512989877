"""Fine-tuning (``--init-from``) and ``--eval-only``, against a random GPT-2 that
``transformers`` saved: the files a user gets from the Hugging Face hub, minus the download.

The GPT-2 folder holds ``config.json``, ``model.safetensors``, ``vocab.json`` and
``merges.txt`` (the committed GPT-2 vocabulary under Hugging Face's names), and the shards are
made from it with ``smallgpt-tokenize --gpt2 FOLDER``: README's walk-through in miniature.
Every numeric test pins ``dtype = "float32"``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List

import numpy as np
import pytest
import torch
from helpers import device_under_test, on_cuda

import smallgpt
from smallgpt.checkpoint import Checkpoint, CheckpointError
from smallgpt.cli.train import main as train_main
from smallgpt.config import TrainConfig, merge_dict
from smallgpt.corpus import tokenize_corpus
from smallgpt.data import read_shard, write_meta, write_shard
from smallgpt.train import Trainer, TrainingError, evaluate_only, train

if TYPE_CHECKING:  # imported where used: the DDP test's worker processes skip it (seconds)
    import transformers

FIXTURES = Path(__file__).parent / "fixtures"
PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)
CPU = ["--device", "cpu", "--dtype", "float32", "--set", "threads=1", "--no-progress",
       "--no-plot"]


@pytest.fixture(scope="module")
def hf_dir(hf_gpt2: Path) -> Path:
    return hf_gpt2


@pytest.fixture(scope="module")
def gpt2_shards(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("gpt2_shards")
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")[:30000]
    (root / "input.txt").write_text(text, encoding="utf-8")
    # --gpt2 takes the Hugging Face folder itself (vocab.json + merges.txt)
    tokenize_corpus([root / "input.txt"], root / "shards", gpt2_dir=hf_dir, val_fraction=0.1)
    return root / "shards"


def load_hf(folder: Path) -> transformers.GPT2LMHeadModel:
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


def ft_cfg(out: Path, data: Path, init_from: Path, **top: Any) -> TrainConfig:
    cfg = TrainConfig()
    merge_dict(cfg, {
        "data": {"path": str(data), "batch_size": 4, "seq_len": 32},
        "optim": {"lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0},
        "out": str(out), "init_from": str(init_from), "max_steps": 4, "eval_interval": 0,
        "log_interval": 1, "progress": False, "plot": False, "device": "cpu", "threads": 1,
        "dtype": "float32", **top,
    })
    return cfg


def hf_split_loss(hf: transformers.GPT2LMHeadModel, shard: Path, window: int) -> Dict[str, float]:
    """Summed loss over a whole split the way the trainer reads it (consecutive windows that
    predict every token but the first), computed by transformers."""
    tokens = torch.from_numpy(read_shard(shard).astype(np.int64))
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, window):
            seg = tokens[start : start + window + 1][None]
            out = hf(input_ids=seg, labels=seg)  # transformers shifts the labels itself
            n = seg.shape[1] - 1
            nats += float(out.loss) * n
            count += n
    return {"nats": nats, "count": count}


def run_cli(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "smallgpt.cli.train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def read_metrics(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.device
def test_first_step_equals_transformers(tmp_path: Path, hf_dir: Path, gpt2_shards: Path) -> None:
    """The first batch's loss and gradient are what transformers computes on that batch (on
    ``$SMALLGPT_TEST_DEVICE``; fp32 on both sides, TF32 off on a GPU)."""
    device = device_under_test()
    t = Trainer(ft_cfg(tmp_path / "run", gpt2_shards, hf_dir, device=device))
    # The trainer turns TF32 on for CUDA runs; this test compares fp32 arithmetic.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        assert t.model_config.vocab_size == 50257 and t.model_config.block_size == 64
        state = t.data.train.state_dict()
        x, y = t.data.train.next_batch()
        t.data.train.load_state_dict(state)  # forward_backward reads this same batch
        loss = float(t.forward_backward())
        ours = t.model.transformer.wte.weight.grad.clone()
    finally:
        t.close()
    hf = load_hf(hf_dir).to(device)
    rows = torch.cat([x, y[:, -1:]], dim=1).to(device)  # x plus the last target: labels = ids
    ref = hf(input_ids=rows, labels=rows).loss
    ref.backward()
    # other kernels on a GPU sum in another order
    rel, rtol, atol = (1e-5, 1e-3, 1e-6) if on_cuda() else (1e-6, 1e-4, 1e-7)
    assert loss == pytest.approx(ref.item(), rel=rel)
    assert loss == pytest.approx(math.log(50257), rel=0.02)  # an untrained model
    torch.testing.assert_close(ours, hf.transformer.wte.weight.grad, rtol=rtol, atol=atol)


def test_finetune_cli_lowers_the_loss_and_leaves_a_normal_run(
        tmp_path: Path, hf_dir: Path, gpt2_shards: Path, capsys: pytest.CaptureFixture) -> None:
    """README's workflow: --preset finetune-shakespeare --init-from FOLDER, then sample and
    resume the run like any other."""
    out = tmp_path / "ft"
    common = ["--data", str(gpt2_shards), "--data.batch_size", "4", "--data.micro_batch_size",
              "2", "--data.seq_len", "32", *CPU]
    assert train_main(["--eval-only", "--init-from", str(hf_dir), *common]) == 0
    before = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert train_main(["--preset", "finetune-shakespeare", "--init-from", str(hf_dir),
                       "--out", str(out), "--max-steps", "8", "--eval-interval", "4",
                       "--optim.lr", "3e-3", "--optim.min_lr", "3e-3", *common]) == 0
    capsys.readouterr()
    recs = read_metrics(out)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["val_loss"] < before["val_loss"] - 0.5
    assert evals[-1]["val_tokens"] == before["val_tokens"]
    lrs = [r["lr"] for r in recs if "lr" in r]
    assert lrs == [pytest.approx(3e-3)] * 8  # constant
    # a normal smallgpt run: checkpoint with the tokenizer, config with the pretrained shape
    ck = Checkpoint.load(out / "ckpt_latest.pt")
    assert ck.step == 8 and ck.model_config.n_layer == 2 and ck.model_config.n_embd == 32
    assert ck.build_tokenizer().vocab_size == 50257
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(hf_dir) and config["model"]["block_size"] == 64
    from smallgpt.cli.sample import main as sample_main

    assert sample_main(["--checkpoint", str(out), "--prompt", "The", "--max-new-tokens", "4",
                        "--seed", "0", "--no-stream", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert train_main(["--resume", "--out", str(out), "--max-steps", "10", *CPU]) == 0
    capsys.readouterr()
    assert Checkpoint.load(out / "ckpt_latest.pt").step == 10
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 11))


def test_dropout_may_change_shape_may_not(tmp_path: Path, hf_dir: Path,
                                          gpt2_shards: Path) -> None:
    cfg = ft_cfg(tmp_path / "d", gpt2_shards, hf_dir)
    cfg.model.dropout = 0.1
    t = Trainer(cfg, model_overrides=["model.dropout"])
    assert t.model_config.dropout == 0.1 and t.model_config.n_embd == 32
    t.close()
    for key, value in (("n_layer", 3), ("n_embd", 48), ("block_size", 128),
                       ("position", "rope")):
        cfg = ft_cfg(tmp_path / key, gpt2_shards, hf_dir)
        setattr(cfg.model, key, value)
        with pytest.raises(TrainingError, match=f"model.{key} = .*only model.dropout"):
            Trainer(cfg, model_overrides=[f"model.{key}"])
        assert not (tmp_path / key).exists()
    # a setting that agrees with the pretrained model is fine
    cfg = ft_cfg(tmp_path / "same", gpt2_shards, hf_dir)
    cfg.model.n_layer = 2
    Trainer(cfg, model_overrides=["model.n_layer"]).close()


def test_vocabulary_mismatch_is_one_line_naming_both_sizes(tmp_path: Path, hf_dir: Path) -> None:
    data = tmp_path / "small-vocab"
    data.mkdir()
    for split, n in (("train", 3000), ("val", 300)):
        write_shard(data / f"{split}_000000.bin", np.arange(n) % 300)
    write_meta(data, {"format": "smallgpt-shards", "version": 1, "vocab_size": 300,
                      "dtype": "uint16", "splits": {
                          s: {"documents": 1, "tokens": n, "bytes": n,
                              "shards": [f"{s}_000000.bin"]}
                          for s, n in (("train", 3000), ("val", 300))}})
    with pytest.raises(TrainingError) as e:
        Trainer(ft_cfg(tmp_path / "run", data, hf_dir))
    msg = str(e.value)
    assert "300-token vocabulary" in msg and "50257 tokens" in msg and "--gpt2" in msg
    assert "\n" not in msg and not (tmp_path / "run").exists()
    res = run_cli(["--init-from", str(hf_dir), "--data", str(data), "--out", "o",
                   "--max-steps", "1", "--device", "cpu"], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert res.stderr.startswith("smallgpt-train: error: ") and "300" in res.stderr
    assert not (tmp_path / "o").exists()


def test_another_tokenizer_of_the_same_size_is_refused(tmp_path: Path, hf_dir: Path,
                                                       gpt2_shards: Path) -> None:
    # Same ids, same size, another tokenizer (GPT-2's pattern swapped for cl100k's).
    data = tmp_path / "other"
    shutil.copytree(gpt2_shards, data)
    tok = json.loads((data / "tokenizer.json").read_text())
    tok["pattern"] = "cl100k"
    (data / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TrainingError, match="50257-token vocabulary.*another tokenizer"):
        Trainer(ft_cfg(tmp_path / "run", data, hf_dir))


def test_bad_init_from_keeps_the_old_run(tmp_path: Path, hf_dir: Path,
                                         gpt2_shards: Path) -> None:
    out = tmp_path / "run"
    train(ft_cfg(out, gpt2_shards, hf_dir, max_steps=1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")  # no weights: not a model folder
    for bad, needle in ((not_a_model, "no checkpoint"), (tmp_path / "missing", "not found")):
        with pytest.raises(CheckpointError, match=f"--init-from: .*{needle}"):
            train(ft_cfg(out, gpt2_shards, bad), overwrite=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    res = run_cli(["--init-from", str(not_a_model), "--data", str(gpt2_shards), "--out",
                   str(tmp_path / "new"), "--max-steps", "1", "--device", "cpu"], cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("smallgpt-train: error: --init-from: no checkpoint")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- evaluation only


def test_eval_only_whole_split_equals_transformers(tmp_path: Path, hf_dir: Path,
                                                   gpt2_shards: Path) -> None:
    """One JSON line, last on stdout; the loss transformers computes over the whole split;
    nothing written."""
    res = run_cli(["--eval-only", "--init-from", str(hf_dir), "--data", str(gpt2_shards),
                   "--data.seq_len", "48", "--data.eval_batch_size", "3", *CPU], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    ref = hf_split_loss(load_hf(hf_dir), gpt2_shards / "val_000000.bin", 48)
    meta = json.loads((gpt2_shards / "meta.json").read_text())
    assert result["val_tokens"] == ref["count"] == meta["splits"]["val"]["tokens"] - 1
    assert result["val_loss"] == pytest.approx(ref["nats"] / ref["count"], rel=1e-5)
    assert result["val_bpb"] == pytest.approx(
        ref["nats"] / math.log(2) / meta["splits"]["val"]["bytes"], rel=1e-5)
    assert result["step"] == 0
    assert list(tmp_path.iterdir()) == []  # no out/ folder, no checkpoint


def test_eval_only_of_a_run_writes_nothing(tmp_path: Path, hf_dir: Path,
                                           gpt2_shards: Path) -> None:
    out = tmp_path / "run"
    summary = train(ft_cfg(out, gpt2_shards, hf_dir, max_steps=3))
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    res = run_cli(["--eval-only", "--out", str(out), *CPU], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["step"] == 3 and result["val_tokens"] == summary["val_tokens"]
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == files
    # the same through --init-from RUN_FOLDER (ckpt_best.pt, the final model here)
    direct = evaluate_only(ft_cfg(tmp_path / "unused", gpt2_shards, out))
    assert direct is not None and direct["val_loss"] == pytest.approx(result["val_loss"],
                                                                      rel=1e-6)
    assert not (tmp_path / "unused").exists()
    missing = run_cli(["--eval-only", "--out", str(tmp_path / "none"), *CPU], cwd=tmp_path)
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
    assert missing.stderr.count("\n") == 1


def _eval_worker(rank: int, world: int, port: int, cfg: TrainConfig, result_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = evaluate_only(cfg)
    torch.save({"result": result}, os.path.join(result_dir, f"eval{rank}.pt"))


def test_eval_only_under_two_processes_matches_one(tmp_path: Path, hf_dir: Path,
                                                   gpt2_shards: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ft_cfg(tmp_path / "unused", gpt2_shards, hf_dir)
    cfg.data.eval_batch_size = 2
    mp.spawn(_eval_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    one = evaluate_only(ft_cfg(tmp_path / "unused", gpt2_shards, hf_dir))
    two = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False)["result"] for r in (0, 1)]
    assert two[1] is None  # only rank 0 reports
    assert one is not None and two[0]["val_tokens"] == one["val_tokens"]
    assert two[0]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)


def test_eval_only_shows_a_progress_bar_on_a_terminal(hf_dir: Path, gpt2_shards: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ["--eval-only", "--init-from", str(hf_dir), "--data", str(gpt2_shards),
            "--device", "cpu", "--dtype", "float32", "--set", "threads=1",
            "--data.eval_batch_size", "4"]
    assert train_main(args) == 0
    captured = capsys.readouterr()
    windows = math.ceil(json.loads(captured.out.strip().splitlines()[-1])["val_tokens"] / 64)
    assert "evaluating" in captured.err and f"/{math.ceil(windows / 4)}" in captured.err
    assert train_main([*args, "--no-progress"]) == 0
    assert "evaluating" not in capsys.readouterr().err
