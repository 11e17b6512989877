"""lm-evaluation-harness speed: smallgpt's ``SmallGPTLM`` against lm-eval's own ``hf`` backend.

Both arms serve the same lm-eval requests (built once per task by lm-eval from task YAMLs) on
the same weights: a random GPT-2 saved by ``transformers`` (GPT-2 small by default: 12 layers,
768 wide, context 1024, GPT-2's vocabulary from ``tests/fixtures/gpt2``), which ``hf`` loads as
a ``GPT2LMHeadModel`` and smallgpt through ``load_model``. The tasks are the four shapes of the
committed fixtures (``tests/fixtures/lmeval``) with more documents, cut from
``tests/fixtures/english.txt``: a LAMBADA-style last word, WikiText-style pages (rolling
log-likelihood), HellaSwag-style four-way multiple choice, greedy generation.

Timed: the backend's own request method (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``, tokenization included), CPU, float32, the same ``--threads`` and
``--batch-size`` for both, arms interleaved (the order alternates) for ``--repeats`` rounds.
Reported: examples (documents) per second, mean ± sd, the ratio ours / hf, and the largest
difference between the two arms' answers (log-likelihoods relative; generations counted equal).

Needs the ``bench`` extra (lm-eval, and accelerate for its ``hf`` backend):
``pip install '.[bench]'``. Offline: no hub, no download (the data sets are local files).

    python benches/bench_eval.py                       # GPT-2 small, ~10-20 min on 2 cores
    python benches/bench_eval.py --model tiny --docs 8 --repeats 1 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

import harness  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MODELS = {  # name: (n_layer, n_embd, n_head, n_positions)
    "small": (12, 768, 12, 1024),
    "tiny": (2, 64, 2, 128),
}
TASKS = {"lambada": "tiny_lambada", "wikitext": "tiny_wikitext", "mc": "tiny_mc",
         "gen": "tiny_gen"}


def make_model(folder: Path, shape: Tuple[int, int, int, int]) -> Path:
    """A random GPT-2 of ``shape`` saved by transformers, with GPT-2's tokenizer files."""
    import torch
    import transformers

    n_layer, n_embd, n_head, n_positions = shape
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=n_embd,
                                  n_layer=n_layer, n_head=n_head)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    shutil.copy(FIXTURES / "gpt2" / "encoder.json", folder / "vocab.json")
    shutil.copy(FIXTURES / "gpt2" / "vocab.bpe", folder / "merges.txt")
    return folder


