"""Weights & Biases and trackio logging (``--wandb PROJECT``, ``--trackio PROJECT``).

Two layers: small fake modules put in ``sys.modules`` pin down exactly what the trainer sends
(always run), and the real packages, when installed, run offline (``WANDB_MODE=offline``) and
locally (``TRACKIO_DIR``) in a subprocess, read back from what they wrote. A missing package
or a failing service is a one-line warning and the run goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

import smallgpt
from smallgpt.checkpoint import Checkpoint
from smallgpt.config import TrainConfig, merge_dict
from smallgpt.data import write_meta, write_shard
from smallgpt.train import train

PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("log_shards")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 3000), ("val", 300)):
        write_shard(root / f"{split}_000000.bin", rng.integers(0, 64, size=n))
        splits[split] = {"documents": 1, "tokens": n, "bytes": 2 * n,
                         "shards": [f"{split}_000000.bin"]}
    write_meta(root, {"format": "smallgpt-shards", "version": 1, "vocab_size": 64,
                      "dtype": "uint16", "splits": splits})
    return root


def cfg_for(out: Path, data: Path, **top: Any) -> TrainConfig:
    cfg = TrainConfig()
    merge_dict(cfg, {"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8},
                     "data": {"path": str(data), "batch_size": 2},
                     "out": str(out), "max_steps": 4, "eval_interval": 2, "log_interval": 1,
                     "save_interval": 0, "progress": False, "plot": False, "device": "cpu",
                     "threads": 1, "dtype": "float32", **top})
    return cfg


def jsonl(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(rec: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in rec.items() if k != "step" and not isinstance(v, bool)}


class Recorder:
    """What a fake logging package was asked to do."""

    def __init__(self) -> None:
        self.init: Dict[str, Any] = {}
        self.logs: List[tuple] = []
        self.finished = 0


def fake_wandb(rec: Recorder, fail_init: bool = False) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, data: Dict[str, float], step: int) -> None:
            rec.logs.append((step, data))

        def finish(self) -> None:
            rec.finished += 1

    def init(**kwargs: Any) -> Run:
        if fail_init:
            raise RuntimeError("api_key not configured (no-tty)\nsecond line")
        rec.init = kwargs
        return Run()

    mod.init = init  # type: ignore[attr-defined]
    return mod


def fake_trackio(rec: Recorder) -> types.ModuleType:
    mod = types.ModuleType("trackio")
    mod.init = lambda **kw: rec.init.update(kw)  # type: ignore[attr-defined]
    mod.log = lambda data, step: rec.logs.append((step, data))  # type: ignore[attr-defined]

    def finish() -> None:
        rec.finished += 1

    mod.finish = finish  # type: ignore[attr-defined]
    return mod


# ---------------------------------------------------------------- fakes: what is sent


def test_both_sinks_get_every_record(tmp_path: Path, data_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    w, t = Recorder(), Recorder()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(w))
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(t))
    out = tmp_path / "run"
    train(cfg_for(out, data_dir, wandb="proj-w", trackio="proj-t"))
    assert "warning" not in capsys.readouterr().err
    expected = [(r["step"], scalars(r)) for r in jsonl(out)]
    assert [s for s, _ in expected] == [1, 2, 3, 4, 4]  # steps, then the final evaluation
    assert "val_loss" in expected[1][1] and "lr" in expected[0][1]
    for rec, project in ((w, "proj-w"), (t, "proj-t")):
        assert rec.logs == expected
        assert rec.finished == 1
        assert rec.init["project"] == project and rec.init["name"] == "run"
        assert rec.init["config"]["model"]["n_embd"] == 16
    assert w.init["dir"] == str(out)


def test_missing_packages_warn_in_one_line(tmp_path: Path, data_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "trackio", None)
    out = tmp_path / "run"
    summary = train(cfg_for(out, data_dir, wandb="p", trackio="p"))
    assert summary["step"] == 4 and Checkpoint.load(out / "ckpt_latest.pt").step == 4
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert warnings == [
        "smallgpt-train: warning: wandb is not installed (pip install 'smallgpt[wandb]'); "
        "not logging to it",
        "smallgpt-train: warning: trackio is not installed (pip install 'smallgpt[trackio]'); "
        "not logging to it"]


def test_a_failing_service_never_stops_the_run(tmp_path: Path, data_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(Recorder(), fail_init=True))
    t = Recorder()
    broken = fake_trackio(t)

    def log(data: Dict[str, float], step: int) -> None:
        raise ConnectionError("gone")

    broken.log = log  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trackio", broken)
    out = tmp_path / "run"
    assert train(cfg_for(out, data_dir, wandb="p", trackio="p"))["step"] == 4
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert err == ["smallgpt-train: warning: wandb could not start (RuntimeError: api_key not "
                   "configured (no-tty)); not logging to it",
                   "smallgpt-train: warning: a logging sink failed (ConnectionError); "
                   "dropping it"]
    assert len(jsonl(out)) == 5 and t.finished == 0  # the dropped sink is not closed


def test_cli_flags_reach_the_config(capsys: pytest.CaptureFixture) -> None:
    from smallgpt.cli.train import main

    assert main(["--wandb", "my-proj", "--trackio", "other", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'wandb = "my-proj"' in out and 'trackio = "other"' in out


# ---------------------------------------------------------------- the real packages

REAL_RUN = r"""
import json, os, sys
from smallgpt.cli.train import main
code = main(sys.argv[1:])
result = {"code": code}
if "--trackio" in sys.argv:
    from trackio.sqlite_storage import SQLiteStorage
    logs = SQLiteStorage.get_logs(project="tproj", run="run")
    result["trackio"] = [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss")}
                         for r in logs]
print(json.dumps(result))
"""


def run_real(tmp_path: Path, data_dir: Path, *flags: str) -> Dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", TRACKIO_DIR=str(tmp_path / "tio"),
               WANDB_CONFIG_DIR=str(tmp_path / "wcfg"), WANDB_CACHE_DIR=str(tmp_path / "wc"),
               WANDB_DATA_DIR=str(tmp_path / "wd"), HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1")
    args = ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-steps", "4",
            "--max-time", "0", "--eval-interval", "2", "--log-interval", "1",
            "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16",
            "--model.block_size", "8", "--data.batch_size", "2", "--device", "cpu",
            "--dtype", "float32", "--no-progress", "--no-plot", *flags]
    res = subprocess.run([sys.executable, "-c", REAL_RUN, *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    return result


def test_real_wandb_offline(tmp_path: Path, data_dir: Path) -> None:
    pytest.importorskip("wandb")
    run_real(tmp_path, data_dir, "--wandb", "wproj")
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    for key in (b"val_loss", b"grad_norm", b"tokens_per_sec", b"n_embd"):
        assert key in blob, key  # the records and the config are in W&B's run file


def test_real_trackio_local(tmp_path: Path, data_dir: Path) -> None:
    pytest.importorskip("trackio")
    result = run_real(tmp_path, data_dir, "--trackio", "tproj")
    ours = jsonl(tmp_path / "run")
    got = result["trackio"]
    assert [r["step"] for r in got] == [r["step"] for r in ours]
    for theirs, mine in zip(got, ours):
        for key in ("loss", "val_loss"):
            if key in mine:
                assert theirs[key] == pytest.approx(mine[key], rel=1e-9)
    assert (tmp_path / "tio" / "tproj.db").is_file()
