"""Faults a real user meets: kills, SIGTERM, full disks, two processes on one run, divergence,
settings or data changed under a resume, half-made folders, hostile model folders.

Every scenario goes through a CLI (a subprocess where a real signal or a second process is the
point, else the entry point in-process) or the public API. Waits are on events (a file
appears, a process exits), with generous limits, never on a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest
import torch
from conftest import make_hf_gpt2
from helpers import make_synthetic_shards, tiny_cfg

import smallgpt
from smallgpt.checkpoint import Checkpoint, CheckpointError, load_model
from smallgpt.cli.export import main as export_main
from smallgpt.cli.sample import main as sample_main
from smallgpt.cli.train import main as train_main
from smallgpt.corpus import tokenize_corpus
from smallgpt.data import load_meta, write_shard
from smallgpt.evaluate import read_hellaswag
from smallgpt.train import train

FIXTURES = Path(__file__).parent / "fixtures"
PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)
TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16",
        "--model.block_size", "8", "--data.batch_size", "2", "--set", "progress=false",
        "--set", "plot=false", "--device", "cpu", "--set", "threads=1"]


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, e.get("PYTHONPATH")) if p)
    e["OMP_NUM_THREADS"] = "1"
    return e


def cli(module: str, args: List[str], timeout: float = 120, **kw: object) -> \
        subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"smallgpt.cli.{module}", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def start_train(args: List[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smallgpt.cli.train", *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, what: str,
             limit: float = 120) -> None:
    """Poll ``cond`` until true; fail if ``proc`` exits first or ``limit`` s pass."""
    deadline = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_when(cond: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """SIGKILL ``proc`` at a moment when ``cond`` holds: it is frozen (SIGSTOP) first, so
    that what ``cond`` saw is still true when it dies."""
    while True:
        wait_for(cond, proc, what)
        proc.send_signal(signal.SIGSTOP)
        if cond():
            proc.kill()
            proc.communicate()
            return
        proc.send_signal(signal.SIGCONT)


def metrics(out: Path) -> List[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def max_step(out: Path) -> int:
    try:
        return max((r["step"] for r in metrics(out)), default=0)
    except json.JSONDecodeError:  # a line being written right now
        return 0


def one_line(stderr: str, prog: str, needle: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def strict_json(line: str) -> dict:
    def no_constant(name: str) -> None:
        raise AssertionError(f"not JSON: {name}")

    return json.loads(line, parse_constant=no_constant)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of English text with a real 300-token tokenizer (sampling needs one)."""
    out = tmp_path_factory.mktemp("text") / "shards"
    tokenize_corpus([FIXTURES / "english.txt"], out, vocab_size=300, val_fraction=0.1)
    return out


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    root = tmp_path / "synth"
    root.mkdir()
    return make_synthetic_shards(root)


# ---------------------------------------------------------------- export never deletes a run


@pytest.fixture(scope="module")
def exportable_run(tmp_path_factory: pytest.TempPathFactory, text_data: Path) -> Path:
    out = tmp_path_factory.mktemp("exp") / "run"
    train(tiny_cfg(out, text_data, max_steps=2, eval_interval=0, save_interval=0))
    return out


def _snapshot(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "parent"])
def test_export_overwrite_never_deletes_its_source(
        tmp_path: Path, exportable_run: Path, spelling: str,
        capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    run = home / "run"
    shutil.copytree(exportable_run, run)
    (home / "notes.txt").write_text("mine")
    if spelling == "same":
        out = run
    elif spelling == "dotdot":
        out = run / ".." / "run"
    elif spelling == "symlink":
        out = tmp_path / "link"
        out.symlink_to(run)
    else:
        out = home
    before = _snapshot(home)
    assert export_main([str(run), "--huggingface", str(out), "--overwrite"]) == 2
    one_line(capsys.readouterr().err, "smallgpt-export", "holds the model being exported")
    assert _snapshot(home) == before


def test_export_overwrite_replaces_only_a_model_folder(
        tmp_path: Path, exportable_run: Path, capsys: pytest.CaptureFixture) -> None:
    other_run = tmp_path / "other"
    shutil.copytree(exportable_run, other_run)
    before = _snapshot(other_run)
    assert export_main([str(exportable_run), "--huggingface", str(other_run),
                        "--overwrite"]) == 2
    one_line(capsys.readouterr().err, "smallgpt-export", "a smallgpt run")
    assert _snapshot(other_run) == before
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "thesis.tex").write_text("years of work")
    assert export_main([str(exportable_run), "--huggingface", str(mixed), "--overwrite"]) == 2
    one_line(capsys.readouterr().err, "smallgpt-export", "thesis.tex")
    assert (mixed / "thesis.tex").read_text() == "years of work"
    # a previous export is what --overwrite replaces
    hf = tmp_path / "hf"
    assert export_main([str(exportable_run), "--huggingface", str(hf)]) == 0
    assert export_main([str(exportable_run), "--huggingface", str(hf), "--overwrite"]) == 0
    assert (hf / "model.safetensors").is_file()
    # a temporary folder of a killed export is removed by the next one
    stale = tmp_path / f".hf.{dead_pid()}.tmp"
    stale.mkdir()
    assert export_main([str(exportable_run), "--huggingface", str(hf), "--overwrite"]) == 0
    assert not stale.exists()


