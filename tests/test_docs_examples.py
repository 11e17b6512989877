"""Every example in README.md and docs/ runs, or says why it does not.

Each fenced block of README.md and docs/**/*.md is one of:

- a ``bash`` (``sh``, ``shell``) block: run in the page's bash session (one per page, in a
  folder of its own, ``set -eo pipefail``; a failing command fails the test);
- a ``python`` block: run with ``exec`` in the page's namespace, in that folder;
- a block right after ``<!-- file: PATH -->``: its text is written to PATH in that folder
  (a config file, a task YAML), for the blocks after it;
- a block right after ``<!-- not run: REASON -->``: skipped, for the reason given (it needs a
  GPU, the network, hours, or installs packages).

Any other block fails :func:`test_every_block_is_run_or_marked`. Blocks run in page order,
with the inputs of :func:`make_inputs` in the folder (and the runs of :data:`PREPARED` for
the pages that use a run made on another page), ``SMALLGPT_MAX_STEPS=2`` so that every
training command stops after two steps, and the Hugging Face libraries offline. In a bash
session ``smallgpt-serve`` starts the server in the background and returns once it answers;
the page's servers get SIGTERM at its end and must exit cleanly. docs/contributing.md
describes all of this for whoever writes an example.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PAGES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix()
                               for p in (ROOT / "docs").rglob("*.md"))
RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
MARK = re.compile(r"^<!--\s*(not run|file):(.*)-->$")
BLOCK_TIMEOUT_S = 300
#: Runs a page uses without making them itself (made once, copied into its folder).
PREPARED: Dict[str, List[str]] = {
    "docs/evaluation.md": ["out/shakespeare-cpu", "data/shakespeare-gpt2"],
    "docs/sampling.md": ["out/shakespeare-cpu"],
    "docs/serving.md": ["out/shakespeare-cpu"],
    "docs/interop.md": ["out/finetune-shakespeare"],
}


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: str
    line: int  #: the line of its opening fence (1-based)
    lang: str
    text: str
    mark: str  #: "" (run), "not run" or "file"
    arg: str  #: the reason, or the file's path

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> List[Block]:
    """The fenced blocks of ``page`` (relative to the repository), with their markers."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    out: List[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body: List[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        prev = next((x.strip() for x in reversed(lines[:start]) if x.strip()), "")
        mk = MARK.match(prev)
        mark, arg = (mk.group(1), mk.group(2).strip()) if mk else ("", "")
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", mark, arg))
    return out


def runnable(b: Block) -> bool:
    return not b.mark and b.lang in RUN_LANGS


RUN_PAGES = [p for p in PAGES if any(runnable(b) or b.mark == "file" for b in blocks(p))]


def test_every_block_is_run_or_marked() -> None:
    bad = []
    for page in PAGES:
        for b in blocks(page):
            if b.mark == "not run" and not b.arg:
                bad.append(f"{b.where}: 'not run' needs a reason")
            elif b.mark == "file" and (not b.arg or Path(b.arg).is_absolute() or ".." in b.arg):
                bad.append(f"{b.where}: 'file' needs a relative path inside the page's folder")
            elif not b.mark and b.lang not in RUN_LANGS:
                bad.append(f"{b.where}: a {b.lang or 'plain'} block is neither run nor marked "
                           "(<!-- not run: REASON --> or <!-- file: PATH -->)")
    assert not bad, "\n".join(bad)
    assert len(RUN_PAGES) >= 10  # the parser finds the pages' examples


def test_runnable_blocks_are_found() -> None:
    """The parser sees what a reader sees: a marker applies to the next block only."""
    found = {p: blocks(p) for p in PAGES}
    readme = found["README.md"]
    assert readme[0].mark == "not run" and "pip install . &&" in readme[0].text
    assert any(runnable(b) and "smallgpt-serve out/books" in b.text for b in readme)
    files = [b for bs in found.values() for b in bs if b.mark == "file"]
    assert {b.arg for b in files} >= {"my-run.toml", "tests/fixtures/lmeval/tiny_lambada.yaml"}


# ----------------------------------------------------------------- the pages' inputs


def _paragraphs(text: str, start: int, size: int) -> str:
    """About ``size`` characters of ``text`` from ``start``, cut at paragraph ends."""
    begin = text.find("\n\n", start) + 2 if start else 0
    end = text.find("\n\n", begin + size)
    return text[begin:end if end > 0 else len(text)].strip() + "\n"


