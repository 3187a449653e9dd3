"""The built-in model (SmolLM2-135M's GGUF file): GPTQ streamed straight from the GGUF file vs GPTQ in memory from
its dense conversion. The two outputs must be identical, tensor for tensor; prints both wall times.

    .venv/bin/python benchmarks/gguf_stream_vs_memory.py [--nsamples 16 --seqlen 256]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> None:
    import torch

    import qforge
    from qforge import QuantizeConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--work", default="/tmp/qforge-gguf-stream-check")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=64)
    seconds = {}
    for name, stream in (("streamed", True), ("in-memory", False)):
        t = time.perf_counter()
        m = qforge.load("smollm2-135m", cfg, stream=stream)
        m.quantize("builtin:mix", nsamples=a.nsamples, seqlen=a.seqlen,
                   resume=work / f"{name}.partial" if stream else None)
        m.save(work / name)
        seconds[name] = time.perf_counter() - t
    ref, got = tensors(work / "in-memory"), tensors(work / "streamed")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    print(f"GPTQ W4 g64, {a.nsamples} x {a.seqlen} builtin:mix: {len(ref)} tensors, "
          f"{'identical' if same else 'DIFFERENT'}; streamed from GGUF {seconds['streamed']:.0f} s, "
          f"in memory {seconds['in-memory']:.0f} s")


if __name__ == "__main__":
    main()
