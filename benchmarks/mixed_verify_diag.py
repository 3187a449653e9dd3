"""Does mixed/verify.py's per-block check see the held-out failure of the 3.0 bpw allocation?

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_verify_diag.py --blocks 0,1,15      # each block quantized alone
    PYTHONPATH=. .venv/bin/python benchmarks/mixed_verify_diag.py --quantized          # the whole quantized model

Same measurement and calibration as benchmarks/mixed_precision.py (the first 32 of brown_128x512.jsonl);
--blocks: check_blocks on sequences 0-39 of that file (39 is the sequence mixed_heldout_diag.py traced to
block 0); --quantized: per-sequence KL of the model quantized with the allocation, sequences 0-63.
"""
from __future__ import annotations

import argparse

import torch

import qforge
from qforge.calibration import load_samples_jsonl
from qforge.config import QuantizeConfig
from qforge.eval.compare import kl_divergence
from qforge.mixed import load_measurement, plan
from qforge.mixed.plan import restate_costs
from qforge.mixed.verify import check_blocks
from benchmarks.mixed_heldout_diag import MEAS, logp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="", help="comma-separated blocks to check alone")
    ap.add_argument("--quantized", action="store_true", help="per-sequence KL of the whole quantized model")
    a = ap.parse_args()
    torch.set_num_threads(2)
    every = load_samples_jsonl("benchmarks/results/brown_128x512.jsonl")
    fp = qforge.load("smollm2-135m").model
    alloc = plan(restate_costs(load_measurement(MEAS), "compressed-tensors"), 3.0, pc_min_bits=0)   # session 18
    print(f"allocation {alloc.bpw:.4f} bpw, predicted total KL {alloc.total_err:.4f}", flush=True)
    if a.blocks:
        checks = check_blocks(fp, alloc, every[:32], every[:40], QuantizeConfig(method="gptq", bpw=3.0),
                              only={int(b) for b in a.blocks.split(",")})
        for i, c in checks.items():
            print(f"block {i}: predicted {c.predicted:.4f}, joint KL mean {sum(c.kl) / len(c.kl):.4f}, worst "
                  f"{c.worst:.3f} (sequence {c.kl.index(c.worst)}), sequence 39 {c.kl[39]:.3f}", flush=True)
    if a.quantized:
        seqs = every[:64]
        ref = [logp(fp, s) for s in seqs]
        m = qforge.load("smollm2-135m", QuantizeConfig(method="gptq", bpw=3.0))
        m.quantize(every[:32], allocation=alloc)
        kl = [float(kl_divergence(r, logp(m.model, s)).mean()) for r, s in zip(ref, seqs)]
        print("per-sequence KL", [round(k, 2) for k in kl])
        print("above 1 nat/token:", [i for i, k in enumerate(kl) if k > 1])


if __name__ == "__main__":
    main()
