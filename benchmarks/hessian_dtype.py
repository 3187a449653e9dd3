"""bf16-rounded vs fp32-summed Hessian products under bf16 calibration passes (QuantizeConfig.hessian_dtype):
damping escalations, quantization time and ppl, GPTQ on SmolLM2, one process per variant for clean timings.

    PYTHONPATH=. .venv/bin/python benchmarks/hessian_dtype.py [--bits 4] [--group-size 64] [--act-order]
        [--nsamples 16] [--seqlen 512]
"""
from __future__ import annotations

import argparse
import collections
import time

from one_process_each import add_worker_args, dispatch


def run(a) -> dict:
    import qforge
    from qforge import QuantizeConfig

    cfg = QuantizeConfig(method="gptq", bits=a.bits, group_size=a.group_size, act_order=a.act_order,
                         hessian_dtype=a.worker)
    m = qforge.load("smollm2-135m", cfg)
    t = time.perf_counter()
    m.quantize(a.calib, nsamples=a.nsamples, seqlen=a.seqlen, show_progress=False)
    secs = time.perf_counter() - t
    raised = collections.Counter(f"{n.split('.')[-1]} -> damp {q.info['damp']:g}" for n, q in m.result.layers.items()
                                 if q.info.get("retries"))
    rows = qforge.evaluate(m, datasets=a.datasets.split(","), max_windows=a.max_windows)
    return {"hessian_dtype": a.worker, "seconds": round(secs, 1), "damping_raised": dict(raised),
            **{r["dataset"]: round(r["ppl"], 3) for r in rows}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--calib", default="builtin:mix")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    add_worker_args(ap)
    a = ap.parse_args()
    header = (f"GPTQ W{a.bits} g{a.group_size}{' act-order' if a.act_order else ''}, bf16 passes, {a.nsamples} x {a.seqlen} {a.calib}, "
              f"ppl on the first {a.max_windows} windows")
    dispatch(a, run, header, ("bfloat16", "float32"))


if __name__ == "__main__":
    main()
