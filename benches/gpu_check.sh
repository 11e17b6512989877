#!/usr/bin/env bash
# The GPU check, in one command, offline, under 8 minutes on one GPU:
#
#   bash benches/gpu_check.sh OUT              # on the GPU machine, from the checkout's root
#   bash benches/gpu_check.sh --dry-run OUT    # everything but the CUDA parts, on a CPU
#
# Before it, on a machine with Rust (no GPU needed), put the abi3 wheel into the checkout:
#   maturin build --release --out wheelhouse
# The GPU machine needs Python, torch, transformers, tiktoken, pytest and hypothesis (a
# typical CUDA image), no network, no Rust: the wheel is installed with
# `pip install --no-index --no-deps --target OUT/site` and OUT/site is put on PYTHONPATH.
# OUT receives the log, summary.json, results_block.md and each run's metrics; the last line
# printed is the summary as one JSON object. See benches/gpu_check.py for the parts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
exec "${PYTHON:-python3}" benches/gpu_check.py "$@"
