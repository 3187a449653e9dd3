"""Mixed precision vs uniform GPTQ on SmolLM2-135M: bits per weight read off the exported files, and
perplexity by qforge's protocol.

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_precision.py [--nsamples 128] [--targets 2.5,3.0,3.5,4.0]

Calibration: the first N samples of benchmarks/results/brown_128x512.jsonl (the GPTQ benchmark's file).
One measurement (resumable, kept in benchmarks/results/) serves every target. Every result is exported
in the gptq format and its bpw measured on the files; rows go to benchmarks/results/mixed_precision.jsonl.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

UNIFORM = [("W2 g32", 2, 32), ("W3 g64", 3, 64), ("W4 g64", 4, 64)]


def evaluate(m, datasets, windows) -> dict:
    from qforge.eval import load_eval_text, perplexity

    return {d: perplexity(m.model, m.tokenizer, load_eval_text(d), 2048, windows, show_progress=False)["ppl"]
            for d in datasets}


def main() -> None:
    import qforge
    from qforge.calibration import load_samples_jsonl
    from qforge.cli.table import format_table

    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=Path, default=Path("benchmarks/results/brown_128x512.jsonl"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0")
    ap.add_argument("--uniform", default="W2 g32,W3 g64,W4 g64")
    ap.add_argument("--datasets", default="wiki,news")
    ap.add_argument("--max-windows", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_precision.jsonl"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    samples = load_samples_jsonl(a.calib)[: a.nsamples]
    datasets = a.datasets.split(",")
    meas = Path(f"benchmarks/results/mixed_measurement_{a.nsamples}x{samples[0].numel()}.json")
    runs = [(f"mixed {t} bpw", qforge.QuantizeConfig(method="gptq", bpw=float(t), measurement=str(meas)))
            for t in a.targets.split(",") if t]
    runs += [(name, qforge.QuantizeConfig(method="gptq", bits=b, group_size=g))
             for name, b, g in UNIFORM if name in a.uniform.split(",")]
    rows = []
    for name, cfg in runs:
        m = qforge.load("smollm2-135m", cfg)
        t = time.perf_counter()
        m.quantize(samples)
        secs = time.perf_counter() - t        # the first mixed run includes the measurement pass
        with tempfile.TemporaryDirectory() as d:
            sizes = m.export(Path(d) / "x", "gptq")
        alloc = m.result.allocation
        row = {"run": name, "nsamples": a.nsamples, "seconds": secs, "bpw_files": sizes["bits_per_weight"],
               "bpw_predicted": alloc.bpw if alloc else None, "total_err": alloc.total_err if alloc else None,
               "schemes": _scheme_counts(m), "ppl": evaluate(m, datasets, a.max_windows)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(format_table(["run", "bpw (files)", "quant s", *datasets, "schemes"],
                       [[r["run"], r["bpw_files"], r["seconds"], *[r["ppl"][d] for d in datasets],
                         ", ".join(f"{k} x{v}" for k, v in r["schemes"].items())] for r in rows],
                       title=f"SmolLM2-135M, GPTQ calibration {a.nsamples} x 512 Brown, ppl on {a.max_windows} x 2048"))


def _scheme_counts(m) -> dict:
    from collections import Counter

    from qforge.mixed.measure import grid_key

    return dict(Counter(grid_key(q.grid) for q in m.result.layers.values()).most_common())


if __name__ == "__main__":
    main()
