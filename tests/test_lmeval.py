"""lm-evaluation-harness integration (:mod:`smallgpt.lmeval`, ``smallgpt-eval --tasks``),
``smallgpt-eval --perplexity`` and the batched scorer under both.

Parity: on a random GPT-2 saved by ``transformers`` our ``LM`` and lm-eval's own ``hf``
backend give the same value of every metric (1e-4 relative) on the four committed fixture
tasks of ``tests/fixtures/lmeval`` (a LAMBADA-style last word, WikiText-style rolling
perplexity, HellaSwag-style multiple choice, greedy generation), offline. Perplexity is
checked against an independent computation with ``transformers``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from smallgpt.checkpoint import load_model
from smallgpt.cli.eval import main
from smallgpt.evaluate import count_words, perplexity_windows, sliding_window_perplexity
from smallgpt.scoring import score_tokens

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = FIXTURES / "lmeval"
KINDS = ["tiny_lambada", "tiny_wikitext", "tiny_mc", "tiny_gen"]


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """No hub, and Hugging Face datasets' cache in a temporary folder. Two of lm-eval's costs
    that do not touch scoring are cut: its report of the environment (subprocesses such as
    ``pip list``, seconds per evaluation) and the process pool of its bootstrap standard errors
    (the single-process loop draws the same resamples, seeded per chunk)."""
    import datasets
    import huggingface_hub.constants
    import lm_eval.evaluator

    mp = pytest.MonkeyPatch()
    mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    mp.setenv("DISABLE_MULTIPROC", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets"))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def gpt2(hf_gpt2: Path) -> Any:
    return load_model(hf_gpt2)


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple:
    try:
        code = main(list(args))
    except SystemExit as e:  # usage errors exit from argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    """Exit 2 and the error as the last line of stderr (lm-eval may have logged before it),
    never a traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("smallgpt-eval: error: "), err
    assert needle in last, last


# ----------------------------------------------------------------------------- parity with hf


