"""``smallgpt-eval`` and :mod:`smallgpt.evaluate`: HellaSwag-format scoring checked against an
independent computation with ``transformers`` (its tokenizer, its model, llm.c's formula) on a
random GPT-2, plus batching, dtypes, torchrun, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers import device_under_test, on_cuda

import smallgpt
from smallgpt.checkpoint import Checkpoint, load_model
from smallgpt.cli.eval import main
from smallgpt.evaluate import (
    EvalDataError,
    MultipleChoiceExample,
    evaluate_multiple_choice,
    read_hellaswag,
    render_example,
)
from smallgpt.model import GPT, GPTConfig
from smallgpt.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
PKG_ROOT = str(Path(smallgpt.__file__).resolve().parent.parent)
DEVICE = device_under_test()
# fp32 on a GPU sums in another order than on the CPU (TF32 stays off in these tests)
REL = 1e-4 if on_cuda() else 1e-5

# Hand-written, in HellaSwag's format (extra keys as in the real file are ignored).
EXAMPLES: List[Dict[str, Any]] = [
    {"ind": 0, "activity_label": "Cooking", "ctx": "A woman cracks two eggs into a bowl. She",
     "endings": ["whisks them with a fork until they are smooth.",
                 "paints the bowl blue and hangs it on the wall.",
                 "throws the fork into the river.",
                 "sings to the eggs."], "label": 0},
    {"ind": 1, "ctx": "The man ties his running shoes and steps outside. He",
     "endings": ["jogs down the street past the houses.", "eats the shoes.",
                 "falls asleep on the doorstep for a week.", "becomes a tree."], "label": 0},
    {"ind": 2, "ctx": "A child holds a kite on a windy beach. The kite",
     "endings": ["melts.", "rises into the sky as she lets out the string.",
                 "turns into a sandwich and is eaten by a gull.", "is quiet."], "label": 1},
    {"ind": 3, "ctx": "Rain starts to fall on the busy market. People",
     "endings": ["open their umbrellas and hurry under the awnings.", "x",
                 "dance", "begin to swim through the air toward the moon."], "label": 0},
    {"ind": 4, "ctx": "He opens the piano and sits down.",
     "endings": ["He plays a slow song.", "The piano eats his hands.",
                 "He ignores it completely and leaves.", "Bananas."], "label": 0},
    {"ind": 5, "ctx": "Zoë pours café au lait — \"careful, it's hot\" — into two cups. Then she",
     "endings": ["hands one cup to her friend.", "drinks the table.",
                 "hands one cup to her friend and smiles.", "hands"], "label": 2},
    {"ind": 6, "ctx": "The mechanic lifts the hood of the car and",
     "endings": ["checks the oil level with a dipstick.", "checks the oil level with a dipstick.",
                 "the car flies away.", "1234"], "label": 1},
    {"ind": 7, "ctx": "A dog sees a ball roll across the yard. The dog",
     "endings": ["chases the ball and brings it back.", "reads a newspaper.",
                 "calls a taxi.", "chases"], "label": 3},
]


@pytest.fixture(scope="module")
def hs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_mini.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES), encoding="utf-8")
    return path


def reference(folder: Path) -> Dict[str, Any]:
    """llm.c's hellaswag.py, one example at a time: tiktoken's GPT-2 encoding (built from the
    folder's files: no download) and transformers' model."""
    import tiktoken
    import torch.nn.functional as F
    import transformers
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "merges.txt"),
                                            str(folder / "vocab.json"))
    enc = tiktoken.Encoding("gpt2-local", pat_str=openai_public.r50k_pat_str,
                            mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    model.to(DEVICE)
    preds, preds_norm, losses = [], [], []
    for ex in EXAMPLES:
        ctx = enc.encode(ex["ctx"])
        rows = [ctx + enc.encode(" " + e) for e in ex["endings"]]
        masks = [[0] * len(ctx) + [1] * (len(r) - len(ctx)) for r in rows]
        width = max(len(r) for r in rows)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, (r, m) in enumerate(zip(rows, masks)):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(m)] = torch.tensor(m)
        tokens, mask = tokens.to(DEVICE), mask.to(DEVICE)
        with torch.no_grad():
            logits = model(tokens).logits
        shift = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        sums = (shift * shift_mask).sum(1)
        means = sums / shift_mask.sum(1)
        preds.append(int(sums.argmin()))
        preds_norm.append(int(means.argmin()))
        losses.append(list(zip(sums.tolist(), means.tolist())))
    labels = [ex["label"] for ex in EXAMPLES]
    return {"preds": preds, "preds_norm": preds_norm, "losses": losses,
            "acc": sum(p == y for p, y in zip(preds, labels)) / len(labels),
            "acc_norm": sum(p == y for p, y in zip(preds_norm, labels)) / len(labels)}


def run_cli(args: List[str], module: str = "smallgpt.cli.eval",
            launcher: List[str] = ()) -> subprocess.CompletedProcess:  # type: ignore[assignment]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *launcher, "-m", module, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def last_json(out: str) -> Dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def assert_one_line_error(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("smallgpt-eval: error: ") and needle in lines[0], lines[0]


# ---------------------------------------------------------------- against transformers


@pytest.mark.device
def test_matches_transformers_and_llmc_formula(hf_gpt2: Path, hs_file: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    ref = reference(hf_gpt2)
    loaded = load_model(hf_gpt2)
    examples = read_hellaswag(hs_file)
    for batch_size in (1, 3, 8):  # padding inside a batch must not change a loss
        res = evaluate_multiple_choice(loaded.model, loaded.tokenizer, examples,
                                       device=DEVICE, batch_size=batch_size)
        assert res.n == len(EXAMPLES)
        assert res.predictions == ref["preds"] and res.predictions_norm == ref["preds_norm"]
        for ours, theirs in zip(res.losses, ref["losses"]):
            assert ours == [pytest.approx(t, rel=REL) for t in theirs]
        assert (res.acc, res.acc_norm) == (pytest.approx(ref["acc"]),
                                           pytest.approx(ref["acc_norm"]))
    # the same through the command line: one JSON line, last on stdout
    assert main(["--hellaswag", str(hs_file), "--checkpoint", str(hf_gpt2), "--device", DEVICE,
                 "--dtype", "float32", "--batch-size", "5"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["n"] == 8 and summary["task"] == "hellaswag"
    assert summary["acc"] == pytest.approx(ref["acc"])
    assert summary["acc_norm"] == pytest.approx(ref["acc_norm"])
    # a length-normalised choice differs from the summed one somewhere in this file, so the
    # two figures are really computed apart
    assert ref["preds"] != ref["preds_norm"]


def test_exactly_the_ending_tokens_are_scored(hf_gpt2: Path, hs_file: Path) -> None:
    """A fake model that makes the right endings' tokens likely, wherever they are: each
    ending's loss is then known in closed form, and counts only the ending's own tokens."""
    import math

    loaded = load_model(hf_gpt2)
    tok = loaded.tokenizer
    examples = read_hellaswag(hs_file)
    right = sorted({t for ex in examples for t in tok.encode_ordinary(" " + ex.endings[ex.label])})
    vocab = loaded.model.config.vocab_size

    class Oracle(torch.nn.Module):
        config = loaded.model.config

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*idx.shape, vocab)
            logits[..., right] = 20.0
            return logits

    z = len(right) * math.exp(20.0) + vocab - len(right)
    hit, miss = math.log(z) - 20.0, math.log(z)  # loss of a right / any other token
    res = evaluate_multiple_choice(Oracle(), tok, examples, device="cpu", batch_size=3)
    for ex, losses in zip(examples, res.losses):
        for ending, (total, mean) in zip(ex.endings, losses):
            ids = tok.encode_ordinary(" " + ending)
            expected = sum(hit if t in right else miss for t in ids)
            assert total == pytest.approx(expected, rel=1e-6)
            assert mean == pytest.approx(expected / len(ids), rel=1e-6)
    # Right endings are made of likely tokens only, so acc_norm is perfect but for ties won
    # by the first ending, as argmin's: example 5's ending 0 is a prefix of the right ending 2
    # (same mean), example 6 has its right ending twice (0 and 1).
    assert res.predictions_norm == [0, 0, 1, 0, 0, 0, 0, 3]
    assert res.acc_norm == pytest.approx(6 / 8)


@pytest.mark.device
def test_bfloat16_autocast_agrees(hf_gpt2: Path, hs_file: Path) -> None:
    loaded = load_model(hf_gpt2)
    examples = read_hellaswag(hs_file)
    fp32 = evaluate_multiple_choice(loaded.model, loaded.tokenizer, examples, device=DEVICE)
    bf16 = evaluate_multiple_choice(loaded.model, loaded.tokenizer, examples, device=DEVICE,
                                    dtype=torch.bfloat16)
    for a, b in zip(fp32.losses, bf16.losses):
        assert [s for s, _ in b] == [pytest.approx(s, rel=2e-2) for s, _ in a]


def test_torchrun_two_processes_equal_one(hf_gpt2: Path, hs_file: Path) -> None:
    args = ["--hellaswag", str(hs_file), "--checkpoint", str(hf_gpt2), "--device", "cpu",
            "--dtype", "float32", "--batch-size", "2"]
    one = run_cli(args)
    two = run_cli(args, launcher=["-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2"])
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert last_json(two.stdout) == last_json(one.stdout)
    assert two.stdout.count('"acc_norm"') == 1  # rank 0 alone prints


@pytest.mark.device
def test_run_folder_limit_and_progress(tmp_path: Path, hs_file: Path,
                                      capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A smallgpt run folder (its own tokenizer, a padded vocabulary), --limit, and the
    progress bar on a terminal."""
    tok = Tokenizer.train([(FIXTURES / "english.txt").read_text(encoding="utf-8")],
                          vocab_size=300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32,
                    position="rope")
    model = GPT(cfg)
    Checkpoint(cfg, model.state_dict(), tok.to_json_str()).save(tmp_path / "ckpt_latest.pt")
    assert main(["--hellaswag", str(hs_file), "--checkpoint", str(tmp_path), "--limit", "5",
                 "--dtype", "float32", "--device", DEVICE]) == 0
    summary = last_json(capsys.readouterr().out)
    direct = evaluate_multiple_choice(model, tok, read_hellaswag(hs_file)[:5], device=DEVICE)
    assert summary["n"] == 5
    assert (summary["acc"], summary["acc_norm"]) == (direct.acc, direct.acc_norm)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ["--hellaswag", str(hs_file), "--checkpoint", str(tmp_path), "--batch-size", "2",
            "--device", DEVICE]
    assert main(args) == 0
    assert "evaluating" in capsys.readouterr().err  # 4 batches of 2 examples
    assert main([*args, "--no-progress"]) == 0
    assert "evaluating" not in capsys.readouterr().err


# ---------------------------------------------------------------- rendering


def test_render_follows_llmc_and_fits_the_context(hf_gpt2: Path) -> None:
    tok = load_model(hf_gpt2).tokenizer
    ex = MultipleChoiceExample("The end<|endoftext|> of", ["it", "b", "c", "d"], 0)
    r = render_example(tok, ex, block_size=64)
    ctx = tok.encode_ordinary("The end<|endoftext|> of")
    assert 50256 not in ctx  # special-token text is text
    assert r.rows[0] == ctx + tok.encode_ordinary(" it") and r.starts[0] == len(ctx)
    long_ctx = MultipleChoiceExample(" ".join(["word"] * 100), ["one two", "b", "c", "d"], 0)
    r = render_example(tok, long_ctx, block_size=16)
    assert all(len(row) == 16 for row in r.rows)
    assert r.rows[0][r.starts[0]:] == tok.encode_ordinary(" one two")
    with pytest.raises(EvalDataError, match="no room"):
        render_example(tok, MultipleChoiceExample("a", ["x " * 20, "b", "c", "d"], 0), 16)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, needle", [
    ("{not json", ":2: not JSON"),
    ('{"ctx": "a", "endings": ["a", "b", "c"], "label": 0}', ":2: 'endings' must be a list of 4"),
    ('{"ctx": "a", "endings": ["a", "b", "c", 4], "label": 0}', ":2: 'endings'"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 4}', ":2: 'label' must be"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": true}', ":2: 'label'"),
    ('{"ctx": "a", "endings": ["a", "b", "c", "d"]}', ":2: missing 'label'"),
    ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}', ":2: 'ctx' must be"),
    ('[1, 2]', ":2: expected a JSON object"),
])
def test_malformed_lines_are_one_line_errors(tmp_path: Path, hf_gpt2: Path, line: str,
                                             needle: str, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n", encoding="utf-8")
    assert main(["--hellaswag", str(bad), "--checkpoint", str(hf_gpt2)]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, f"bad.jsonl{needle}")
    assert captured.out == ""


def test_bad_arguments_are_one_line_errors(tmp_path: Path, hf_gpt2: Path, hs_file: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--hellaswag", str(tmp_path / "none.jsonl"), "--checkpoint", str(hf_gpt2)],
         "no such file"),
        (["--hellaswag", str(hs_file), "--checkpoint", str(tmp_path / "nope")], "not found"),
        (["--hellaswag", str(hs_file), "--checkpoint", str(tmp_path)], "no checkpoint"),
        (["--hellaswag", str(hs_file), "--checkpoint", str(hf_gpt2), "--batch-size", "0"],
         "--batch-size"),
        (["--hellaswag", str(hs_file), "--checkpoint", str(hf_gpt2), "--device", "tpu"], "tpu"),
    ]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cases.append((["--hellaswag", str(tmp_path / "empty.jsonl"), "--checkpoint", str(hf_gpt2)],
                  "no example"))
    bare = tmp_path / "bare"  # a Hugging Face folder without tokenizer files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_gpt2 / name).read_bytes())
    cases.append((["--hellaswag", str(hs_file), "--checkpoint", str(bare)], "--gpt2-vocab"))
    for args, needle in cases:
        assert main(args) == 2, args
        assert_one_line_error(capsys.readouterr().err, needle)
    # ... and --gpt2-vocab fixes the last one
    assert main(["--hellaswag", str(hs_file), "--checkpoint", str(bare), "--gpt2-vocab",
                 str(FIXTURES / "gpt2"), "--limit", "2", "--device", "cpu"]) == 0
    assert last_json(capsys.readouterr().out)["n"] == 2


