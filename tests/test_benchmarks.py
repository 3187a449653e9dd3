"""The GPU benchmarks run on a GPU lent for minutes: their CPU smoke modes keep them runnable in CI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qforge.kernels import triton_matmul

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.skipif(not triton_matmul.available(), reason="triton is not installed")
def test_kernel_benchmark_smoke(tmp_path):
    out = _run("benchmarks/kernels.py", "--smoke", "--out", str(tmp_path / "rows.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    layer = [r for r in rows if "shape" in r]
    assert {r["batch"] for r in layer} == {1, 17} and all(r["tuned_us"] > 0 for r in layer)
    decode = {(r["decode"], r["cuda_graph"]): r for r in rows if "decode" in r}
    assert all("tokens_per_s" in decode[(name, False)] for name in ("float16", "W4 g128 (plan)", "W4 g128 (tuned)"))
    assert rows[-1] == {"tuner_rejected": []} and "× tuned" in out


def test_gptq_speed_benchmark_smoke():
    out = _run("benchmarks/gptq_gpu_speed.py", "--device", "cpu", "--tools", "qforge", "--layers", "2", "--hidden", "256",
               "--intermediate", "512", "--heads", "4", "--kv-heads", "2", "--vocab", "1000", "--nsamples", "4",
               "--seqlen", "64")
    assert "qforge            2 layers" in out and "FAILED" not in out


def test_gptq_solver_speed_benchmark_smoke():
    out = _run("benchmarks/gptq_solver_speed.py", "--device", "cpu", "--shapes", "64x256", "--tokens", "1024")
    assert out.count("eager loop") == 3 and "triton loop" not in out        # the kernel is CUDA's only


def test_device_script_parses_and_refuses_unknown_steps(tmp_path):
    assert subprocess.run(["bash", "-n", "benchmarks/device_issue8.sh"], cwd=ROOT).returncode == 0
    p = subprocess.run(["bash", "benchmarks/device_issue8.sh", "bogus"], cwd=ROOT, capture_output=True, text=True,
                       env={"OUT": str(tmp_path), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
                       timeout=120)
    assert p.returncode == 2 and "unknown step bogus" in p.stdout