@pytest.fixture(scope="module")
def both(hf_gpt2: Path) -> Dict[str, Dict[str, Any]]:
    """Results of our LM and of lm-eval's hf backend on the four fixture tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from smallgpt.lmeval import SmallGPTLM, evaluate_tasks, load_tasks, task_manager

    ours = evaluate_tasks(SmallGPTLM(checkpoint=hf_gpt2, batch_size=3, device="cpu",
                                     progress=False),
                          KINDS, include_path=[TASKS], log_samples=True)
    tm = task_manager([TASKS], KINDS)
    hf = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(hf_gpt2), dtype="float32", batch_size=4, device="cpu"),
        tasks=load_tasks(KINDS, tm), task_manager=tm, log_samples=True)
    return {"ours": ours, "hf": hf}


def test_every_metric_equals_hf(both: Dict[str, Dict[str, Any]]) -> None:
    from smallgpt.lmeval import summarize

    ours, hf = summarize(both["ours"]), summarize(both["hf"])
    assert set(ours) == set(KINDS) == set(hf)
    expected = {"tiny_lambada": {"perplexity", "acc"},
                "tiny_wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
                "tiny_mc": {"acc", "acc_norm"}, "tiny_gen": {"exact_match"}}
    for task, metrics in expected.items():
        assert metrics <= set(hf[task]), hf[task]
        assert set(ours[task]) == set(hf[task])
        for name, value in hf[task].items():
            assert ours[task][name] == pytest.approx(value, rel=1e-4, abs=1e-12), (task, name)
    # Not a vacuous comparison: the random model gets some choices right and some wrong.
    assert 0 < hf["tiny_mc"]["acc"] < 1


def test_every_request_equals_hf(both: Dict[str, Dict[str, Any]]) -> None:
    """Per request, not only the aggregates: log-likelihoods to 1e-4, the same is_greedy,
    and the same greedy generations, character for character."""
    for task in KINDS:
        ours, hf = both["ours"]["samples"][task], both["hf"]["samples"][task]
        assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in hf]
        for a, b in zip(ours, hf):
            for ra, rb in zip(a["resps"], b["resps"]):
                if task == "tiny_gen":
                    assert ra == rb
                elif task == "tiny_wikitext":
                    assert ra[0] == pytest.approx(rb[0], rel=1e-4)
                else:
                    assert ra[0][0] == pytest.approx(rb[0][0], rel=1e-4)
                    assert ra[0][1] == rb[0][1]
    generated = [s["resps"][0][0] for s in both["ours"]["samples"]["tiny_gen"]]
    assert all(generated) and len(set(generated)) > 1


def test_fixtures_exercise_truncation_and_rolling_windows(gpt2: Any) -> None:
    """The parity above covers requests longer than the 64-token context (cut from the left
    as hf cuts them) and documents of several rolling windows."""
    tok = gpt2.tokenizer
    block = gpt2.model.config.block_size
    lam = [json.loads(line)["text"] for line in (TASKS / "tiny_lambada.jsonl").open()]
    assert max(len(tok.encode_ordinary(t)) for t in lam) > block + 1
    pages = [json.loads(line)["page"] for line in (TASKS / "tiny_wikitext.jsonl").open()]
    assert max(len(tok.encode_ordinary(p)) for p in pages) > 2 * block


# ----------------------------------------------------------------------------- registration


def test_registered_with_lm_eval(hf_gpt2: Path) -> None:
    """``--model smallgpt`` / ``simple_evaluate(model="smallgpt", model_args=...)``: lm-eval
    builds our class from its argument string, with the extra arguments it always passes."""
    from lm_eval.api.registry import get_model

    from smallgpt.lmeval import SmallGPTLM

    cls = get_model("smallgpt")
    assert cls is SmallGPTLM
    lm = cls.create_from_arg_string(f"checkpoint={hf_gpt2},dtype=float32,batch_size=2",
                                    {"batch_size": None, "max_batch_size": None,
                                     "device": None})
    assert lm.batch_size == 2 and lm.max_length == 64 and lm.dtype == torch.float32
    assert lm.eot_token_id == 50256 and lm.device.type in ("cpu", "cuda")


def test_modern_run_evaluates(tmp_path_factory: pytest.TempPathFactory,
                              capsys: pytest.CaptureFixture) -> None:
    """The point of the harness model: a run GPT-2 cannot represent (rotary positions, relu^2,
    QK-norm, RMSNorm, logit soft-cap, untied head, padded vocabulary) evaluates on every task
    kind, and its log-likelihoods are the model's own (checked with a plain forward)."""
    from helpers import tiny_cfg

    from smallgpt.corpus import tokenize_corpus
    from smallgpt.lmeval import SmallGPTLM, evaluate_tasks
    from smallgpt.train import train

    root = tmp_path_factory.mktemp("modern")
    tokenize_corpus([FIXTURES / "english.txt"], root / "data", vocab_size=300,
                    val_fraction=0.1)
    train(tiny_cfg(root / "run", root / "data", max_steps=4, eval_interval=0,
                   model__block_size=64, model__position="rope", model__activation="relu2",
                   model__qk_norm=True, model__norm="rmsnorm", model__logit_softcap=15.0,
                   model__tie_embeddings=False))
    capsys.readouterr()  # the training's console
    out = root / "results.json"
    code, stdout, err = run(capsys, "--tasks", ",".join(KINDS), "--include-path", str(TASKS),
                            "--checkpoint", str(root / "run"), "--limit", "3", "--device",
                            "cpu", "--output", str(out), "--no-progress")
    assert code == 0, err
    assert len(stdout.strip().splitlines()) == 1  # lm-eval's own prints go to stderr
    summary = json.loads(stdout)
    results = json.loads(out.read_text())
    for task in KINDS:
        assert results["results"][task]["sample_len"] == 3
        numbers = {k.split(",")[0]: v for k, v in results["results"][task].items()
                   if isinstance(v, (int, float))}
        assert summary[task] == numbers and all(math.isfinite(v) for v in numbers.values())
    assert results["config"]["model_source"].endswith(".pt")
    assert results["config"]["model_config"]["position"] == "rope"

    loaded = load_model(root / "run")
    assert loaded.model.config.vocab_size > loaded.tokenizer.vocab_size  # padded
    lm = SmallGPTLM(model=loaded.model, tokenizer=loaded.tokenizer, device="cpu",
                    batch_size=2, progress=False)
    res = evaluate_tasks(lm, ["tiny_lambada"], include_path=[TASKS], limit=3,
                         log_samples=True)
    for sample in res["samples"]["tiny_lambada"]:
        context, continuation = sample["arguments"][0]
        whole = loaded.tokenizer.encode(context + continuation)
        n = len(whole) - len(loaded.tokenizer.encode(context))
        ids = torch.tensor([whole[-65:]])
        with torch.no_grad():
            logp = loaded.model(ids[:, :-1]).float().log_softmax(-1)[0, -n:]
        want = float(logp.gather(1, ids[0, -n:, None]).sum())
        assert sample["resps"][0][0][0] == pytest.approx(want, rel=1e-5)


