"""The smallgpt-train command line, through real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

import smallgpt
from smallgpt.cli.train import main
from smallgpt.config import build_config, list_presets, validate
from smallgpt.data import write_meta, write_shard

PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)
TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16",
        "--model.block_size", "8", "--data.batch_size", "2", "--set", "progress=false",
        "--set", "plot=false", "--device", "cpu"]


def run_cli(args: List[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "smallgpt.cli.train", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_shards")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 4000), ("val", 400)):
        write_shard(root / f"{split}_000000.bin", rng.integers(0, 100, size=n))
        splits[split] = {"documents": 1, "tokens": n, "bytes": 2 * n,
                         "shards": [f"{split}_000000.bin"]}
    write_meta(root, {"format": "smallgpt-shards", "version": 1, "tokenizer": "tokenizer.json",
                      "vocab_size": 100, "eot_id": 0, "dtype": "uint16", "splits": splits})
    (root / "tokenizer.json").write_text("{}")
    return root


def assert_one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("smallgpt-train: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def test_presets_are_valid() -> None:
    assert {"shakespeare-cpu", "shakespeare-gpu", "gpt2-124m"} <= set(list_presets())
    for name in list_presets():
        # the preset as it is, and under budgets that select each [[by_time]] row, if any
        for overrides in ({}, {"max_time": 30.0}, {"max_time": 300.0}, {"max_time": 3600.0}):
            cfg = build_config(preset=name, overrides=overrides)
            validate(cfg)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "/nonexistent/shards"], "/nonexistent/shards"),
        (["--model.vocab_size", "64"], "vocabulary size 100"),
        (["--optim.lr", "-0.1"], "optim.lr must be positive"),
        (["--model.n_embd", "30", "--model.n_head", "4"], "divisible"),
    ],
)
def test_bad_inputs_one_line_exit_2(tmp_path: Path, data_dir: Path, args: List[str],
                                    needle: str) -> None:
    res = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "o"), "--max-steps", "2",
                   *TINY, *args])
    assert_one_line_error(res, needle)


def test_config_errors_in_process(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["--model.n_layr", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smallgpt-train: error: unknown config key 'model.n_layr'")
    assert "model.n_layer" in err and "optim.lr" in err and "\n" not in err
    assert main(["--set", "nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
    assert main(["--preset", "nope"]) == 2
    assert "shakespeare-cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "smallgpt-train: error: unrecognized argument: " \
                                              "--bogus"
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nn_layer = 3\nwat = 1\n")
    assert main(["--config", str(toml)]) == 2
    assert "unknown config key 'model.wat'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--max-steps", "abc"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_print_config_layers(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_steps = 77\n[model]\nn_layer = 3\n")
    assert main(["--preset", "shakespeare-cpu", "--config", str(toml), "--model.n_head=2",
                 "--set", "optim.lr=0.5", "--seed", "9", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps = 77" in out and "n_layer = 3" in out and "n_head = 2" in out
    assert "lr = 0.5" in out and "seed = 9" in out and 'out = "out/c"' in out


def test_max_steps_env_caps_each_run_past_its_start(tmp_path: Path, data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """$SMALLGPT_MAX_STEPS (how the documentation's examples run in seconds): at most N steps
    past where a run starts, a resume included, written into the config it runs."""
    monkeypatch.setenv("SMALLGPT_MAX_STEPS", "3")
    assert main(["--max-steps", "100", "--max-time", "0", "--print-config"]) == 0
    assert "max_steps = 3\n" in capsys.readouterr().out
    assert main(["--print-config"]) == 0  # the quickstart: no step limit, 32 s
    assert "max_steps = 3\n" in capsys.readouterr().out
    assert main(["--max-steps", "2", "--print-config"]) == 0  # a lower limit stays
    assert "max_steps = 2\n" in capsys.readouterr().out
    out = tmp_path / "run"
    res = run_cli(["--data", str(data_dir), "--out", str(out), "--max-steps", "50", *TINY])
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    res = run_cli(["--resume", "--out", str(out), "--max-steps", "50"])
    assert res.returncode == 0, res.stderr
    assert torch.load(out / "ckpt_latest.pt", weights_only=True)["step"] == 6
    for bad in ("0", "ten"):
        monkeypatch.setenv("SMALLGPT_MAX_STEPS", bad)
        assert_one_line_error(run_cli(["--print-config"]), "$SMALLGPT_MAX_STEPS must be a "
                              f"positive integer, got '{bad}'")


def test_train_then_resume(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "run"
    res = run_cli(["--data", str(data_dir), "--out", str(out), "--max-steps", "4", *TINY])
    assert res.returncode == 0, res.stderr
    assert (out / "ckpt_latest.pt").exists() and (out / "tokenizer.json").exists()
    res = run_cli(["--resume", "--out", str(out), "--max-steps", "6"])
    assert res.returncode == 0, res.stderr
    ck = torch.load(out / "ckpt_latest.pt", weights_only=True)
    assert ck["step"] == 6
    assert ck["train_config"]["model"]["n_embd"] == 16  # config came from the checkpoint
    res = run_cli(["--resume", "--out", str(tmp_path / "nothing")])
    assert_one_line_error(res, "no checkpoint")
    # a used folder is refused without --resume/--overwrite, and left as it was
    before = (out / "ckpt_latest.pt").read_bytes()
    res = run_cli(["--data", str(data_dir), "--out", str(out), "--max-steps", "2", *TINY])
    assert_one_line_error(res, "--overwrite")
    assert (out / "ckpt_latest.pt").read_bytes() == before
    res = run_cli(["--data", str(data_dir), "--out", str(out), "--max-steps", "2",
                   "--overwrite", *TINY])
    assert res.returncode == 0, res.stderr
    assert torch.load(out / "ckpt_latest.pt", weights_only=True)["step"] == 2
    for bad in (b"", b"garbage"):
        (out / "ckpt_latest.pt").write_bytes(bad)
        assert_one_line_error(run_cli(["--resume", "--out", str(out)]), "ckpt_latest.pt")


def test_default_out_follows_the_config_or_data(tmp_path: Path, data_dir: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    toml = tmp_path / "my-run.toml"
    toml.write_text("max_steps = 3\n")
    assert main(["--config", str(toml), "--print-config"]) == 0
    assert 'out = "out/my-run"' in capsys.readouterr().out
    assert main(["--data", str(data_dir), "--print-config"]) == 0
    assert f'out = "out/{data_dir.name}"' in capsys.readouterr().out
    assert main(["--print-config"]) == 0
    assert 'out = "out/shakespeare-cpu"' in capsys.readouterr().out
    toml.write_text(f'max_steps = 3\nout = "{tmp_path / "elsewhere"}"\n')
    assert main(["--config", str(toml), "--print-config"]) == 0
    assert f'out = "{tmp_path / "elsewhere"}"' in capsys.readouterr().out


def test_resume_with_config_uses_its_out(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "cfg-run"
    toml = tmp_path / "c.toml"
    toml.write_text(f'out = "{out}"\nmax_steps = 2\ndevice = "cpu"\nprogress = false\n'
                    f'plot = false\n[data]\npath = "{data_dir}"\nbatch_size = 2\n'
                    "[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\n")
    assert run_cli(["--config", str(toml)]).returncode == 0
    res = run_cli(["--config", str(toml), "--resume", "--max-steps", "3"])
    assert res.returncode == 0, res.stderr
    assert torch.load(out / "ckpt_latest.pt", weights_only=True)["step"] == 3


def test_boolean_flags_are_symmetric(capsys: pytest.CaptureFixture) -> None:
    assert main(["--preset", "gpt2-124m", "--no-compile", "--print-config"]) == 0
    assert "compile = false" in capsys.readouterr().out
    assert main(["--compile", "--print-config"]) == 0
    assert "compile = true" in capsys.readouterr().out
    assert main(["--no-plot", "--no-progress", "--ddp", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "plot = false" in out and "progress = false" in out and 'parallel = "ddp"' in out


def test_more_bad_inputs_are_one_line(tmp_path: Path, data_dir: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    binary = tmp_path / "bin.toml"
    binary.write_bytes(bytes(range(256)))
    assert main(["--config", str(binary)]) == 2
    assert "bin.toml" in capsys.readouterr().err
    assert main(["--config", str(tmp_path)]) == 2
    assert "folder" in capsys.readouterr().err
    assert main(["--seed", str(2**70), "--print-config"]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["--set", "optim.grad_accum=4"]) == 2
    assert "data.micro_batch_size" in capsys.readouterr().err
    res = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "o"), "--max-steps", "1",
                   *TINY[:-2], "--device", "tpu"])
    assert_one_line_error(res, "tpu")
    (tmp_path / "afile").write_text("x")
    res = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "afile"), "--max-steps", "1",
                   *TINY])
    assert_one_line_error(res, "is a file")


def test_max_steps_under_a_time_limited_preset_says_so(tmp_path: Path, data_dir: Path) -> None:
    res = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "o"), "--max-steps", "2",
                   *TINY])
    assert res.returncode == 0, res.stderr
    assert "max_time = 32 s" in res.stdout and "--max-time 0" in res.stdout


def test_ctrl_c_saves_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "int"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smallgpt.cli.train", "--data", str(data_dir), "--out", str(out),
         "--max-steps", "0", "--max-time", "100000", "--log-interval", "1", *TINY],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Event-driven: interrupt once three steps are logged, however long that takes here.
    assert proc.stdout is not None
    logged = 0
    for line in proc.stdout:
        logged += line.startswith("step ")
        if logged >= 3:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ck = torch.load(out / "ckpt_latest.pt", weights_only=True)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ck["step"] >= 3
    assert ck["step"] >= max(steps)  # every logged step is in the checkpoint


def test_quickstart_tokenizes_bundled_text(tmp_path: Path) -> None:
    """`smallgpt-train` defaults: bundled Tiny Shakespeare, BPE shards cached on first use."""
    cache = tmp_path / "cache"
    # A first run interrupted while tokenizing leaves the folder without meta.json: rebuilt.
    import hashlib

    text = (Path(smallgpt.__file__).parent / "assets" / "tinyshakespeare.txt").read_text()
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    half_made = cache / f"tinyshakespeare-bpe512-{digest}"
    half_made.mkdir(parents=True)
    (half_made / "train_000000.bin").write_bytes(b"junk")
    res = run_cli(["--out", str(tmp_path / "qs"), "--max-steps", "3", "--set",
                   f"data.cache_dir={cache}", "--set", "max_time=0", "--eval-interval", "0",
                   "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2",
                   "--set", "progress=false"], timeout=120)
    assert res.returncode == 0, res.stderr
    folders = list(cache.iterdir())
    assert folders == [half_made]
    meta = json.loads((folders[0] / "meta.json").read_text())
    n = len(text)
    assert meta["splits"]["val"]["bytes"] == len(text[int(0.9 * n):].encode())
    assert meta["splits"]["train"]["bytes"] == len(text[: int(0.9 * n)].encode())
    tok = smallgpt.Tokenizer.load(folders[0] / "tokenizer.json")
    from smallgpt.data import read_shard

    val = read_shard(folders[0] / "val_000000.bin")
    assert int(val[0]) == tok.eot_id
    assert tok.decode(val[1:].tolist()) == text[int(0.9 * n):]
    ck = torch.load(tmp_path / "qs" / "ckpt_latest.pt", weights_only=True)
    assert smallgpt.Tokenizer.load(tmp_path / "qs" / "tokenizer.json").vocab_size == \
        tok.vocab_size
    assert json.loads(ck["tokenizer"]) == json.loads((folders[0] / "tokenizer.json").read_text())


def test_by_time_rows_follow_the_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("max_time = 30\n[model]\nn_layer = 1\n"
                    "[[by_time]]\nmin_time = 100\nmodel = { n_layer = 2, block_size = 128 }\n"
                    "[[by_time]]\nmin_time = 250\nmodel = { n_layer = 3 }\noptim = { lr = 2e-3 }\n")
    def config(*args: str) -> str:
        assert main(["--config", str(toml), "--print-config", *args]) == 0
        return capsys.readouterr().out

    assert "n_layer = 1" in config()  # 30 s: no row applies
    out = config("--max-time", "120")
    assert "n_layer = 2" in out and "block_size = 128" in out
    out = config("--max-time", "300")
    assert "n_layer = 3" in out and "lr = 0.002" in out and "block_size = 256" not in out
    # what the user sets wins over the row
    assert "n_layer = 5" in config("--max-time", "300", "--model.n_layer", "5")
    toml.write_text("[[by_time]]\nmodel = { n_layer = 2 }\n")
    assert main(["--config", str(toml), "--print-config"]) == 2
    assert "min_time" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_nodes(args: List[str], cwds: List[Path]) -> None:
    """The multi-node command of docs/distributed.md with 2 nodes of 1 process each, both on
    this machine: static rendezvous at 127.0.0.1, node 0 (global rank 0) in ``cwds[0]``, node
    1 in ``cwds[1]``, as two machines with their own disks would run it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
         "-m", "smallgpt.cli.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node, cwd in enumerate(cwds)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_two_nodes_train_as_one_process_and_resume(tmp_path: Path, data_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """torchrun --nnodes 2 --nproc-per-node 1: the losses of one process over the same global
    batch, only global rank 0 writes (node 1's disk stays empty), and --resume continues
    the straight run (each node reads the run folder: a copy here, a shared disk in a
    cluster)."""
    common = ["--data", str(data_dir), *TINY, "--data.batch_size", "4", "--eval-interval", "2",
              "--log-interval", "1",
              "--set", "threads=1", "--no-progress"]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for n in nodes:
        n.mkdir()
    _two_nodes(["--out", "run", "--max-steps", "2", *common], nodes)
    assert list(nodes[1].iterdir()) == []
    import shutil

    shutil.copytree(nodes[0] / "run", nodes[1] / "run")
    before = _tree(nodes[1])
    _two_nodes(["--out", "run", "--max-steps", "4", "--resume", *common], nodes)
    assert _tree(nodes[1]) == before  # node 1 only read
    assert main(["--out", str(tmp_path / "single"), "--max-steps", "4", *common]) == 0
    capsys.readouterr()

    def losses(run: Path) -> List[float]:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r]

    two, one = losses(nodes[0] / "run"), losses(tmp_path / "single")
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-5)
    ck = torch.load(nodes[0] / "run" / "ckpt_latest.pt", weights_only=True)
    assert ck["step"] == 4 and ck["trainer"]["world_size"] == 2
