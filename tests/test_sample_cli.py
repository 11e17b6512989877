"""Tests for the ``smallgpt-sample`` CLI: run folders, checkpoint files, Hugging Face GPT-2
folders, streaming vs not, seeds, stop strings, beams, and one-line errors on bad input.

Most cases run in a subprocess (the real entry point); a few call ``main()`` in-process to keep
the file fast (each subprocess pays for importing torch). Every command is given ``--device``
(``$SMALLGPT_TEST_DEVICE``, see helpers.device_under_test), and expected texts are computed on
that device: the CLI's own default is a GPU when there is one."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import Evil, device_under_test

import smallgpt
from smallgpt import Tokenizer
from smallgpt.cli.sample import main as sample_main
from smallgpt.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEVICE = device_under_test()

pytestmark = pytest.mark.device


def with_device(args: list[str] | tuple[str, ...]) -> list[str]:
    """``args`` plus ``--device DEVICE`` unless they name a device."""
    return list(args) if "--device" in args else [*args, "--device", DEVICE]


def main(argv: list[str]) -> int:
    """smallgpt-sample in-process, on the device under test."""
    return sample_main(with_device(argv))


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The package the tests imported (installed or editable), not the source folder, which
    # lacks the compiled extension in a fresh checkout.
    pkg_root = str(Path(smallgpt.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "smallgpt.cli.sample", *with_device(args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("smallgpt-sample: error: ")
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")
    return Tokenizer.train([text], vocab_size=300)


def _save_run(folder: Path, tok: Tokenizer, *, padded_vocab: int = 320,
              prefix: str = "", with_tokenizer: bool = True) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=padded_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    ckpt = {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "model_config": dataclasses.asdict(cfg),
        "step": 10,
    }
    if with_tokenizer:
        ckpt["tokenizer"] = tok.to_json_str()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "ckpt_latest.pt")
    tok.save(folder / "tokenizer.json")
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer: Tokenizer) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("run")
    _save_run(folder, tokenizer)
    return folder


# ----------------------------------------------------------------------------- happy paths


def test_stream_and_no_stream_print_the_same_text(run_dir: Path) -> None:
    args = ("--checkpoint", str(run_dir), "--prompt", "The ", "--max-new-tokens", "30",
            "--seed", "3", "--top-k", "40")
    streamed = run_cli(*args)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith("The ")
    assert len(streamed.stdout) > len("The ") + 5
    plain = run_cli(*args, "--no-stream")
    assert plain.stdout == streamed.stdout
    other = run_cli(*args[:-4], "--seed", "4")
    assert other.returncode == 0 and other.stdout != streamed.stdout


def test_prompt_from_stdin_and_file(run_dir: Path, tmp_path: Path) -> None:
    base = ("--checkpoint", str(run_dir), "--max-new-tokens", "10", "--seed", "1")
    from_arg = run_cli(*base, "--prompt", "It was")
    from_stdin = run_cli(*base, stdin="It was")
    assert from_arg.returncode == 0 and from_stdin.stdout == from_arg.stdout
    (tmp_path / "p.txt").write_text("It was", encoding="utf-8")
    assert main([*base, "--prompt-file", str(tmp_path / "p.txt"), "--no-stream"]) == 0


def test_matches_library_generation(run_dir: Path, tokenizer: Tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """The CLI prints the prompt + generate_text's output (eot-prefixed prompt, stops at eot)."""
    from smallgpt.cli.sample import load_for_sampling
    from smallgpt.generate import generate_text

    model, tok = load_for_sampling(run_dir)
    ids = [tok.eot_id] + tok.encode("Once")
    expected = generate_text(model.to(DEVICE), torch.tensor([ids], device=DEVICE), 25, seed=9,
                             temperature=0.8, eos_token_id=tok.eot_id,
                             decode_bytes=tok.decode_bytes, vocab_limit=tok.vocab_size)[0]
    assert main(["--checkpoint", str(run_dir / "ckpt_latest.pt"), "--prompt", "Once",
                 "--max-new-tokens", "25", "--seed", "9", "--temperature", "0.8"]) == 0
    assert capsys.readouterr().out == "Once" + expected + "\n"