def test_yaml_file_task_few_shot_and_output(hf_gpt2: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """A task named by its YAML file (its data found next to it from any working directory),
    --num-fewshot, and --output in lm_eval --output_path's format."""
    out = tmp_path / "r.json"
    code, stdout, err = run(capsys, "--tasks", str(TASKS / "tiny_mc.yaml"), "--checkpoint",
                            str(hf_gpt2), "--num-fewshot", "2", "--limit", "2", "--output",
                            str(out), "--no-progress", "--batch-size", "2")
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["n-shot"]["tiny_mc"] == 2 and results["n-samples"]["tiny_mc"]["effective"] == 2
    assert results["configs"]["tiny_mc"]["num_fewshot"] == 2
    for key in ("results", "versions", "config", "date", "task_hashes", "model_name",
                "total_evaluation_time_seconds"):
        assert key in results
    summary = json.loads(stdout)
    assert summary["tiny_mc"]["acc"] == results["results"]["tiny_mc"]["acc,none"]


# ----------------------------------------------------------------------------- the scorer


def test_score_tokens_batches_and_shares_rows(gpt2: Any) -> None:
    """Every batch size gives the same scores, and each row equals a plain forward over it:
    plain rows of many lengths, rows with one input (a duplicate, another last token), and
    multiple-choice groups (one context, endings of several lengths) whose context runs once
    through the KV cache, two groups with contexts of the same length sharing those passes."""
    model = gpt2.model
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> List[int]:
        return torch.randint(0, 50257, (n,), generator=g).tolist()

    rows: List[tuple] = [(rand(length), n) for length, n in
                         ((5, 1), (30, 4), (65, 64), (12, 11), (30, 1), (2, 1))]
    rows.append((rows[1][0][:-1] + [7], 1))  # the input of row 1, another last token
    rows.append(rows[3])  # a duplicate
    for context_len in (40, 40, 17):
        context = rand(context_len)
        for ending in (3, 9, 1, 5):
            rows.append((context + rand(ending), ending))
    one = score_tokens(model, rows, batch_size=1)
    many = score_tokens(model, rows, batch_size=5)
    for (a, ga), (b, gb), (tokens, n) in zip(one, many, rows):
        assert a == pytest.approx(b, rel=1e-6) and ga == gb
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logp = model(ids[:, :-1]).log_softmax(-1)[0, -n:]
        assert a == pytest.approx(float(logp.gather(1, ids[0, -n:, None]).sum()), rel=1e-5)
        assert ga == bool((logp.argmax(-1) == ids[0, -n:]).all())
    with pytest.raises(ValueError, match="do not fit"):
        score_tokens(model, [(list(range(66)), 1)])
    with pytest.raises(ValueError, match="scores 0"):
        score_tokens(model, [([1, 2], 0)])
    with pytest.raises(ValueError, match="scores 2"):
        score_tokens(model, [([1, 2], 2)])


def test_multiple_choice_contexts_run_once(gpt2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the sharing saves: positions through the model for four choices after a
    40-token context (one pass of the context, then the four endings)."""
    seen: List[int] = []
    real = type(gpt2.model).hidden_states

    def counting(self: Any, idx: torch.Tensor, cache: Any = None) -> torch.Tensor:
        seen.append(idx.shape[0] * idx.shape[1])
        return real(self, idx, cache)

    monkeypatch.setattr(type(gpt2.model), "hidden_states", counting)
    context = list(range(1000, 1040))
    rows = [(context + e, len(e)) for e in ([5, 5], [5, 5, 5], [6, 6, 6], [5, 5, 5, 5])]
    score_tokens(gpt2.model, rows, batch_size=8)
    assert seen == [39, 4 * 4]  # the context less its last token, then 4 tails of <= 4


# ----------------------------------------------------------------------------- perplexity


def _hf_sliding_window(folder: Path, text: str, stride: int) -> float:
    """Summed NLL (nats) by the sliding-window recipe of transformers' documentation, with
    its own tokenizer and model, on ``<|endoftext|>`` + the text."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"]])
    ctx, total, prev_end = model.config.n_positions, 0.0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + ctx, ids.shape[1] - 1)
        trg = end - prev_end
        window = ids[:, begin : end + 1]
        with torch.no_grad():
            logp = model(window[:, :-1]).logits.log_softmax(-1)[0, -trg:]
        total -= float(logp.gather(1, window[0, -trg:, None]).sum())
        prev_end = end
        if end == ids.shape[1] - 1:
            break
    return total


