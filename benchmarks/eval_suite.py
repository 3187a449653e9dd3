"""The evaluation suite on SmolLM2-135M, in the style of arXiv 2402.18158: weight-only, weight-activation
(with and without SmoothQuant) and KV-cache quantization, a calibration-domain matrix, and the
statistics plots.

    PYTHONPATH=. .venv/bin/python benchmarks/eval_suite.py [--max-windows 1] [--parts table,study,stats] [--rows A,B]

Weights are RTN symmetric per channel (the paper's W8/W4/W3 setting), activations per-token dynamic
symmetric, KV asymmetric per token and head. Rows go to benchmarks/results/eval_suite.jsonl; the study
and statistics land in benchmarks/results/eval_suite_{study,stats}/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

RESULTS = Path("benchmarks/results")
TABLE = [("fp32", {}), ("W8", dict(weight_bits=8)), ("W4", dict(weight_bits=4)), ("W3", dict(weight_bits=3)),
         ("W8A8", dict(weight_bits=8, act_bits=8)), ("W4A8", dict(weight_bits=4, act_bits=8)),
         ("W4A4", dict(weight_bits=4, act_bits=4)),
         ("W8A8 SmoothQuant 0.5", dict(weight_bits=8, act_bits=8, smoothquant=0.5)),
         ("W4A8 SmoothQuant 0.5", dict(weight_bits=4, act_bits=8, smoothquant=0.5)),
         ("W4A4 SmoothQuant 0.5", dict(weight_bits=4, act_bits=4, smoothquant=0.5)),
         ("KV8", dict(kv_bits=8)), ("KV4", dict(kv_bits=4)), ("KV3", dict(kv_bits=3)), ("KV2", dict(kv_bits=2)),
         ("FP8 W8", dict(weight_bits=8, fp8=True)), ("FP8 W8A8", dict(weight_bits=8, act_bits=8, fp8=True)),
         ("KV FP8", dict(kv_bits=8, kv_fp8=True))]


def run_table(a) -> None:
    import qforge
    from qforge.cli.table import format_table
    from qforge.config import SimulationConfig

    datasets = a.datasets.split(",")
    rows = []
    for name, kw in TABLE:
        if a.rows and name not in a.rows.split(","):
            continue
        sim = SimulationConfig(**kw)
        t = time.perf_counter()
        res = qforge.evaluate("smollm2-135m", datasets=datasets, max_windows=a.max_windows, simulate=sim)
        row = {"run": name, "ppl": {r["dataset"]: r["ppl"] for r in res},
               "by_position": {r["dataset"]: r["by_position"] for r in res}, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with (RESULTS / "eval_suite.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(format_table(["setting", *datasets], [[r["run"], *[r["ppl"][d] for d in datasets]] for r in rows],
                       title=f"SmolLM2-135M, simulated quantization, ppl on {a.max_windows} x 2048 per set"))
    kv = [r for r in rows if r["run"].startswith("KV") or r["run"] == "fp32"]
    if not kv:
        return
    buckets = kv[0]["by_position"][datasets[0]]
    print(format_table(["setting", *[f"{b['positions'][0]}-{b['positions'][1] - 1}" for b in buckets]],
                       [[r["run"], *[b["ppl"] for b in r["by_position"][datasets[0]]]] for r in kv],
                       title=f"{datasets[0]} ppl by position of the predicted token"))


def run_study(a) -> None:
    import qforge
    from qforge.eval.study import calibration_study, plot_study

    cfg = qforge.QuantizeConfig(method="gptq", bits=3, group_size=64, true_sequential=False)
    t = time.perf_counter()
    study = calibration_study("smollm2-135m", cfg, ["wiki", "brown", "news", "code"], nsamples=a.study_nsamples,
                              seqlen=512, max_windows=a.max_windows,
                              on_row=lambda c, r: print(c, json.dumps(r), flush=True))
    study["total_seconds"] = time.perf_counter() - t
    out = RESULTS / "eval_suite_study"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    plot_study(study, out / "study.png")
    for calib, d in study["degradation"].items():
        print(calib, {k: v for k, v in d.items() if k != "cells"})
    print("\n".join(study["warnings"]) or "no overfit warnings")


def run_stats(a) -> None:
    import qforge
    from qforge.calibration import build_calibration
    from qforge.analysis import collect_stats, plot_stats

    m = qforge.load("smollm2-135m")
    st = collect_stats(m.model, build_calibration("builtin:mix", m.tokenizer, 16, 512).samples)
    out = RESULTS / "eval_suite_stats"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "stats.json").write_text(json.dumps(st, indent=1) + "\n")
    plot_stats(st, "model.layers", out)
    for r in st["heaviest_tails"]:
        print(r["kind"], r["tensor"], f"kurtosis {r['kurtosis']:.1f} absmax {r['absmax']:.1f} std {r['std']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="table,study,stats")
    ap.add_argument("--datasets", default="wiki,code")
    ap.add_argument("--max-windows", type=int, default=1)
    ap.add_argument("--rows", default="", help="only these rows of the table (comma-separated names, e.g. 'fp32,KV8')")
    ap.add_argument("--study-nsamples", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(2)
    for part in a.parts.split(","):
        {"table": run_table, "study": run_study, "stats": run_stats}[part](a)


if __name__ == "__main__":
    main()
