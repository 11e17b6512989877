"""``smallgpt-serve`` as a program: SIGTERM with a request in flight, the open-host warning,
one-line errors, and the message without the serve extra."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import pytest
from serving import gpt2_tokenizer, serve_process, tiny_model

pytest.importorskip("fastapi", reason="needs the serve extra (pip install 'smallgpt[serve]')")
httpx = pytest.importorskip("httpx")

from smallgpt.checkpoint import Checkpoint  # noqa: E402
from smallgpt.cli.serve import main  # noqa: E402


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint file with a context of 1024 (so a request can run for a while)."""
    model = tiny_model(block_size=1024)
    path = tmp_path_factory.mktemp("serve_cli") / "long.pt"
    Checkpoint(model.config, model.state_dict(), tokenizer=gpt2_tokenizer().to_json_str()).save(
        path)
    return path


def test_sigterm_lets_the_request_in_flight_finish(long_ckpt: Path) -> None:
    proc, url = serve_process([str(long_ckpt), "--host", "0.0.0.0", "--model-name", "long"])
    events: list = []
    first = threading.Event()

    def client() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    t = threading.Thread(target=client)
    t.start()
    try:
        assert first.wait(120), "no first token"
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    # uvicorn re-raises the signal once shut down: the exit status says SIGTERM.
    assert code in (0, -signal.SIGTERM), err
    assert "Waiting for connections to close" in err  # the request was still running
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 900
    finish = [json.loads(e[6:])["choices"] for e in events[:-2]]
    assert finish[-1][0]["finish_reason"] == "length"
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == ["smallgpt-serve: warning: listening on 0.0.0.0 without --api-key: anyone "
                       "who can reach this machine can use the model"]


@pytest.mark.parametrize("args, message", [
    (["/no/such/run"], "model not found: /no/such/run"),
    (["x", "--max-batch", "0"], "argument --max-batch: must be from 1 to 4,096, got 0"),
    (["x", "--port", "70000"], "argument --port: must be from 0 to 65,535, got 70,000"),
    (["x", "--dtype", "int8"], "argument --dtype: invalid choice"),
])
def test_bad_input_is_one_line(args: list, message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_not_a_model_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("smallgpt-serve: error: ") and "not a PyTorch checkpoint" in err


def test_without_the_serve_extra(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails
    assert main(["anything"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "smallgpt-serve: error: the server needs FastAPI and uvicorn (fastapi is missing): "
        "pip install 'smallgpt[serve]'"]
