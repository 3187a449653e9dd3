"""Mixed precision vs uniform GPTQ on SmolLM2-135M: bits per weight read off the exported files, and
perplexity by qforge's protocol.

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_precision.py [--nsamples 128] [--targets 2.5,3.0,3.5,4.0]

Calibration: the first N samples of benchmarks/results/brown_128x512.jsonl (the GPTQ benchmark's file).
One measurement (resumable, kept in benchmarks/results/) serves every target. Every result is exported
in `--format` (gptq, or compressed-tensors: no g_idx, no zeros when symmetric) and its bpw measured on the
files, which is also how the allocation counts its bits; rows go to benchmarks/results/mixed_precision.jsonl.
Every row also gets the measurement's summed error (the optimiser's proxy) for its schemes, and the
table ends with the rank correlation between that proxy and perplexity over all rows.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

_FMT_TAG = {"gptq": "", "compressed-tensors": "_ct"}
UNIFORM = [("W2 g32 sym", 2, 32, True), ("W3 g64 sym", 3, 64, True), ("W3 g64 asym", 3, 64, False),
           ("W4 g64 sym", 4, 64, True), ("W4 g64 asym", 4, 64, False)]


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
    ap.add_argument("--uniform", default=",".join(u[0] for u in UNIFORM))
    ap.add_argument("--datasets", default="wiki,news")
    ap.add_argument("--max-windows", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_precision.jsonl"))
    ap.add_argument("--probe-samples", type=int, default=2, help="calibration samples the KL probes run on")
    ap.add_argument("--measurement-tag", default="_gar_ss", help="suffix of the measurement file's name")
    ap.add_argument("--format", default="gptq", choices=["gptq", "compressed-tensors"],
                    help="export format whose stored bits the allocation counts and the bpw column reads")
    ap.add_argument("--measurement", type=Path, help="a finished measurement to use (its costs are recounted for "
                    "--format) instead of the one this script names and takes")
    ap.add_argument("--err-powers", default="1", help="plan each target minimising sum(err^p) for each p given")
    ap.add_argument("--heldout", type=int, default=8, help="calibration-file samples after the first N on which "
                    "each row's KL from the fp model is measured (0: none)")
    ap.add_argument("--bits", default="", help="candidate widths to measure, e.g. 2,3,4,8 (default: all the "
                                               "format takes)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    samples = load_samples_jsonl(a.calib)[: a.nsamples]
    datasets = a.datasets.split(",")
    from qforge.mixed.measure import VERSION

    # the measurement is taken with qforge's default GPTQ (group-aware order, scale search since session 16);
    # --measurement-tag "" names the file as sessions 13-15 did (plain order, min-max ranges)
    meas = a.measurement or Path(f"benchmarks/results/mixed_measurement_v{VERSION}_{a.nsamples}x"
                                 f"{samples[0].numel()}{a.measurement_tag}{_FMT_TAG[a.format]}.json")
    if a.targets and not _finished(meas):
        from qforge.mixed import measure_model

        t = time.perf_counter()
        m = qforge.load("smollm2-135m")
        measure_model(m.model, samples, meas, qforge.QuantizeConfig(method="gptq"), a.format,
                      identity={"model": "smollm2-135m", "calibration": f"{a.calib} first {a.nsamples}"},
                      probe_samples=a.probe_samples, bits=tuple(int(b) for b in a.bits.split(",")) if a.bits else None)
        print(f"measurement: {time.perf_counter() - t:.0f} s (resumed runs count only their own part)", flush=True)
        del m
    from qforge.mixed import load_measurement, plan
    from qforge.mixed.plan import restate_costs

    powers = [float(p) for p in a.err_powers.split(",")]
    runs = [(f"mixed {t} bpw" + (f" p={p:g}" if p != 1 else ""),
             qforge.QuantizeConfig(method="gptq", bpw=float(t), measurement=str(meas), bpw_format=a.format),
             plan(restate_costs(load_measurement(meas), a.format), float(t), err_power=p))
            for t in a.targets.split(",") if t for p in powers]
    runs += [(name, qforge.QuantizeConfig(method="gptq", bits=b, group_size=g, sym=sym), None)
             for name, b, g, sym in UNIFORM if name in a.uniform.split(",")]
    heldout = load_samples_jsonl(a.calib)[a.nsamples: a.nsamples + a.heldout]
    ref = _reference_logp(qforge.load("smollm2-135m").model, heldout) if heldout else None
    rows = []
    for name, cfg, alloc in runs:
        m = qforge.load("smollm2-135m", cfg)
        t = time.perf_counter()
        m.quantize(samples, allocation=alloc)
        secs = time.perf_counter() - t        # the measurement pass is timed separately, above
        with tempfile.TemporaryDirectory() as d:                # both formats: what each would store
            bpw = {f: m.export(Path(d) / f, f)["bits_per_weight"] for f in ("gptq", "compressed-tensors")}
        alloc = m.result.allocation
        row = {"run": name, "format": a.format, "nsamples": a.nsamples, "seconds": secs,
               "bpw_files": bpw[a.format], "bpw_files_by_format": bpw,
               "bpw_predicted": alloc.bpw if alloc else None, "total_err": _proxy(meas, m),
               "schemes": _scheme_counts(m), "heldout_kl": _kl(m.model, heldout, ref) if ref else None,
               "ppl": evaluate(m, datasets, a.max_windows)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(format_table(["run", "bpw (files)", "quant s", "proxy error", "held-out KL", *datasets, "schemes"],
                       [[r["run"], r["bpw_files"], r["seconds"], r["total_err"], r["heldout_kl"],
                         *[r["ppl"][d] for d in datasets],
                         ", ".join(f"{k} x{v}" for k, v in r["schemes"].items())] for r in rows],
                       title=f"SmolLM2-135M, GPTQ calibration {a.nsamples} x 512 Brown, ppl on {a.max_windows} x 2048"))
    for d in datasets:
        print(f"Spearman rank correlation of the proxy with {d} ppl over {len(rows)} rows: "
              f"{_spearman([r['total_err'] for r in rows], [r['ppl'][d] for r in rows]):.3f}; "
              f"of the held-out KL: {_spearman([r['heldout_kl'] or 0 for r in rows], [r['ppl'][d] for r in rows]):.3f}")


def _reference_logp(model, samples, stride: int = 4) -> list[torch.Tensor]:
    """The fp model's log-probabilities at every `stride`-th position of each sample."""
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=s.view(1, -1)).logits[0, stride - 1::stride].float(), -1)
                for s in samples]


