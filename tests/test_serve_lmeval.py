"""lm-eval's ``local-completions`` model against a live smallgpt-serve gives the loglikelihoods
that lm-eval's own ``hf`` backend computes in-process on the same GPT-2 (transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (pip install 'smallgpt[serve]')")
for _name in ("lm_eval", "tenacity", "accelerate"):  # lm-eval[api] and lm-eval[hf]
    pytest.importorskip(_name, reason="needs lm-eval with its api and hf extras "
                        "(pip install 'smallgpt[test]')")

import torch  # noqa: E402
import yaml  # noqa: E402
from serving import FIXTURES, ThreadServer  # noqa: E402

from smallgpt.checkpoint import load_model  # noqa: E402
from smallgpt.serve.app import create_app  # noqa: E402
from smallgpt.serve.engine import Engine  # noqa: E402

TASK = "smallgpt_tiny_choice"


def task_config(tmp: Path) -> dict:
    cfg = yaml.safe_load((FIXTURES / "lmeval" / "tiny_choice.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(FIXTURES / "lmeval" / "tiny_choice.jsonl")
    cfg["dataset_kwargs"]["cache_dir"] = str(tmp / "datasets")
    return cfg


def evaluate(model: str, model_args: str, tmp: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task_config(tmp)],
                                   task_manager=TaskManager(include_defaults=False),
                                   log_samples=True, batch_size=1 if model == "hf" else 4,
                                   device="cpu")


def loglikelihoods(result: dict) -> list:
    """``(loglikelihood, is_greedy)`` of every request, in lm-eval's document order."""
    return [tuple(r[0]) for s in result["samples"][TASK] for r in s["resps"]]


def test_local_completions_matches_in_process_hf(hf_gpt2: Path, tmp_path: Path,
                                                  monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = evaluate("hf", f"pretrained={hf_gpt2},dtype=float32", tmp_path)
        loaded = load_model(hf_gpt2)
        engine = Engine(loaded.model, loaded.tokenizer, max_batch=8)
        app = create_app(engine, loaded.tokenizer, model_name="tiny-gpt2")
        with ThreadServer(app) as server:
            # tokenizer_backend=remote: lm-eval tokenizes through the server's /tokenize.
            got = evaluate("local-completions",
                           f"model=tiny-gpt2,base_url={server.url}/v1/completions,"
                           "tokenizer_backend=remote,tokenized_requests=True,max_length=64",
                           tmp_path)
            assert engine.stats()["requests_total"] >= 4  # batches of 4 requests
    finally:
        torch.set_num_threads(threads)
    want, have = loglikelihoods(ref), loglikelihoods(got)
    assert len(want) == len(have) == 14  # 5 questions, 14 choices (one with no context)
    for (w, wg), (h, hg) in zip(want, have):
        assert h == pytest.approx(w, abs=1e-4)
        assert hg == wg
    assert got["results"][TASK]["acc,none"] == ref["results"][TASK]["acc,none"]