@pytest.mark.parametrize("stride", [64, 24, 5])
def test_perplexity_equals_transformers(hf_gpt2: Path, gpt2: Any, stride: int) -> None:
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")[3000:3000 + 40 * stride + 700]
    got = sliding_window_perplexity(gpt2.model, gpt2.tokenizer, text, stride=stride,
                                    batch_size=4)
    nll = _hf_sliding_window(hf_gpt2, text, stride)
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.tokens == len(gpt2.tokenizer.encode_ordinary(text))
    assert got.token_perplexity == pytest.approx(math.exp(nll / got.tokens), rel=1e-5)
    assert got.bits_per_byte == pytest.approx(nll / len(text.encode()) / math.log(2), rel=1e-5)
    assert got.word_perplexity == pytest.approx(math.exp(nll / len(re.split(r"\s+", text))),
                                                rel=1e-5)


def test_stride_equal_to_the_context_gives_disjoint_windows(gpt2: Any) -> None:
    """Each window then starts where the last one ended and sees nothing before it."""
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")[9000:11000]
    block = gpt2.model.config.block_size
    got = sliding_window_perplexity(gpt2.model, gpt2.tokenizer, text, stride=block)
    stream = [gpt2.tokenizer.eot_id] + gpt2.tokenizer.encode_ordinary(text)
    nll = 0.0
    for start in range(0, len(stream) - 1, block):
        chunk = torch.tensor([stream[start : start + block + 1]])
        with torch.no_grad():
            logp = gpt2.model(chunk[:, :-1]).log_softmax(-1)[0]
        nll -= float(logp.gather(1, chunk[0, 1:, None]).sum())
    assert got.windows == math.ceil((len(stream) - 1) / block) > 3
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert perplexity_windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert perplexity_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert count_words(" a b\n c ") == 5  # lm-eval's count: leading/trailing empties


