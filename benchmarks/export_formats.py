"""Packed export on SmolLM2-135M: size on disk, effective bits per weight measured on the files, load
times in qforge and in a real client, and wiki perplexity through each loader.

    PYTHONPATH=. .venv/bin/python benchmarks/export_formats.py [--max-windows 2]

Schemes: W4 g64 sym and W3 g64 sym (gptq), W4 g64 asym (compressed-tensors, awq), RTN (the packed
layout, not the solver, is what this measures). Each client load runs in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

CLIENT = r"""
import sys, time, json, torch
fmt, path = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
t = time.perf_counter()
if fmt == "gptq":
    from gptqmodel import BACKEND, GPTQModel
    # its plain torch kernel loads in fp16 only; cast to fp32 (its fp16 matmul takes minutes on a CPU)
    model = GPTQModel.load(path, device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH).model.float()
    who = "GPTQModel 7.6 (torch kernel, fp32)"
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    who = "transformers 5.17"
secs = time.perf_counter() - t
from transformers import AutoTokenizer
from qforge.eval import load_eval_text, perplexity
ppl = perplexity(model.eval(), AutoTokenizer.from_pretrained(path), load_eval_text("wiki"), 2048, int(sys.argv[3]),
                 show_progress=False)["ppl"]
print("RESULT " + json.dumps({"client": who, "load_s": secs, "ppl": ppl}))
"""

# the clients live in the overlay venv made by scripts/setup.sh; PYTHONPATH lets it import qforge
CLIENT_PY = str(Path(__file__).resolve().parent.parent / ".venv-clients" / "bin" / "python")
CLIENT_ENV = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TORCH_COMPILE_DISABLE="1")
SCHEMES = [("gptq", 4, 64, True), ("gptq", 3, 64, True), ("compressed-tensors", 4, 64, False),
           ("awq", 4, 64, False)]


def main() -> None:
    import qforge
    from qforge.cli.table import format_table
    from qforge.eval import load_eval_text, perplexity

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fmt, bits, group, sym in SCHEMES:
            m = qforge.load("smollm2-135m", qforge.QuantizeConfig(bits=bits, group_size=group, sym=sym))
            m.quantize(None)
            t = time.perf_counter()
            sizes = m.export(Path(d) / f"{fmt}{bits}", fmt)
            export_s = time.perf_counter() - t
            t = time.perf_counter()
            back = qforge.load(Path(d) / f"{fmt}{bits}")
            load_s = time.perf_counter() - t
            ppl = perplexity(back.model, back.tokenizer, load_eval_text("wiki"), 2048, a.max_windows,
                             show_progress=False)["ppl"]
            p = subprocess.run([CLIENT_PY, "-c", CLIENT, fmt, str(Path(d) / f"{fmt}{bits}"), str(a.max_windows)],
                               capture_output=True, text=True, env=CLIENT_ENV)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            client = json.loads(line[0][7:]) if line else {"client": f"failed: {p.stderr.strip().splitlines()[-1]}",
                                                           "load_s": float("nan"), "ppl": float("nan")}
            rows.append([fmt, f"W{bits} g{group} {'sym' if sym else 'asym'}", sizes["safetensors_bytes"] / 1e6,
                         sizes["quantized_layer_bytes"] / 1e6, sizes["bits_per_weight"], m.storage()["bits_per_weight"],
                         export_s, load_s, ppl, client["client"], client["load_s"], client["ppl"]])
            print(rows[-1], flush=True)
    print(format_table(["format", "scheme", "files MB", "qlinears MB", "bpw (files)", "bpw (storage.py)",
                        "export s", "qforge load s", "qforge wiki ppl", "client", "client load s", "client wiki ppl"],
                       rows, title=f"SmolLM2-135M packed exports (RTN), wiki ppl on {a.max_windows} x 2048 tokens"))


if __name__ == "__main__":
    main()