# ---------------------------------------------------------------- two processes, kills, SIGTERM


def test_second_process_is_refused_and_a_kill_leaves_a_resumable_run(
        tmp_path: Path, synth: Path) -> None:
    out = tmp_path / "run"
    first = start_train(["--data", str(synth), "--out", str(out), "--max-steps", "100000",
                         "--max-time", "0", "--set", "save_interval=5",
                         "--set", "log_interval=1", "--set", "eval_interval=0", *TINY])
    lock = out / ".smallgpt-train.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid)
             and max_step(out) >= 1, first, "the first run to train")
    for extra in (["--overwrite", "--data", str(synth), *TINY], ["--resume"]):
        res = cli("train", ["--out", str(out), "--max-steps", "3", *extra])
        assert res.returncode == 2
        one_line(res.stderr, "smallgpt-train", f"PID {first.pid}")
    # a kill after a checkpoint, with records of later steps in metrics.jsonl
    def past_a_checkpoint() -> bool:
        saved = [int(p.stem.split("_")[1]) for p in out.glob("ckpt_0*.pt")]
        return bool(saved) and max_step(out) >= max(saved) + 2

    kill_when(past_a_checkpoint, first, "a checkpoint and steps after it")
    saved = torch.load(out / "ckpt_latest.pt", weights_only=True)["step"]
    assert max_step(out) > saved
    stale = out / f".ckpt_latest.pt.{dead_pid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    res = cli("train", ["--resume", "--out", str(out), "--max-steps", str(saved + 3)])
    assert res.returncode == 0, res.stderr
    assert not stale.exists()
    steps = [r["step"] for r in metrics(out) if not r.get("final")]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 3, steps


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path: Path, synth: Path) -> None:
    out = tmp_path / "run"
    proc = start_train(["--data", str(synth), "--out", str(out), "--max-steps", "100000",
                        "--max-time", "0", "--set", "save_interval=0",
                        "--set", "log_interval=1", "--set", "eval_interval=0", *TINY])
    wait_for(lambda: max_step(out) >= 3, proc, "training")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err
    step = torch.load(out / "ckpt_latest.pt", weights_only=True)["step"]
    assert step >= 3
    res = cli("train", ["--resume", "--out", str(out), "--max-steps", str(step + 2)])
    assert res.returncode == 0, res.stderr
    assert torch.load(out / "ckpt_latest.pt", weights_only=True)["step"] == step + 2


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("lr", ["1e3", "1e10"])
def test_divergence_keeps_only_checkpoints_that_load_and_sample(
        tmp_path: Path, text_data: Path, lr: str) -> None:
    out = tmp_path / "run"
    res = cli("train", ["--data", str(text_data), "--out", str(out), "--max-steps", "30",
                        "--max-time", "0", "--optim.lr", lr, "--optim.min_lr", lr,
                        "--optim.warmup_steps", "0", "--set", "save_interval=1",
                        "--set", "eval_interval=0", *TINY])
    assert res.returncode == 1, res.stderr
    line = one_line(res.stderr, "smallgpt-train", "stopping")
    for ckpt in out.glob("ckpt_*.pt"):
        load_model(ckpt)  # finite weights (else CheckpointError)
    if "last good checkpoint: " in line:
        named = line.split("last good checkpoint: ")[1]
        res = cli("sample", ["--checkpoint", named, "--max-new-tokens", "8", "--seed", "0",
                             "--device", "cpu", "--prompt", "the"])
        assert res.returncode == 0, res.stderr
        res = cli("train", ["--eval-only", "--out", str(out)])
        assert res.returncode == 0, res.stderr
        assert np.isfinite(strict_json(res.stdout.strip().splitlines()[-1])["val_loss"])


