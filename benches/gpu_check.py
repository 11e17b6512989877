"""The GPU check: one command, offline, under 8 minutes on one GPU (``benches/gpu_check.sh``).

    bash benches/gpu_check.sh OUT              # on the GPU machine
    bash benches/gpu_check.sh --dry-run OUT    # everything but the CUDA parts, on a CPU

It needs no network, no Rust and no pip index: the package arrives as the abi3 wheel built
beforehand (``maturin build --release``, copied into ``wheelhouse/`` of the checkout, or
``--wheel FILE``), and the torch, transformers, tiktoken, pytest and hypothesis already
installed are used. Parts, each reported as passed or failed:

1. **install**: ``pip install --no-index --no-deps --target OUT/site WHEEL``; every later
   process runs with ``PYTHONPATH=OUT/site`` and must import smallgpt from there.
2. **device**: CUDA is there (the card's name, memory, driver, torch and CUDA versions, its
   peak from smallgpt's table).
3. **tests**: ``tests/test_gpu.py`` and the CPU suite's tests marked ``device`` (generation,
   the sampling CLI, evaluation, fine-tuning's first step against transformers) with
   ``SMALLGPT_TEST_DEVICE=cuda``.
4. **train**: ``gpt2-124m`` and ``gpt2-124m-modern``, bf16, compile off and on, a short timed
   run each (benches/gpu_train.py): tokens/s, MFU against the card's exact peak, peak memory,
   and whether the loss fell.

The log (``OUT/gpu_check.log``), the summary (``OUT/summary.json``), a run block for
``benches/RESULTS.md`` (``OUT/results_block.md``) and each run's ``metrics.jsonl``
(``OUT/runs/``) are written to OUT; the last line printed is the summary as one JSON object.
Exit status 0 when every part passed. ``--dry-run`` installs the wheel the same way, checks
the test selection by collecting it, and trains tiny shapes of both presets on the CPU
(compile off), in seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import gpu_train  # noqa: E402  (benches/ is not a package)

# The files holding tests marked ``device``; tests/test_gpu_check.py keeps this list whole.
DEVICE_TEST_FILES = ("tests/test_generate.py", "tests/test_sample_cli.py", "tests/test_eval.py",
                     "tests/test_finetune.py")
BUDGET_S = 470.0  # the whole check, in seconds, within 8 minutes
TESTS_TIMEOUT_S = 220.0
PRESETS = ("gpt2-124m", "gpt2-124m-modern")


class Log:
    """Everything printed goes to the terminal and to ``OUT/gpu_check.log``."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def run(self, cmd: List[str], *, env: Optional[Dict[str, str]] = None,
            timeout: float = 600, cwd: Path = ROOT) -> Optional[int]:
        """Run ``cmd``, its output into the log; the exit status, None on a timeout."""
        self("+ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: Optional[int] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self(f"gpu_check: killed after {timeout:.0f} s")
            code = None
        reader.join(timeout=10)
        return code


def find_wheel(given: Optional[Path]) -> Path:
    """``--wheel``, else the newest ``wheelhouse/smallgpt-*.whl``."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"gpu_check: error: wheel {given} not found")
        return given
    wheels = sorted((ROOT / "wheelhouse").glob("smallgpt-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SystemExit("gpu_check: error: no wheel in wheelhouse/: on a machine with Rust, "
                         "run `maturin build --release --out wheelhouse` in the checkout "
                         "first (docs/distributed.md, 'Checking a GPU machine')")
    return wheels[-1]


def install(wheel: Path, site: Path, log: Log) -> Dict[str, Any]:
    """Install ``wheel`` into ``site`` without an index or dependencies."""
    shutil.rmtree(site, ignore_errors=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    code = log.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                    "--target", str(site), str(wheel)], env=env, timeout=120)
    part: Dict[str, Any] = {"wheel": wheel.name,
                            "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    if code != 0:
        return {**part, "status": "failed", "why": f"pip exit status {code}"}
    probe = ("import smallgpt, smallgpt._bpe, torch, numpy, regex, tqdm, safetensors; "
             "print(smallgpt.__file__)")
    res = subprocess.run([sys.executable, "-c", probe], env=child_env(site, "cpu"),
                         capture_output=True, text=True, cwd=ROOT)
    where = res.stdout.strip()
    log(f"smallgpt imported from {where or '(failed)'}" + (f"\n{res.stderr}" if res.stderr
                                                             else ""))
    if res.returncode != 0:
        return {**part, "status": "failed", "why": (res.stderr.strip().splitlines() or
                                                     ["import failed"])[-1]}
    if not Path(where).resolve().is_relative_to(site.resolve()):
        return {**part, "status": "failed", "why": f"smallgpt imported from {where}, not "
                f"from the wheel in {site}"}
    return {**part, "status": "passed"}


def child_env(site: Path, device: str) -> Dict[str, str]:
    """The environment of every later process: the wheel first on the path, no network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env.update({"SMALLGPT_TEST_DEVICE": device, "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"})
    return env


DEVICE_PROBE = r"""
import json, platform, torch
from smallgpt.train.hardware import describe_gpu
out = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    out.update(describe_gpu(torch.device("cuda", 0)))
    out["count"] = torch.cuda.device_count()
print(json.dumps(out))
"""


def device_facts(env: Dict[str, str], dry_run: bool, log: Log) -> Dict[str, Any]:
    """What the GPU is; ``failed`` without CUDA (unless a dry run)."""
    res = subprocess.run([sys.executable, "-c", DEVICE_PROBE], env=env, capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    if res.returncode != 0:
        return {"status": "failed", "why": (res.stderr.strip().splitlines() or ["?"])[-1]}
    facts: Dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        facts["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and \
            q.stdout.strip() else None
    log("device: " + json.dumps(facts))
    if facts.get("name") and facts.get("peak_bf16") is None:
        log(f"note: {facts['name']} ({facts['memory_gib']} GiB) is not in smallgpt's peak "
            "table: MFU is reported as null")
    if not facts["cuda_available"] and not dry_run:
        return {**facts, "status": "failed", "why": "CUDA is not available (use --dry-run "
                "on a machine without a GPU)"}
    return {**facts, "status": "passed"}


def run_tests(env: Dict[str, str], out: Path, dry_run: bool, timeout: float,
              log: Log) -> Dict[str, Any]:
    """tests/test_gpu.py and the ``device`` tests; a dry run only collects them."""
    xml = out / "tests.xml"
    files = ["tests/test_gpu.py", *DEVICE_TEST_FILES]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
           "gpu or device", *files]
    if dry_run:
        cmd.append("--collect-only")
    else:
        cmd += ["-rfEs", f"--junitxml={xml}"]
    t0 = time.perf_counter()
    code = log.run(cmd, env=env, timeout=timeout)
    part: Dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1)}
    if dry_run:
        ok = code == 0
        return {**part, "status": "passed" if ok else "failed", "collected_only": True,
                **({} if ok else {"why": f"pytest exit status {code}"})}
    counts = junit_counts(xml)
    part.update(counts)
    why = ("timed out" if code is None else f"pytest exit status {code}" if code != 0
           else "no test ran" if not counts.get("passed") else "")
    return {**part, "status": "failed" if why else "passed", **({"why": why} if why else {})}


