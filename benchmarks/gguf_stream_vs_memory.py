"""SmolLM2-135M (the built-in alias): streamed GPTQ straight from its GGUF file == in-memory GPTQ of its conversion.

    .venv/bin/python benchmarks/gguf_stream_vs_memory.py
"""
import shutil
import time

import torch
from pathlib import Path
from safetensors.torch import load_file
import qforge
from qforge import QuantizeConfig

W = Path("/tmp/gb/real"); shutil.rmtree(W, ignore_errors=True); W.mkdir(parents=True)
cfg = QuantizeConfig(method="gptq", bits=4, group_size=64)
t = time.time()
m = qforge.load("smollm2-135m", cfg, stream=True)
m.quantize("builtin:mix", nsamples=16, seqlen=256, resume=W / "s.partial")
m.save(W / "streamed"); ts = time.time() - t
t = time.time()
r = qforge.load("smollm2-135m", cfg)
r.quantize("builtin:mix", nsamples=16, seqlen=256)
r.save(W / "ref"); tr = time.time() - t
def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")): out.update(load_file(str(f)))
    return out
a, b = tensors(W / "ref"), tensors(W / "streamed")
print("keys equal", a.keys() == b.keys(), len(a), "tensors equal", all(torch.equal(a[k], b[k]) for k in a if k in b))
print(f"streamed {ts:.0f} s, in memory {tr:.0f} s")
