"""``smallgpt-export``: the folder transformers loads (model and tokenizer), GPT-2's own
tokenizer files, refusals, atomic replacement, and a run exported then fine-tuned from."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers import Evil

import smallgpt
from smallgpt.checkpoint import Checkpoint, load_model
from smallgpt.cli.export import gpt2_incompatibilities, is_gpt2_tokenizer, main
from smallgpt.cli.train import main as train_main
from smallgpt.corpus import tokenize_corpus
from smallgpt.model import GPT, GPTConfig
from smallgpt.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return Tokenizer.train([(FIXTURES / "english.txt").read_text(encoding="utf-8")],
                           vocab_size=300)


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return Tokenizer.from_gpt2(FIXTURES / "gpt2" / "encoder.json", FIXTURES / "gpt2" / "vocab.bpe")


def save_run(folder: Path, tok: Tokenizer, **config: Any) -> GPT:
    """A run folder holding one checkpoint of a random model (biases and LayerNorms perturbed
    so that a dropped or transposed tensor shows)."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{"vocab_size": 320, "block_size": 32, "n_layer": 2, "n_head": 2,
                       "n_embd": 32, **config})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    Checkpoint(cfg, model.state_dict(), tok.to_json_str(), step=5).save(folder / "ckpt_latest.pt")
    return model.eval()


def texts() -> List[str]:
    return ["Hello world, it's 2024!", "  spaces\tand\nnewlines ", "Zoë's café <|endoftext|>"] + \
        [p.read_text(encoding="utf-8")[:300] for p in sorted(FIXTURES.glob("ml_*.txt"))]


