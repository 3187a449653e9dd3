"""CPU wall time of qforge's GPTQ on SmolLM2-135M with linears that share an input solved stacked (q/k/v and
gate/up as one matrix each, the pipeline's way) and one by one (the pipeline's grouping replaced, for this
comparison only, by one run per linear), same calibration, one process.

    PYTHONPATH=. .venv/bin/python benchmarks/stacked_solve_cpu.py [--nsamples 16 --seqlen 512]
"""
import argparse
import copy
import time

import torch

import qforge.pipeline as pipeline
from qforge import QuantizeConfig
from qforge.calibration import build_calibration
from qforge.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    samples = build_calibration("builtin:mix", lm.tokenizer, a.nsamples, a.seqlen).samples
    stacked = pipeline._stackable
    one_by_one = lambda refs, names, stats, grids, grid: [[j] for j in range(len(refs))]  # noqa: E731
    for name, runs in (("one by one", one_by_one), ("stacked", stacked)):
        pipeline._stackable = runs
        model = copy.deepcopy(lm.model)
        t = time.perf_counter()
        pipeline.quantize_model(model, QuantizeConfig(method="gptq", bits=4, group_size=64), samples,
                                show_progress=False)
        print(f"{name:10s} {time.perf_counter() - t:6.1f} s   (W4 g64, {a.nsamples} x {a.seqlen} builtin:mix tokens)",
              flush=True)
    pipeline._stackable = stacked


if __name__ == "__main__":
    main()