def test_entry_point_errors_without_traceback(tmp_path: Path, hf_gpt2: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a"}\n')
    res = run_cli(["--hellaswag", str(bad), "--checkpoint", str(hf_gpt2)])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert_one_line_error(res.stderr, "bad.jsonl:1: missing 'endings'")
    res = run_cli(["--checkpoint", str(hf_gpt2)])
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "--hellaswag")


@pytest.mark.device
def test_default_dtype_is_float32_on_every_device(hf_gpt2: Path, hs_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """smallgpt-eval scores in fp32 unless asked otherwise, on a GPU too (bf16 can flip a
    choice between two close endings); --dtype auto is the trainer's choice."""
    import smallgpt.evaluate
    from smallgpt.train.hardware import resolve_dtype

    seen: List[torch.dtype] = []
    real = smallgpt.evaluate.evaluate_multiple_choice

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(kw["dtype"])
        return real(*args, **kw)

    monkeypatch.setattr(smallgpt.evaluate, "evaluate_multiple_choice", spy)
    base = ["--hellaswag", str(hs_file), "--checkpoint", str(hf_gpt2), "--limit", "2",
            "--device", DEVICE]
    assert main(base) == 0
    assert main([*base, "--dtype", "auto"]) == 0
    capsys.readouterr()
    assert seen == [torch.float32, resolve_dtype("auto", torch.device(DEVICE))]
