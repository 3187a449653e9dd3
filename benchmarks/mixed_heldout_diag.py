"""Held-out check of a mixed-precision allocation: per-sample KL from the fp model on calibration-file samples
the measurement never saw, against a uniform scheme, and (--blocks) which block's quantization a bad sample
traces to (each block reverted to fp in turn).

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_heldout_diag.py --bpw 3.0 [--blocks 39]

Same calibration (the first 32 of benchmarks/results/brown_128x512.jsonl) and measurement as
benchmarks/mixed_precision.py; held-out samples 32-39 of the same file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qforge
from qforge.calibration import load_samples_jsonl
from qforge.eval.compare import kl_divergence
from qforge.mixed import load_measurement, plan
from qforge.mixed.plan import restate_costs

MEAS = Path("benchmarks/results/mixed_measurement_v3_32x512_gar_ss_b2348_ct.json")


def logp(model, s: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=s.view(1, -1)).logits[0].float(), -1)      # [T, vocab]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--format", default="compressed-tensors")
    ap.add_argument("--blocks", type=int, help="index of a sample in the file to trace block by block")
    a = ap.parse_args()
    torch.set_num_threads(2)
    every = load_samples_jsonl("benchmarks/results/brown_128x512.jsonl")
    samples, held = every[:32], every[32:40]
    fp = qforge.load("smollm2-135m").model
    ref = [logp(fp, s) for s in held]
    alloc = plan(restate_costs(load_measurement(MEAS), a.format), a.bpw, pc_min_bits=0)   # every option, as in session 18
    runs = [(f"mixed {a.bpw}", qforge.QuantizeConfig(method="gptq", bpw=a.bpw), alloc),
            ("W3 g64 sym", qforge.QuantizeConfig(method="gptq", bits=3, group_size=64, sym=True), None)]
    for name, cfg, al in runs[: 1 if a.blocks is not None else 2]:
        m = qforge.load("smollm2-135m", cfg)
        m.quantize(samples, allocation=al)
        if a.blocks is not None:
            trace(m, fp, every[a.blocks], alloc)
            return
        kl = torch.stack([kl_divergence(r, logp(m.model, s)) for r, s in zip(ref, held)])      # [8, T]
        nll = torch.stack([-logp(m.model, s)[:-1].gather(-1, s.view(-1)[1:, None]).mean() for s in held])
        q = torch.quantile(kl.flatten(), torch.tensor([0.5, 0.9, 0.99]))
        print(f"{name}: KL mean {kl.mean():.3f} median {q[0]:.3f} p90 {q[1]:.3f} p99 {q[2]:.3f} max {kl.max():.2f}"
              f" | held-out ppl {nll.mean().exp():.2f} | per-sample KL {[round(float(x), 2) for x in kl.mean(1)]}",
              flush=True)


def trace(m, fp, s: torch.Tensor, alloc) -> None:
    """KL on sample `s` with everything quantized, then with each block put back to fp in turn."""
    ref = logp(fp, s)
    fpw = dict(fp.named_parameters())
    params = dict(m.model.named_parameters())
    qw = {n: p.detach().clone() for n, p in params.items()}
    kl = kl_divergence(ref, logp(m.model, s))
    chunks = [round(float(x), 2) for x in kl.view(-1, 64).mean(1)]
    print(f"all quantized: mean KL {kl.mean():.3f}; by 64-token chunk {chunks}")
    for b in range(m.model.config.num_hidden_layers):
        names = [n for n in params if n.startswith(f"model.layers.{b}.") and n.endswith("weight")]
        with torch.no_grad():
            for n in names:
                params[n].copy_(fpw[n])
            v = kl_divergence(ref, logp(m.model, s)).mean()
            for n in names:
                params[n].copy_(qw[n])
        bits = {n.split(".", 3)[3]: d["bits"] for n, d in alloc.layers.items() if n.startswith(f"model.layers.{b}.")}
        print(f"block {b} back to fp: mean KL {v:.3f}  (its widths: {bits})", flush=True)


if __name__ == "__main__":
    main()