def _kl(model, samples, ref, stride: int = 4) -> float:
    """Mean KL(P_fp || P_quantized) per position over the held-out calibration samples (nats)."""
    from qforge.eval.compare import kl_divergence

    got = _reference_logp(model, samples, stride)
    return float(torch.cat([kl_divergence(r, g) for r, g in zip(ref, got)]).mean())


def _finished(meas: Path) -> bool:
    from qforge.errors import QForgeError
    from qforge.mixed import load_measurement

    try:
        return meas.is_file() and bool(load_measurement(meas))
    except QForgeError:                    # unfinished (resumed by measure_model) or of an older version
        return False


def _proxy(meas: Path, m) -> float:
    """The measurement's summed error for the schemes this result actually used."""
    if not meas.is_file():
        return float("nan")
    layers = json.loads(meas.read_text())["layers"]
    total = 0.0
    for name, q in m.result.layers.items():
        g = q.grid
        total += next(o["err"] for o in layers[name]["options"]
                      if (o["bits"], o["group_size"], o["sym"]) == (g.bits, g.group_size, g.sym))
    return total


def _spearman(x: list[float], y: list[float]) -> float:
    import numpy as np

    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _scheme_counts(m) -> dict:
    from collections import Counter

    from qforge.mixed.measure import grid_key

    return dict(Counter(grid_key(q.grid) for q in m.result.layers.values()).most_common())


if __name__ == "__main__":
    main()