def make_gpt2(folder: Path) -> None:
    """GPT-2 small's shape where the examples need it (GPT-2's vocabulary and 1024-token
    context), otherwise tiny: a random 2-layer, 32-wide GPT-2 saved by ``transformers`` with
    the tokenizer files the hub's gpt2 folder has (``vocab.json`` + ``merges.txt``)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2,
                                  n_head=2)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    shutil.copy(FIXTURES / "gpt2" / "encoder.json", folder / "vocab.json")
    shutil.copy(FIXTURES / "gpt2" / "vocab.bpe", folder / "merges.txt")


def make_inputs(folder: Path) -> None:
    """The files the examples name, small: text cut from the committed fixtures and the
    bundled Tiny Shakespeare, GPT-2's vocabulary files, a random GPT-2, the lm-eval tasks."""
    import smallgpt
    from smallgpt import Tokenizer

    english = (FIXTURES / "english.txt").read_text(encoding="utf-8")
    shakespeare = (Path(smallgpt.__file__).parent / "assets" / "tinyshakespeare.txt")
    texts = {
        "book.txt": _paragraphs(english, 150_000, 8_000),
        "wiki.test.raw": _paragraphs(english, 170_000, 6_000),
        "input.txt": _paragraphs(english, 100_000, 30_000),
        "corpus.txt": _paragraphs(english, 0, 40_000)
        + (FIXTURES / "ml_ru.txt").read_text(encoding="utf-8"),
        "shakespeare.txt": _paragraphs(shakespeare.read_text(encoding="utf-8"), 0, 100_000),
        "dump.txt": "\n\n\n".join(_paragraphs(english, 60_000 + 5_000 * i, 4_000)
                                  for i in range(3)),
        "prompt.txt": "First Citizen:\n",
    }
    for i in range(4):
        texts[f"books/book{i + 1}.txt"] = _paragraphs(english, 20_000 * i, 15_000)
    for name, text in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "web").mkdir()
    paras = [p for p in english[:60_000].split("\n\n") if p.strip()]
    (folder / "web" / "part-000.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in paras), encoding="utf-8")
    ending = ["went home.", "sang a song.", "ate the moon.", "was a table."]
    (folder / "hellaswag_val.jsonl").write_text("".join(
        json.dumps({"ctx": f"{p.split('.')[0]}. Then he", "endings": ending, "label": i % 4})
        + "\n" for i, p in enumerate(paras[:6])), encoding="utf-8")
    Tokenizer.train([texts["corpus.txt"]], vocab_size=512).save(folder / "tok.json")
    shutil.copytree(FIXTURES / "gpt2", folder / "gpt2-files")
    shutil.copytree(FIXTURES / "lmeval", folder / "tests" / "fixtures" / "lmeval")
    make_gpt2(folder / "gpt2")


def session_env(cache: Path) -> Dict[str, str]:
    """The environment of the examples: two training steps, the quickstart's shards cached
    once, the Hugging Face libraries offline, this interpreter's commands and smallgpt."""
    import smallgpt

    env = dict(os.environ)
    env.update(SMALLGPT_MAX_STEPS="2", SMALLGPT_CACHE=str(cache), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    src = Path(smallgpt.__file__).resolve().parents[1]
    if src == ROOT / "python":  # a checkout on PYTHONPATH: the commands must run it too
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: List[str], cwd: Path, env: Dict[str, str]) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def make_runs(folder: Path, env: Dict[str, str]) -> None:
    """The runs of :data:`PREPARED`, made as the pages that make them do."""
    py = [sys.executable, "-m"]
    _run(py + ["smallgpt.cli.train", "--out", "out/shakespeare-cpu"], folder, env)
    _run(py + ["smallgpt.cli.tokenize", "shakespeare.txt", "--out", "data/shakespeare-gpt2",
               "--gpt2", "gpt2/", "--val-fraction", "0.1", "--quiet"], folder, env)
    _run(py + ["smallgpt.cli.train", "--preset", "finetune-shakespeare", "--init-from", "gpt2/",
               "--data", "data/shakespeare-gpt2", "--out", "out/finetune-shakespeare",
               "--data.batch_size", "4", "--data.seq_len", "128"],
         folder, {**env, "SMALLGPT_MAX_STEPS": "1"})


@dataclass
class Prepared:
    inputs: Path  #: what every page's folder starts with
    runs: Path  #: the inputs plus the runs of PREPARED
    env: Dict[str, str]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    base = tmp_path_factory.mktemp("docs_examples")
    inputs = base / "inputs"
    inputs.mkdir()
    make_inputs(inputs)
    env = session_env(base / "cache")
    shutil.copytree(inputs, base / "runs")
    make_runs(base / "runs", env)
    return Prepared(inputs, base / "runs", env)


# ----------------------------------------------------------------- running a page

PREAMBLE = r"""
set -eo pipefail
_DOCS_SERVERS=()
smallgpt-serve() {  # in the background, returning once /health answers
    local port=8000 prev="" a pid i
    for a in "$@"; do
        [ "$prev" = --port ] && port=$a
        case $a in --port=*) port=${a#--port=} ;; esac
        prev=$a
    done
    command -v curl >/dev/null || { echo "docs examples: serving needs curl"; return 1; }
    if curl -s "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        echo "docs examples: port $port is already in use"; return 1
    fi
    command smallgpt-serve "$@" >"$_DOCS_DIR/serve-$port.log" 2>&1 </dev/null &
    pid=$!
    _DOCS_SERVERS+=("$pid")
    for i in $(seq 1 900); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "smallgpt-serve $* exited:"; cat "$_DOCS_DIR/serve-$port.log"; return 1
        fi
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "smallgpt-serve $* did not answer on port $port"; return 1
}
_docs_stop_servers() {  # SIGTERM: requests in flight finish, then the server exits
    local pid code
    for pid in "${_DOCS_SERVERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${_DOCS_SERVERS[@]}"; do
        code=0; wait "$pid" || code=$?
        echo "server $pid exit $code"
    done
    _DOCS_SERVERS=()
}
"""


class BashSession:
    """One bash process for a page's blocks, which run one after another in it (a variable
    set or a server started by one block is there for the next), each with stdin closed."""

    def __init__(self, cwd: Path, env: Dict[str, str]) -> None:
        self.dir = cwd / ".docs-session"
        self.dir.mkdir()
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=cwd, env={**env, "_DOCS_DIR": str(self.dir)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.count = 0
        self.send(PREAMBLE, "the preamble")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", errors="replace"))
        self.lines.put(None)

    def send(self, script: str, where: str) -> str:
        """Run ``script``; returns its output, or fails the test with it."""
        self.count += 1
        path = self.dir / f"block{self.count}.sh"
        path.write_text(script, encoding="utf-8")
        done = f"__docs_block_done_{uuid.uuid4().hex}__"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"source {path} </dev/null; echo {done}\n".encode())
        self.proc.stdin.flush()
        out: List[str] = []
        while True:
            try:
                line = self.lines.get(timeout=BLOCK_TIMEOUT_S)
            except queue.Empty:
                self.kill()
                pytest.fail(f"{where}: still running after {BLOCK_TIMEOUT_S} s:\n"
                            + "".join(out)[-4000:])
            if line is None:
                code = self.proc.wait()
                pytest.fail(f"{where}: failed (exit status {code}):\n" + "".join(out)[-6000:])
            if line.strip() == done:
                return "".join(out)
            out.append(line)

    def close(self) -> str:
        """Stop the page's servers (SIGTERM), end the session; returns the servers' report."""
        if self.proc.poll() is not None:
            return ""
        report = self.send("_docs_stop_servers\n", "stopping the servers")
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)
        return report

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def page_folder(page: str, prepared: Prepared, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(prepared.inputs, work)
    for rel in PREPARED.get(page, []):
        shutil.copytree(prepared.runs / rel, work / rel)
    return work


@pytest.mark.parametrize("page", RUN_PAGES)
def test_examples_run(page: str, prepared: Prepared, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = page_folder(page, prepared, tmp_path)
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MPLBACKEND"):
        monkeypatch.setenv(k, prepared.env[k])
    monkeypatch.chdir(work)
    session = BashSession(work, prepared.env)
    namespace: Dict[str, object] = {"__name__": "__docs__"}
    try:
        for b in blocks(page):
            if b.mark == "file":
                (work / b.arg).parent.mkdir(parents=True, exist_ok=True)
                (work / b.arg).write_text(b.text, encoding="utf-8")
            elif runnable(b) and RUN_LANGS[b.lang] == "bash":
                session.send(b.text, b.where)
            elif runnable(b):
                try:
                    exec(compile(b.text, b.where, "exec"), namespace)
                except Exception as e:
                    raise AssertionError(f"{b.where}: the example raised {e!r}") from e
        report = session.close()
    finally:
        session.kill()
    codes = re.findall(r"^server \d+ exit (\d+)$", report, flags=re.M)
    assert all(c in ("0", "143") for c in codes), report  # 143: uvicorn re-raised SIGTERM
