#!/usr/bin/env bash
# The oldest torch that pyproject.toml allows (`torch>=X`), tested: the torch-sensitive part
# of the suite in a venv that has torch==X and the wheel from wheelhouse/ (left there by
# .ci/wheel_check.sh) and sees this environment's other packages (--system-site-packages:
# the test extras installed by README's test command). Called by .ci/run after that command.
# The venv is kept between runs (TORCH_FLOOR_VENV, default ~/.cache/smallgpt/torch-floor-X):
# torch and its CUDA libraries are about 3 GB from PyPI, about 2 minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
t0=$SECONDS
floor=$(sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$floor" ] || { echo "torch_floor: no torch>=X in pyproject.toml" >&2; exit 1; }
case "$floor" in *.*.*) pin=$floor ;; *) pin=$floor.0 ;; esac
venv=${TORCH_FLOOR_VENV:-$HOME/.cache/smallgpt/torch-floor-$pin}
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$pin')" \
        2>/dev/null; then
    rm -rf "$venv"
    "$PY" -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install -q "torch==$pin"
fi
shopt -s nullglob
wheels=(wheelhouse/smallgpt-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "torch_floor: expected one wheel in wheelhouse/" >&2; exit 1; }
"$venv/bin/python" -m pip install -q --no-deps --no-index --force-reinstall "${wheels[0]}"
"$venv/bin/python" -c "import torch, smallgpt; print('torch_floor: torch', torch.__version__, \
'smallgpt from', smallgpt.__file__)"
echo "[torch_floor +$((SECONDS - t0)) s]"
# What depends on torch's API: the model, training (DDP, FSDP2, Muon, resume, multi-node),
# generation, sampling, evaluation, fine-tuning and export. The tokenizer, corpus and
# packaging tests do not touch torch; the logging ones test W&B/trackio sinks, not torch.
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_train.py \
    tests/test_train_cli.py tests/test_generate.py tests/test_sample_cli.py tests/test_eval.py \
    tests/test_finetune.py tests/test_export.py tests/test_recipe.py tests/test_data.py \
    tests/test_gpu.py
echo "torch_floor: torch $pin passed in $((SECONDS - t0)) s"