def junit_counts(xml: Path) -> Dict[str, int]:
    """passed / failed / errors / skipped of a pytest junit XML file."""
    if not xml.exists():
        return {}
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"],
            "skipped": total["skipped"]}


def run_training(env: Dict[str, str], out: Path, dry_run: bool, deadline: float,
                 log: Log) -> Dict[str, Any]:
    """Both presets, compile off then on, within what is left of the budget."""
    work = out / "train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (out / "runs").mkdir(exist_ok=True)
    log("+ tokenizing the bundled Tiny Shakespeare with GPT-2's vocabulary")
    data = gpu_train.prepare_data(work / "shakespeare-gpt2", env=env, run=log.run)
    runs: List[Dict[str, Any]] = []
    plan = [(p, c) for p in PRESETS for c in ((False,) if dry_run else (False, True))]
    for i, (preset, compile_) in enumerate(plan):
        left = deadline - time.monotonic()
        # compile-on runs get twice a compile-off run's share: compilation takes a while
        weights = [2.0 if c else 1.0 for _, c in plan[i:]]
        seconds = min(120.0, max(20.0, left * weights[0] / sum(weights) - 10.0))
        name = f"{preset}-compile-{'on' if compile_ else 'off'}"
        res = gpu_train.run_one(preset, compile_, data, work / name,
                                steps=8 if dry_run else 60, seconds=seconds,
                                dry_run=dry_run, env=env, timeout=seconds + 120, run=log.run)
        if (work / name / "metrics.jsonl").exists():
            shutil.copy(work / name / "metrics.jsonl", out / "runs" / f"{name}.jsonl")
        shutil.rmtree(work / name, ignore_errors=True)  # a 124M checkpoint is 1.5 GB
        log(f"{name}: " + json.dumps(res))
        runs.append(res)
    if dry_run:
        runs += [{"preset": p, "compile": True, "status": "skipped", "why": "dry run"}
                 for p in PRESETS]
    shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in runs if r["status"] == "failed"]
    log("\n" + gpu_train.table(runs))
    return {"status": "failed" if failed else "passed", "runs": runs}


