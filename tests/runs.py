"""Runs that several test files make."""
from __future__ import annotations

from pathlib import Path

import qforge


def streamed_and_in_memory(src, cfg, calibration, where: Path, nsamples: int = 4, seqlen: int = 32):
    """`src` quantized under `cfg` streamed (one block in memory, a run state) and in memory, each exported as
    compressed-tensors and loaded back: (streamed, in memory)."""
    streamed = qforge.load(src, cfg, stream=True)
    streamed.quantize(calibration, nsamples=nsamples, seqlen=seqlen, resume=where / "rs")
    streamed.export(where / "streamed", "compressed-tensors")
    in_memory = qforge.load(src, cfg)
    in_memory.quantize(calibration, nsamples=nsamples, seqlen=seqlen)
    in_memory.export(where / "memory", "compressed-tensors")
    return qforge.load(where / "streamed"), qforge.load(where / "memory")