def _write_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def make_tasks(folder: Path, docs: int) -> Path:
    """The fixture task YAMLs over ``docs`` documents each, cut from english.txt."""
    text = (FIXTURES / "english.txt").read_text(encoding="utf-8")
    paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= 40]
    sents = [s for p in paras for s in re.split(r"(?<=[.!?])\s+", p) if 12 <= len(s.split()) <= 30]
    rng = random.Random(0)
    lam = []
    for i in range(docs):  # ~60-90 words, HellaSwag/LAMBADA-sized contexts
        words = paras[i % len(paras)].split()[: 60 + 3 * (i % 10)]
        lam.append({"text": " ".join(words[:-1] + [re.sub(r"\W", "", words[-1]) or "end"])})
    # 1 to 8 paragraphs: from a fraction of GPT-2's context to a page of two windows
    pages = [{"page": " = Page = \n\n " + "\n\n".join(
        paras[(4 * i + k) % len(paras)] for k in range(1 + i % 8)) + " \n"}
        for i in range(docs)]
    mc, gen = [], []
    for i in range(docs):
        w = sents[i % len(sents)].split()
        cut = len(w) // 2
        others = [" ".join(s.split()[len(s.split()) // 2:]) for s in rng.sample(sents, 3)]
        label = i % 4
        context = " ".join(paras[(i + 7) % len(paras)].split()[:40] + w[:cut])
        mc.append({"ctx": context, "endings": others[:label] + [" ".join(w[cut:])] +
                   others[label:], "label": label})
        gen.append({"prompt": context, "continuation": " " + " ".join(w[cut:])})
    for name, rows in (("tiny_lambada", lam), ("tiny_wikitext", pages), ("tiny_mc", mc),
                       ("tiny_gen", gen)):
        shutil.copy(FIXTURES / "lmeval" / f"{name}.yaml", folder / f"{name}.yaml")
        _write_jsonl(folder / f"{name}.jsonl", rows)
    return folder


def requests_of(task: Any) -> Tuple[str, List[Any], int]:
    """lm-eval's request type, its instances and the number of documents of ``task``."""
    if task.get_config("num_fewshot") is None:  # as simple_evaluate does
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    instances = task.instances
    kind = instances[0].request_type
    return kind, instances, len({inst.doc_id for inst in instances})


def run_arm(lm: Any, kind: str, instances: List[Any]) -> Tuple[float, List[Any]]:
    reqs = copy.deepcopy(instances)
    t0 = time.perf_counter()
    out = getattr(lm, kind)(reqs, disable_tqdm=True)
    return time.perf_counter() - t0, out


def max_difference(kind: str, a: List[Any], b: List[Any]) -> str:
    if kind == "generate_until":
        return f"{sum(x == y for x, y in zip(a, b))}/{len(a)} equal"
    va = [x[0] if isinstance(x, tuple) else x for x in a]
    vb = [x[0] if isinstance(x, tuple) else x for x in b]
    return f"{max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(va, vb)):.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--tasks", default="lambada,wikitext,mc,gen",
                    help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--docs", type=int, default=48, help="documents per task (default 48)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--batch-size", type=int, default=16, help="both arms (default 16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for both arms (default: all cores)")
    ap.add_argument("--no-record", action="store_true", help="print only; RESULTS.md untouched")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    # Before anything imports datasets: its cache here, and no hub.
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from smallgpt.lmeval import SmallGPTLM, load_tasks, task_manager

    names = [TASKS[t.strip()] for t in args.tasks.split(",") if t.strip()]
    with tmp:
        folder = make_model(root / "model", MODELS[args.model])
        include = make_tasks(Path(tempfile.mkdtemp(dir=root)), args.docs)
        arms = {"smallgpt": SmallGPTLM(checkpoint=folder, device="cpu", dtype="float32",
                                       batch_size=args.batch_size, progress=False),
                "hf": HFLM(pretrained=str(folder), dtype="float32", device="cpu",
                           batch_size=args.batch_size)}
        tm = task_manager([include], names)
        rows = []
        for task in load_tasks(names, tm):
            kind, instances, n_docs = requests_of(task)
            times: Dict[str, List[float]] = {"smallgpt": [], "hf": []}
            answers: Dict[str, Any] = {}
            for r in range(args.repeats):
                order = ["smallgpt", "hf"] if r % 2 == 0 else ["hf", "smallgpt"]
                for arm in order:
                    dt, answers[arm] = run_arm(arms[arm], kind, instances)
                    times[arm].append(n_docs / dt)
                    print(f"{task.task_name} {arm} round {r + 1}: {n_docs / dt:.2f} ex/s",
                          file=sys.stderr, flush=True)
            ratio = (sum(times["smallgpt"]) / len(times["smallgpt"])) / \
                (sum(times["hf"]) / len(times["hf"]))
            rows.append([task.task_name, kind, n_docs, len(instances),
                         harness.fmt_mean(times["smallgpt"], 2), harness.fmt_mean(times["hf"], 2),
                         f"{ratio:.2f}x", max_difference(kind, answers["smallgpt"],
                                                         answers["hf"])])
    n_layer, n_embd, _, ctx = MODELS[args.model]
    body = harness.md_table(
        ["task", "request type", "docs", "requests", "smallgpt ex/s", "hf ex/s",
         "ratio", "largest difference"], rows)
    body += (f"\n\nRandom GPT-2 {n_layer} layers x {n_embd}, context {ctx}, float32, batch size "
             f"{args.batch_size} for both, {args.repeats} interleaved rounds; examples/s counts "
             "documents (a multiple-choice document is four requests).")
    harness.append_run("bench_eval", f"SmallGPTLM vs lm-eval hf, GPT-2 {args.model}", body,
                       threads=args.threads, record=not args.no_record)


if __name__ == "__main__":
    main()