def results_block(summary: Dict[str, Any], out: Path) -> None:
    """A run block for benches/RESULTS.md in ``OUT/results_block.md`` (copied by hand)."""
    import harness

    dev = summary["parts"].get("device", {})
    gpu = (f"{dev.get('name')} ({dev.get('memory_gib')} GiB), driver {dev.get('driver')}"
           if dev.get("name") else "none (dry run on the CPU)")
    extra = {"GPU": f"{gpu}; CUDA {dev.get('cuda')}, torch {dev.get('torch')}",
             "Wheel": str(summary["parts"]["install"].get("wheel"))}
    body = gpu_train.table(summary["parts"].get("train", {}).get("runs", [])) + \
        "\n\nTests: " + json.dumps(summary["parts"].get("tests", {}))
    title = "dry run (CPU)" if summary["dry_run"] else f"{dev.get('name')}"
    harness.append_run("gpu_check", title, body, extra=extra,
                       results=out / "results_block.md")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the log, the summary and the runs")
    p.add_argument("--dry-run", action="store_true", help="no CUDA: CPU, tiny shapes")
    p.add_argument("--wheel", type=Path, help="the wheel (default: newest in wheelhouse/)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_block.md").unlink(missing_ok=True)
    log = Log(out / "gpu_check.log")
    wheel = find_wheel(args.wheel)
    device = "cpu" if args.dry_run else "cuda"
    summary: Dict[str, Any] = {"gpu_check": "failed", "dry_run": args.dry_run,
                               "date": dt.datetime.now().isoformat(timespec="seconds"),
                               "parts": {}}
    parts = summary["parts"]
    parts["install"] = install(wheel, out / "site", log)
    env = child_env(out / "site", device)
    if parts["install"]["status"] == "passed":
        parts["device"] = device_facts(env, args.dry_run, log)
    if parts.get("device", {}).get("status") == "passed":
        left = args.budget - (time.monotonic() - t0)
        parts["tests"] = run_tests(env, out, args.dry_run, min(TESTS_TIMEOUT_S, 0.5 * left),
                                   log)
        parts["train"] = run_training(env, out, args.dry_run, t0 + args.budget, log)
    done = [parts.get(k, {}).get("status") for k in ("install", "device", "tests", "train")]
    summary["gpu_check"] = "passed" if all(s == "passed" for s in done) else "failed"
    summary["seconds"] = round(time.monotonic() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if "train" in parts:
        results_block(summary, out)
    log(json.dumps(summary, separators=(",", ":")))
    return 0 if summary["gpu_check"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
