"""Calibration window length at a fixed token budget: the same N x 2048 tokens of builtin:mix cut into windows
of L tokens (L = 2048, 512, 128, 32), plus the 2048-token windows with 3 two-token samples per window added (one
more sequence start, "sink", per 512 tokens, and almost no more text). A variant NxL is instead a fresh draw of
N windows of L tokens (the CLI's `--nsamples N --calib-seqlen L`); "multi" mixes scales on the shared tokens
(a quarter in windows of 2048, a quarter of 512, half of 128; the nsamples must divide into those shares).
GPTQ on SmolLM2, one process per variant.

    PYTHONPATH=. .venv/bin/python benchmarks/calibration_length.py [--bits 4] [--method gptq] [--nsamples 16]
    PYTHONPATH=. .venv/bin/python benchmarks/calibration_length.py --variants 128x2048,128x512,512x128
"""
from __future__ import annotations

import argparse
import time

from one_process_each import add_worker_args, dispatch

VARIANTS = ("2048", "2048+starts", "512", "128", "32")


def samples_for(variant: str, tokenizer, nsamples: int):
    from qforge.calibration.sources import build_calibration

    if "x" in variant:                   # NxL: a fresh draw of N windows of L tokens (not the shared tokens)
        n, length = map(int, variant.split("x"))
        return build_calibration("builtin:mix", tokenizer, n, length, 0).samples
    base = build_calibration("builtin:mix", tokenizer, nsamples, 2048, 0).samples
    if variant == "multi":               # several scales: 4 windows kept at 2048, 4 cut into 512, 8 into 128
        return base[:4] + [w for x in base[4:8] for w in x.split(512)] + [w for x in base[8:] for w in x.split(128)]
    if variant == "2048+starts":
        return base + [w[:2] for x in base for w in x.split(512)[1:]]
    return [w for x in base for w in x.split(int(variant))]


def run(a) -> dict:
    import qforge
    from qforge import QuantizeConfig

    m = qforge.load("smollm2-135m", QuantizeConfig(method=a.method, bits=a.bits, group_size=a.group_size))
    s = samples_for(a.worker, m.tokenizer, a.nsamples)
    t = time.perf_counter()
    m.quantize(s, show_progress=False)
    secs = time.perf_counter() - t
    rows = qforge.evaluate(m, datasets=a.datasets.split(","), max_windows=a.max_windows)
    return {"windows": a.worker, "samples": len(s), "tokens": sum(map(len, s)), "seconds": round(secs, 1),
            **{r["dataset"]: round(r["ppl"], 3) for r in rows},
            "by_position": {r["dataset"]: [[*b["positions"], round(b["ppl"], 2)] for b in r["by_position"]]
                            for r in rows}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16, help="2048-token windows drawn; every variant cuts these")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    add_worker_args(ap)
    a = ap.parse_args()
    header = (f"{a.method} W{a.bits} g{a.group_size}, bf16 passes; variants {a.variants} (L: the same "
              f"{a.nsamples} x 2048 builtin:mix tokens cut into windows of L; NxL: a fresh draw); ppl on the first "
              f"{a.max_windows} x 2048 windows")
    dispatch(a, run, header, a.variants.split(","))


if __name__ == "__main__":
    main()