def test_perplexity_cli(hf_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                        gpt2: Any) -> None:
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")[20000:22000]
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    out = tmp_path / "ppl.json"
    code, stdout, err = run(capsys, "--perplexity", str(f), "--checkpoint", str(hf_gpt2),
                            "--stride", "32", "--output", str(out), "--no-progress")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    want = sliding_window_perplexity(gpt2.model, gpt2.tokenizer, text, stride=32)
    assert summary["token_perplexity"] == pytest.approx(want.token_perplexity, rel=1e-6)
    assert summary["stride"] == 32 and summary["context"] == 64
    assert summary["words"] == count_words(text) and summary["bytes"] == len(text.encode())
    assert json.loads(out.read_text()) == summary


# ----------------------------------------------------------------------------- bad input


def _task_dir(tmp_path: Path, name: str, rows: List[str], output_type: str = "loglikelihood",
              extra: str = "") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"data.jsonl\noutput_type: {output_type}\ntest_split: test\ndoc_to_text: "
        f"\"{{{{ctx}}}}\"\ndoc_to_target: \"{{{{target}}}}\"\n{extra}", encoding="utf-8")
    return folder


def test_bad_input_one_line_exit_2(hf_gpt2: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results.json"
    out.write_text("previous results\n")
    common = ["--checkpoint", str(hf_gpt2), "--output", str(out), "--no-progress"]
    broken = _task_dir(tmp_path, "broken", ['{"ctx": "a", "target": " b"}', "{not json"])
    long_cont = " word" * 80  # 80 tokens: longer than the 64-token context
    too_long = _task_dir(tmp_path, "too_long",
                         [json.dumps({"ctx": "The end", "target": long_cont})])
    greedy = _task_dir(tmp_path, "greedy", [json.dumps({"ctx": "Hi", "target": " x"})],
                       "generate_until", "generation_kwargs:\n  max_gen_toks: 64\n")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    cases = [
        (["--tasks", "broken", "--include-path", str(broken)], "task broken: cannot load it"),
        (["--tasks", "too_long", "--include-path", str(too_long)],
         "continuation of 80 tokens does not fit the model's context of 64"),
        (["--tasks", "greedy", "--include-path", str(greedy)],
         "asks for 64 new tokens but the model's context is 64"),
        (["--tasks", "tiny_mc", "--include-path", str(TASKS), "--limit", "0"],
         "--limit must be at least 1, got 0"),
        (["--tasks", "tiny_mc", "--include-path", str(tmp_path / "nowhere")], "not a folder"),
        (["--tasks", "tiny_mc", "--include-path", str(TASKS), "--stride", "4"],
         "--stride applies to --perplexity only"),
        (["--perplexity", str(tmp_path / "missing.txt")], "no such file"),
        (["--perplexity", str(TASKS / "tiny_mc.jsonl"), "--stride", "65"],
         "--stride 65 is longer than the model's context (64)"),
    ]
    for args, needle in cases:
        code, _, err = run(capsys, *args, *common)
        assert_one_line_error(code, err, needle)
        assert out.read_text() == "previous results\n"
    code, _, err = run(capsys, "--tasks", "tiny_mc", "--include-path", str(TASKS),
                       "--checkpoint", str(not_a_model), "--output", str(out))
    assert_one_line_error(code, err, "no checkpoint in")
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["results.json"]


def test_unknown_task_name(hf_gpt2: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    """Checked against lm-eval's whole task index (its thousands of YAMLs)."""
    code, _, err = run(capsys, "--tasks", "lambada_opena", "--checkpoint", str(hf_gpt2),
                       "--output", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "unknown task 'lambada_opena'")
    assert "did you mean lambada_openai" in err
    assert not (tmp_path / "r.json").exists()


def test_without_lm_eval_the_error_names_the_extra(hf_gpt2: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, _, err = run(capsys, "--tasks", "hellaswag", "--checkpoint", str(hf_gpt2))
    assert_one_line_error(code, err, "pip install 'smallgpt[eval]'")
    assert len(err.strip().splitlines()) == 1
