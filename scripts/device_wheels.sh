#!/usr/bin/env bash
# Wheels the GPU machine of the device tool lacks (its image has torch, transformers, triton, safetensors,
# pyarrow, ...; see the tool's KINDS.md), downloaded here into .whl/ (git-ignored) for Python 3.12 x86-64.
# Run it before a device call that names .whl in `carry`; benchmarks/device_issue8.sh installs them there.
# compressed-tensors is qforge's own dependency; the rest is what llm-compressor 0.14 imports for GPTQ.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  compressed-tensors==0.19.0 llmcompressor==0.14.0.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  loguru==0.7.3 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh .whl && ls .whl