def test_padded_vocab_never_yields_unknown_ids(run_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    # The model has 320 rows for a 300-token tokenizer: ids >= 300 must never be sampled
    # (decoding one would fail).
    for seed in range(3):
        assert main(["--checkpoint", str(run_dir), "--prompt", "a", "--max-new-tokens", "40",
                     "--seed", str(seed), "--temperature", "3.0", "--no-stream"]) == 0
    capsys.readouterr()


def test_stop_string_cuts_the_output(run_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["--checkpoint", str(run_dir), "--prompt", "In", "--max-new-tokens", "40",
            "--seed", "5"]
    assert main(base) == 0
    free = capsys.readouterr().out[len("In") : -1]
    stop = next(free[i : i + 2] for i in range(8, len(free) - 2)
                if "\\" not in free[i : i + 2])
    expected = "In" + free[: free.find(stop)] + "\n"
    proc = run_cli(*base, "--stop", stop, "never-there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
    assert main([*base, "--stop", stop, "--no-stream"]) == 0
    assert capsys.readouterr().out == expected


def test_stop_string_escapes_on_the_command_line(run_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """``--stop`` reads the same escapes as every smallgpt flag: ``\\n`` is a newline, and
    non-ASCII text stays itself (the shared ``smallgpt.cli.unescape``)."""
    for seed in range(20):  # the first seed whose sample has a line break to stop at
        base = ["--checkpoint", str(run_dir), "--prompt", "In", "--max-new-tokens", "200",
                "--seed", str(seed), "--temperature", "2.0", "--no-stream"]
        assert main(base) == 0
        free = capsys.readouterr().out[len("In") : -1]
        cut = free.find("\n", 1)
        if cut > 0:
            break
    assert cut > 0, "no sample with a line break in 20 seeds"
    # typed as a user types it: a backslash and an n; --stop may be repeated
    for stops in (["--stop", "\\n", "ü\\tß"], ["--stop", "ü\\tß", "--stop", "\\n"]):
        assert main([*base, *stops]) == 0
        assert capsys.readouterr().out == "In" + free[:cut] + "\n"


def test_samples_and_beams(run_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["--checkpoint", str(run_dir), "--prompt", "A", "--max-new-tokens", "12"]
    assert main([*base, "--num-samples", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    samples = out.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("A") for s in samples)
    assert main([*base, "--num-beams", "3", "--num-samples", "2"]) == 0
    beams = capsys.readouterr().out
    assert main([*base, "--num-beams", "3", "--num-samples", "2", "--no-cache"]) == 0
    assert capsys.readouterr().out == beams
    assert len(beams.split("---------------\n")) == 2


def test_compiled_checkpoint_prefix_and_tokenizer_file(tmp_path: Path, tokenizer: Tokenizer,
                                                       capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    # torch.compile'd models save "_orig_mod."-prefixed keys; an old checkpoint may lack the
    # embedded tokenizer, in which case tokenizer.json next to it is used.
    _save_run(tmp_path / "a", tokenizer, prefix="_orig_mod.", with_tokenizer=False)
    _save_run(tmp_path / "b", tokenizer)
    outs = []
    for name in ("a", "b"):
        assert main(["--checkpoint", str(tmp_path / name), "--prompt", "x", "--seed", "0",
                     "--max-new-tokens", "8"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_huggingface_gpt2_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1,
                                  n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok = Tokenizer.from_gpt2(FIXTURES / "gpt2" / "encoder.json", FIXTURES / "gpt2" / "vocab.bpe")
    prompt = "Hello, my dog"
    ids = [50256] + tok.encode(prompt)
    hf.to(DEVICE)
    ref = hf.generate(torch.tensor([ids], device=DEVICE),
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=DEVICE),
                      max_new_tokens=12, do_sample=False, eos_token_id=50256, pad_token_id=50256)
    new = ref[0, len(ids):].tolist()
    if 50256 in new:
        new = new[: new.index(50256)]
    expected = prompt + tok.decode_bytes(new).decode("utf-8", errors="replace") + "\n"
    proc = run_cli("--checkpoint", str(tmp_path / "hf"), "--gpt2-vocab", str(FIXTURES / "gpt2"),
                   "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected
    missing = run_cli("--checkpoint", str(tmp_path / "hf"), "--prompt", "x")
    assert_one_line_error(missing, "--gpt2-vocab")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--min-p", "2"], "--min-p"),
        (["--top-k", "0"], "--top-k"),
        (["--num-beams", "2", "--num-samples", "3"], "--num-samples"),
        (["--max-new-tokens", "x"], "invalid int"),
        (["--bogus"], "unrecognized"),
        (["--stop", ""], "--stop"),
    ],
)
def test_bad_flags(run_dir: Path, extra: list, needle: str) -> None:
    assert_one_line_error(run_cli("--checkpoint", str(run_dir), "--prompt", "a", *extra), needle)


def test_missing_inputs(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path / "nope")), "not found")
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path)), "no checkpoint")
    assert_one_line_error(run_cli(), "--checkpoint")
    (tmp_path / "ckpt_latest.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path), "--prompt", "a"), "checkpoint")


def test_in_process_errors(run_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    assert main(["--checkpoint", str(run_dir), "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
    assert main(["--checkpoint", str(run_dir), "--prompt", "a", "--device", "nonsense"]) == 2
    assert "device" in capsys.readouterr().err
    torch.save({"model": {}, "model_config": {"n_embd": 30, "n_head": 4, "vocab_size": 10,
                                              "block_size": 8, "n_layer": 1}},
               tmp_path / "bad.pt")
    assert main(["--checkpoint", str(tmp_path / "bad.pt"), "--prompt", "a"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_empty_prompt_needs_a_bos_token(tmp_path: Path) -> None:
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")
    plain = Tokenizer.train([text], vocab_size=280, special_tokens=())
    assert plain.eot_id is None
    _save_run(tmp_path, plain)
    assert_one_line_error(run_cli("--checkpoint", str(tmp_path), "--prompt", ""), "empty")
    ok = run_cli("--checkpoint", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3")
    assert ok.returncode == 0 and ok.stdout.startswith("Hi")


def test_checkpoints_that_need_code_are_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    marker = tmp_path / "pwned"
    model = _save_run(tmp_path / "run", tokenizer)
    evil = {"model": model.state_dict(), "model_config": model.config.to_dict(),
            "tokenizer": tokenizer.to_json_str(), "x": Evil(marker)}
    torch.save(evil, tmp_path / "run" / "ckpt_latest.pt")
    proc = run_cli("--checkpoint", str(tmp_path / "run"), "--prompt", "a")
    assert_one_line_error(proc, "weights_only")
    assert not marker.exists()
    from smallgpt.checkpoint import CheckpointError, load_model

    with pytest.raises(CheckpointError, match="refuses"):
        load_model(tmp_path / "run")
    assert not marker.exists()
