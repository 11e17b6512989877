#!/usr/bin/env bash
# GPU check: one command, under 8 minutes on one GPU.
#
#   bash benches/gpu_check.sh            # from the repository root of a fresh checkout
#
# 1. installs the package with its test extras,
# 2. runs the CUDA-only tests (tests/test_gpu.py: bf16 autocast, SDPA's flash kernel,
#    torch.compile, fused AdamW, the DDP and FSDP2 code paths over NCCL with one process,
#    resume on CUDA),
# 3. trains the gpt2-124m preset (classic) and gpt2-124m-modern for a short while each on
#    GPT-2 shards of the bundled Tiny Shakespeare and prints tokens/s and bf16 MFU against
#    the device's peak (benches/gpu_train.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
python3 -m pip install -q ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pytest -q tests/test_gpu.py
python3 benches/gpu_train.py --seconds "${GPU_TRAIN_SECONDS:-60}" --presets gpt2-124m,gpt2-124m-modern