def assert_one_line_error(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("smallgpt-export: error: ") and needle in lines[0], lines[0]


def leftovers(parent: Path) -> List[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- what transformers loads


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False, "activation": "gelu"}])
def test_transformers_loads_model_and_tokenizer(tmp_path: Path, small_tok: Tokenizer,
                                                options: Dict[str, Any],
                                                capsys: pytest.CaptureFixture) -> None:
    import transformers

    model = save_run(tmp_path / "run", small_tok, **options)
    out = tmp_path / "hf"
    assert main([str(tmp_path / "run"), "--huggingface", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert leftovers(tmp_path) == []
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    idx = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    assert hf.config.eos_token_id == small_tok.eot_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts():
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == small_tok.encode(text, allowed_special="all"), text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.model_max_length == 32
    # and back: smallgpt reads the exported folder as it reads any GPT-2 folder
    again = load_model(out)
    assert again.tokenizer.to_json_str() == small_tok.to_json_str()
    with torch.no_grad():
        torch.testing.assert_close(again.model(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_gpt2_vocabulary_gets_the_hub_files(tmp_path: Path, gpt2_tok: Tokenizer,
                                            small_tok: Tokenizer, hf_gpt2: Path) -> None:
    import transformers

    assert is_gpt2_tokenizer(gpt2_tok) and not is_gpt2_tokenizer(small_tok)
    save_run(tmp_path / "run", gpt2_tok, vocab_size=50304, n_layer=1, n_embd=16)
    out = tmp_path / "hf"
    assert main([str(tmp_path / "run" / "ckpt_latest.pt"), "--huggingface", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    # OpenAI's files, byte for byte in content: encoder.json = vocab.json, vocab.bpe = merges
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == json.loads(
        (FIXTURES / "gpt2" / "encoder.json").read_text(encoding="utf-8"))
    ours = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    theirs = (FIXTURES / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert ours == [line for line in theirs if line.strip()]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts():
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == \
            gpt2_tok.encode(text, allowed_special="all")
    assert load_model(out).tokenizer.to_json_str() == gpt2_tok.to_json_str()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50304
    # a Hugging Face folder exports too (its tokenizer from its files or --gpt2-vocab)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_gpt2 / name).read_bytes())
    assert main([str(bare), "--huggingface", str(tmp_path / "re"), "--gpt2-vocab",
                 str(FIXTURES / "gpt2")]) == 0
    assert (tmp_path / "re" / "merges.txt").read_text() == (out / "merges.txt").read_text()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("options, needle", [
    ({"position": "rope"}, "position = 'rope'"),
    ({"bias": False}, "bias = False"),
])
def test_what_gpt2_cannot_represent_is_refused(tmp_path: Path, small_tok: Tokenizer,
                                               options: Dict[str, Any], needle: str,
                                               capsys: pytest.CaptureFixture) -> None:
    save_run(tmp_path / "run", small_tok, **options)
    assert main([str(tmp_path / "run"), "--huggingface", str(tmp_path / "hf")]) == 2
    assert_one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_tokenizer_hugging_face_would_read_differently_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A custom pre-tokenizer pattern that Oniguruma reads differently (a possessive
    ``{1,3}+``): a one-line error naming the construct, and nothing written."""
    tok = Tokenizer.train(["a 12 b 345 c"], vocab_size=260, pattern=r"\d{1,3}+|\D+")
    save_run(tmp_path / "run", tok)
    assert main([str(tmp_path / "run"), "--huggingface", str(tmp_path / "hf")]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot export the tokenizer: ")
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_hugging_face_weights_that_need_code_are_refused(
        tmp_path: Path, small_tok: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    """A Hugging Face folder whose ``pytorch_model.bin`` pickles a call: never run, and a
    one-line error (from export, as from every command that loads models)."""
    save_run(tmp_path / "run", small_tok)
    hf = tmp_path / "hf"
    assert main([str(tmp_path / "run"), "--huggingface", str(hf)]) == 0
    capsys.readouterr()
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(320, 32), "x": Evil(marker)},
               hf / "pytorch_model.bin")
    assert main([str(hf), "--huggingface", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot load the Hugging Face model")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_options_gpt2_lacks_are_named() -> None:
    """A newer option (here a made-up one) with a non-default value is named, so an export
    never silently drops what the model computes."""

    @dataclasses.dataclass
    class Modern(GPTConfig):
        norm: str = "layernorm"
        qk_norm: bool = False

    assert gpt2_incompatibilities(Modern(vocab_size=64, n_layer=1, n_embd=16, n_head=2)) == []
    problems = gpt2_incompatibilities(Modern(vocab_size=64, n_layer=1, n_embd=16, n_head=2,
                                             norm="rmsnorm", qk_norm=True, position="rope"))
    assert [p.split(" ")[0] for p in problems] == ["position", "norm", "qk_norm"]
    assert "norm = 'rmsnorm'" in problems[1]


def test_out_folder_rules(tmp_path: Path, small_tok: Tokenizer,
                          capsys: pytest.CaptureFixture) -> None:
    save_run(tmp_path / "run", small_tok)
    out = tmp_path / "hf"
    out.mkdir()  # an empty folder is fine
    assert main([str(tmp_path / "run"), "--huggingface", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "run2").mkdir()
    save_run(tmp_path / "run2", small_tok, n_layer=1)
    assert main([str(tmp_path / "run2"), "--huggingface", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "not empty")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "stray.txt").write_text("x")  # --overwrite replaces only a model folder
    assert main([str(tmp_path / "run2"), "--huggingface", str(out), "--overwrite"]) == 2
    assert_one_line_error(capsys.readouterr().err, "stray.txt")
    (out / "stray.txt").unlink()
    (out / "generation_config.json").write_text("{}")  # a model folder's file: replaced
    assert main([str(tmp_path / "run2"), "--huggingface", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert not (out / "generation_config.json").exists()
    assert json.loads((out / "config.json").read_text())["n_layer"] == 1
    assert leftovers(tmp_path) == []
    (tmp_path / "afile").write_text("x")
    cases = [([str(tmp_path / "run"), "--huggingface", str(tmp_path / "afile")], "is a file"),
             ([str(tmp_path / "nope"), "--huggingface", str(tmp_path / "o")], "not found"),
             ([str(tmp_path / "afile"), "--huggingface", str(tmp_path / "o")], "not a PyTorch"),
             ([str(tmp_path / "o"), "--huggingface", str(tmp_path / "o")], "not found")]
    (tmp_path / "empty").mkdir()
    cases.append(([str(tmp_path / "empty"), "--huggingface", str(tmp_path / "o")],
                  "no checkpoint"))
    for args, needle in cases:
        assert main(args) == 2, args
        assert_one_line_error(capsys.readouterr().err, needle)
        assert not (tmp_path / "o").exists()


def test_entry_point_one_line_errors(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    for args, needle in (([str(tmp_path)], "--huggingface"),
                         ([str(tmp_path), "--huggingface", str(tmp_path / "o")],
                          "no checkpoint")):
        res = subprocess.run([sys.executable, "-m", "smallgpt.cli.export", *args], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert_one_line_error(res.stderr, needle)


# ---------------------------------------------------------------- export, then fine-tune


def test_exported_run_starts_from_its_own_loss(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """Pretrain with smallgpt, export, --init-from the export: the model starts where the run
    ended (its own final loss), far below a fresh model's."""
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")[:60000]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    data = tmp_path / "data"
    tokenize_corpus([tmp_path / "in.txt"], data, vocab_size=300, val_fraction=0.1)
    common = ["--data", str(data), "--device", "cpu", "--dtype", "float32", "--set",
              "threads=1", "--no-progress", "--no-plot"]
    shape = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
             "--model.block_size", "32", "--model.position", "learned",
             # the default preset's modern options are ones GPT-2 cannot represent
             "--model.activation", "gelu", "--model.qk_norm", "false"]
    assert train_main(["--out", str(tmp_path / "run"), "--max-steps", "60", "--max-time", "0",
                       "--eval-interval", "0", "--data.batch_size", "16", *shape, *common]) == 0
    capsys.readouterr()
    final = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()][-1]
    assert main([str(tmp_path / "run"), "--huggingface", str(tmp_path / "hf")]) == 0
    capsys.readouterr()

    def eval_only(*args: str) -> Dict[str, Any]:
        assert train_main(["--eval-only", *args, *common]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    exported = eval_only("--init-from", str(tmp_path / "hf"))
    assert exported["val_tokens"] == final["val_tokens"]
    assert exported["val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    fresh = math.log(320)  # an untrained model of this vocabulary
    assert exported["val_loss"] < fresh - 1.0
    # fine-tuning from the export: the first step's loss is the trained model's
    assert train_main(["--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "ft"),
                       "--max-steps", "1", "--max-time", "0", "--log-interval", "1",
                       "--optim.lr", "1e-4", "--optim.min_lr", "1e-4", *common]) == 0
    capsys.readouterr()
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] < fresh - 1.0
    assert abs(first["loss"] - final["val_loss"]) < 0.5