def test_non_finite_checkpoint_is_refused_by_name(tmp_path: Path, exportable_run: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    ckpt = Checkpoint.load(exportable_run / "ckpt_latest.pt")
    ckpt.model["transformer.wte.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    ckpt.save(bad)
    with pytest.raises(CheckpointError, match="not finite"):
        load_model(bad)
    assert sample_main(["--checkpoint", str(bad), "--prompt", "a", "--device", "cpu"]) == 2
    one_line(capsys.readouterr().err, "smallgpt-sample", "not finite")


# ---------------------------------------------------------------- settings and data on resume


def test_resume_overrides_take_effect_or_are_refused(
        tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    base = ["--out", str(out), "--max-time", "0"]
    assert train_main(["--data", str(synth), *base, "--max-steps", "4", *TINY]) == 0
    before = torch.load(out / "ckpt_latest.pt", weights_only=True)["model"]
    # the quickstart preset's Muon has a rate of its own: both are overridden
    assert train_main(["--resume", *base, "--max-steps", "9", "--optim.lr", "1e-12",
                       "--optim.muon_lr", "1e-12", "--optim.min_lr", "1e-13",
                       "--optim.weight_decay", "0", "--log-interval", "1"]) == 0
    after = torch.load(out / "ckpt_latest.pt", weights_only=True)["model"]
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved < 1e-9, moved  # 5 steps at lr <= 1e-12 (the old rate moved them by ~1e-2)
    lrs = [r["lr"] for r in metrics(out) if r["step"] > 4 and "lr" in r]
    assert lrs and max(lrs) <= 1e-12, lrs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["lr"] == 1e-12
    capsys.readouterr()
    name = cfg["optim"]["name"]
    other = "adamw" if name == "muon" else "muon"
    assert train_main(["--resume", *base, "--max-steps", "12", "--optim.name", other]) == 2
    one_line(capsys.readouterr().err, "smallgpt-train", f"optim.name = {name!r}")
    assert train_main(["--resume", *base, "--max-steps", "12", "--model.n_layer", "3"]) == 2
    one_line(capsys.readouterr().err, "smallgpt-train", "model.n_layer = 3")


def test_resume_on_changed_data_is_refused_unless_meant(
        tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    base = ["--out", str(out), "--max-time", "0"]
    assert train_main(["--data", str(synth), *base, "--max-steps", "2", *TINY]) == 0
    # re-tokenized: other tokens, same vocabulary size, and another tokenizer file
    write_shard(synth / "train_000000.bin", np.random.default_rng(5).integers(0, 47, 6000))
    (synth / "tokenizer.json").write_text('{"another": "tokenizer"}')
    capsys.readouterr()
    assert train_main(["--resume", *base, "--max-steps", "4"]) == 2
    err = one_line(capsys.readouterr().err, "smallgpt-train", "not what the run trained on")
    assert "tokenizer differs" in err and "train_000000.bin" in err
    assert train_main(["--resume", *base, "--max-steps", "4", "--data-changed-ok"]) == 0
    assert torch.load(out / "ckpt_latest.pt", weights_only=True)["step"] == 4


def test_a_flag_and_an_invalid_set_of_the_same_key_are_refused(
        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        train_main(["--max-steps", "3", "--set", "max_steps=ten"])
    assert e.value.code == 2
    one_line(capsys.readouterr().err, "smallgpt-train", "max_steps is given twice")


# ---------------------------------------------------------------- half-made shard folders

KILL_AFTER_SHARDS = """
import os, signal, sys
import smallgpt.corpus as c
run = c._run
def killed(*a, **k):
    run(*a, **k)                      # the shards are renamed into place...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before meta.json
c._run = killed
c.tokenize_corpus([sys.argv[1]], sys.argv[2], vocab_size=300, val_fraction=0.1)
"""


def test_interrupted_tokenize_folder_is_refused_and_llmc_folders_still_load(
        tmp_path: Path) -> None:
    out = tmp_path / "shards"
    res = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, str(FIXTURES / "english.txt"),
                          str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL
    assert (out / "train_000000.bin").is_file()  # complete-looking shards
    with pytest.raises(ValueError, match="unfinished"):
        load_meta(out)
    res = cli("train", ["--data", str(out), "--out", str(tmp_path / "run"), "--max-steps", "1",
                        *TINY])
    assert res.returncode == 2
    one_line(res.stderr, "smallgpt-train", "run smallgpt-tokenize again with --overwrite")
    res = cli("tokenize", [str(FIXTURES / "english.txt"), "--out", str(out), "--vocab-size",
                           "300", "--val-fraction", "0.1", "--overwrite", "--quiet"])
    assert res.returncode == 0, res.stderr
    assert load_meta(out)["complete"] is True
    # llm.c's own folders have no meta.json at all, and still load
    (out / "meta.json").unlink()
    assert load_meta(out)["splits"]["train"]["shards"] == ["train_000000.bin"]


def _reading(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open or mapped right now (Linux's /proc)."""
    try:
        if str(path) in Path(f"/proc/{pid}/maps").read_text():
            return True
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_a_file_truncated_while_it_is_tokenized_is_an_error_not_a_crash(
        tmp_path: Path) -> None:
    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": "All the world's a stage, and all the men and women merely "
                               "players. " * 4}) + "\n"
    src.write_text(line * 120000)  # ~40 MB
    proc = subprocess.Popen([sys.executable, "-m", "smallgpt.cli.tokenize", str(src), "--out",
                             str(tmp_path / "out"), "--vocab-size", "300", "--quiet"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Cut the file in half the moment the process has it open (or mapped).
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if _reading(proc.pid, src):
            break
    os.truncate(src, 60000 * len(line))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 2), (proc.returncode, err)  # never SIGBUS (-7)
    if proc.returncode == 2:
        one_line(err, "smallgpt-tokenize", "changed while it was being read")


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs), where the machine lets the tests mount one."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs: Path) -> None:
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(
        small_fs: Path, synth: Path) -> None:
    out = small_fs / "run"
    proc = start_train(["--data", str(synth), "--out", str(out), "--max-steps", "100000",
                        "--max-time", "0", "--set", "save_interval=2", "--set", "keep_last=1",
                        "--set", "log_interval=1", "--set", "eval_interval=0", *TINY])
    wait_for(lambda: (out / "ckpt_latest.pt").exists() and max_step(out) >= 3, proc,
             "a checkpoint")
    fill(small_fs)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    line = one_line(err, "smallgpt-train", "no space left on device")
    assert str(out) in line
    Checkpoint.load(out / "ckpt_latest.pt").build_model()  # loads, finite
    assert not list(out.glob(".*.tmp")), list(out.iterdir())


def test_full_disk_during_export_is_one_line_and_leaves_nothing(
        small_fs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf = make_hf_gpt2(tmp_path / "hf")  # 50257 x 32 embeddings: 6 MiB, more than fits
    capsys.readouterr()
    assert export_main([str(hf), "--huggingface", str(small_fs / "exported")]) == 1
    one_line(capsys.readouterr().err, "smallgpt-export", "no space left on device")
    assert sorted(p.name for p in small_fs.iterdir()) == []


# ---------------------------------------------------------------- hostile model folders


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_gpt2(tmp_path_factory.mktemp("hf_faults"))


def _corrupt(hf: Path, dest: Path, how: str) -> Path:
    shutil.copytree(hf, dest)
    cfg = json.loads((hf / "config.json").read_text())
    st = dest / "model.safetensors"
    if how == "config_list":
        (dest / "config.json").write_text("[1, 2]")
    elif how == "n_embd_null":
        (dest / "config.json").write_text(json.dumps({**cfg, "n_embd": None}))
    elif how == "huge_n_layer":
        (dest / "config.json").write_text(json.dumps({**cfg, "n_layer": 10**9}))
    elif how == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif how == "absurd_header":
        st.write_bytes((2**62).to_bytes(8, "little") + st.read_bytes()[8:])
    return dest


CORRUPTIONS = {"config_list": "config.json", "n_embd_null": "n_embd",
               "huge_n_layer": "n_layer", "truncated": "model.safetensors",
               "absurd_header": "model.safetensors"}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_hostile_hugging_face_folders_are_one_line_errors(
        tmp_path: Path, hf_folder: Path, how: str, capsys: pytest.CaptureFixture) -> None:
    bad = _corrupt(hf_folder, tmp_path / "bad", how)
    with pytest.raises(CheckpointError, match=CORRUPTIONS[how]):
        load_model(bad)
    assert sample_main(["--checkpoint", str(bad), "--prompt", "a", "--device", "cpu"]) == 2
    one_line(capsys.readouterr().err, "smallgpt-sample", CORRUPTIONS[how])
    assert train_main(["--eval-only", "--init-from", str(bad), "--data",
                       str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "smallgpt-train", CORRUPTIONS[how])


def test_checkpoint_declaring_a_huge_model_over_small_weights(
        tmp_path: Path, exportable_run: Path) -> None:
    obj = torch.load(exportable_run / "ckpt_latest.pt", weights_only=True)
    obj["model_config"]["n_layer"] = 10**9
    torch.save(obj, tmp_path / "huge.pt")
    with pytest.raises(CheckpointError, match="n_layer = 1000000000"):
        load_model(tmp_path / "huge.pt")


# ---------------------------------------------------------------- small things


def test_hellaswag_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    row = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 2}
    path = tmp_path / "hs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    assert read_hellaswag(path)[0].label == 2


def test_invalid_utf8_on_standard_input_is_named(exportable_run: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "smallgpt.cli.sample", "--checkpoint",
                          str(exportable_run), "--device", "cpu", "--max-new-tokens", "2"],
                         input=b"ok \xff\xfe bad", env=env(), capture_output=True, timeout=120)
    assert res.returncode == 2
    one_line(res.stderr.decode(), "smallgpt-sample", "standard input is not UTF-8")
