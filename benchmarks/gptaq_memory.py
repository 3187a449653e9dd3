"""GPTAQ's fp inputs held for a block vs made batch by batch: time and peak memory of the quantization alone.

    PYTHONPATH=. .venv/bin/python benchmarks/gptaq_memory.py [--nsamples 128] [--seqlen 512] [--bits 3] [--wide]

SmolLM2-135M (--wide: a random Llama of 2 blocks, hidden 1024, MLP 8192, SmolLM2's tokenizer: wide linears, whose
fp inputs outweigh the rest of a block's pass, as a large model's do), GPTQ W3 g64 with GPTAQ 0.25 on builtin:mix
samples, once per mode, each in its own process:
`held` (pipeline.HOLD_FP_INPUTS 1.0: a block's fp inputs of every group kept from one run of its unrounded copy, what
qforge does when they take at most a quarter of the available memory) and `per batch` (0.0: made as each statistic
takes them, FpGroupInputs). The peak is the process's VmHWM over the quantization, its high-water mark reset
(/proc/self/clear_refs) once the model is loaded, minus its VmRSS then. Both modes must give the same codes. Linux only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import hashlib, json, re, sys, time
from pathlib import Path
import torch
import qforge
from qforge import pipeline
from qforge.calibration import build_calibration


def status(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 / 1e9


hold, nsamples, seqlen, bits = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
pipeline.HOLD_FP_INPUTS = hold
m = qforge.load(sys.argv[5], qforge.QuantizeConfig(method="gptq", bits=bits, group_size=64, gptaq=0.25))
samples = build_calibration("builtin:mix", m.tokenizer, nsamples, seqlen, seed=0).samples
Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS
base = status("VmRSS")
t = time.perf_counter()
m.quantize(samples)
secs = time.perf_counter() - t
h = hashlib.sha256()
for n in sorted(m.result.layers):
    h.update(m.result.layers[n].codes.contiguous().view(torch.uint8).numpy().tobytes())
print("RESULT " + json.dumps({"seconds": secs, "peak_gb": status("VmHWM") - base, "codes": h.hexdigest(),
                              "compute_dtype": m.config.compute_dtype}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--wide", action="store_true", help="a random 2-block Llama with wide linears instead of SmolLM2")
    a = ap.parse_args()
    from qforge.cli.table import format_table

    rows, codes = [], set()
    with tempfile.TemporaryDirectory() as d:
        model = _wide_model(Path(d)) if a.wide else "smollm2-135m"
        for label, hold in (("held (one run per block)", 1.0), ("per batch (FpGroupInputs)", 0.0)):
            rows.append([label, *_run(hold, a, model, codes)])
            print(" | ".join(rows[-1]), flush=True)
    name = "a random 2-block Llama, hidden 1024, MLP 8192" if a.wide else "SmolLM2-135M"
    print(f"\n## GPTAQ fp inputs, {name}, W{a.bits} g64, {a.nsamples} x {a.seqlen} calibration tokens\n")
    print(format_table(["fp inputs", "quantize s", "peak GB beyond the loaded model", "passes", "codes (sha256)"],
                       rows))
    print("same codes" if len(codes) == 1 else "CODES DIFFER")


def _wide_model(d: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qforge.models.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=8192, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _run(hold: float, a, model: str, codes: set) -> list[str]:
    p = subprocess.run([sys.executable, "-c", CHILD, str(hold), str(a.nsamples), str(a.seqlen), str(a.bits), model],
                       capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"hold {hold} failed:\n{p.stderr[-3000:]}")
    r = json.loads(line[7:])
    codes.add(r["codes"])
    return [f"{r['seconds']:.0f}", f"{r['peak_gb']:.2f}", r["compute_dtype"], r["codes"][:12]]


if __name__ == "__main__":
    main()
