"""Mixed precision at one target against uniform GPTQ on the long evaluation sets, with a per-sequence held-out
check: which allocation variants stay robust (no held-out sequence broken) and still win?

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_robust.py --variants plain,no2pc,uniform [--bpw 3.0]
    PYTHONPATH=. .venv/bin/python benchmarks/mixed_robust.py --variants search --generations 100

"search" is the default plan improved by mixed/search.py (KL of the whole model on calibration samples
0..--fitness-1); its allocation is saved to benchmarks/results/mixed_search_<bpw>_g<generations>[_f<fitness>][_s<span>].json
(--search-from continues a saved one; its generations count on). "stitched" evaluates --search-from's allocation
as the search judged it: each linear's database weight (GPTQ on the fp model's Hessians, no sequential
re-quantization), set into the fp32 model; "saved" quantizes it as saved (no further search).

Same calibration and measurement as benchmarks/mixed_precision.py (the first 32 of
benchmarks/results/brown_128x512.jsonl; MEAS of mixed_heldout_diag.py), costs counted as compressed-tensors
stores them; ppl on the first 16 windows x 2048 of wiki (of 20) and all 12 of news; held-out KL per sequence
(every position) on calibration-file samples 32-95, which neither the measurement nor the quantization saw.
Rows go to --out as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import qforge
from qforge.calibration import load_samples_jsonl
from qforge.eval import load_eval_text, perplexity
from qforge.eval.compare import kl_divergence
from qforge.mixed import Allocation, load_measurement, plan
from qforge.mixed.plan import restate_costs
from qforge.models.families import ARCHS
from qforge.models.fused import fused_sets
from benchmarks.mixed_heldout_diag import MEAS, logp


VARIANTS = {                                    # plan()'s per-channel floor decides what each may use
    "plain": lambda meas, bpw: plan(meas, bpw, pc_min_bits=0),           # every measured option
    "no2pc": lambda meas, bpw: plan(meas, bpw),                           # qforge's default since session 20
    "no2pc_p1.5": lambda meas, bpw: plan(meas, bpw, err_power=1.5),
    "no3pc": lambda meas, bpw: plan(meas, bpw, pc_min_bits=4),
    "no3pc_p1.5": lambda meas, bpw: plan(meas, bpw, err_power=1.5, pc_min_bits=4),
    "nopc": lambda meas, bpw: plan(meas, bpw, pc_min_bits=9),
    # no2pc with each fused set (a block's q/k/v, gate/up) on one scheme: qforge's default since session 36
    "fused": lambda meas, bpw: plan(meas, bpw, units=fused_sets(ARCHS["llama"], meas["layers"])),
}
UNIFORM = {"uniform": (3, 64, True), "uniform4": (4, 64, True), "uniform2": (2, 32, True)}


def stitch(model, alloc: Allocation, samples, cfg) -> None:
    """Set every allocated linear of `model` to its search-database weight (fp Hessians, fp32)."""
    from qforge.mixed.search import build_database
    from qforge.models.arch import arch_spec, named_block_linears
    from qforge.solvers import Grid

    levels = {n: [Grid(d["bits"], d["group_size"], d["sym"])] for n, d in alloc.layers.items()}
    db = build_database(model, levels, samples, cfg, torch.float32)
    for n, (_, ref) in named_block_linears(model, arch_spec(model)).items():
        if n in db:
            ref.set_weight(db[n][0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="plain,no2pc,uniform")
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--datasets", default="wiki,news")
    ap.add_argument("--heldout", default="32:96")
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--search-from", type=Path, help="continue the search from this saved allocation")
    ap.add_argument("--seed", type=int, help="search seed (default: the number of runs --search-from records)")
    ap.add_argument("--span", type=int, default=2, help="search levels either side of the start's pick")
    ap.add_argument("--fitness", type=int, default=16, help="search fitness: calibration samples 0..N-1")
    ap.add_argument("--fitness-extra", default="", help="SPEC:N, N more fitness samples of 512 tokens from SPEC "
                    "(e.g. builtin:code:16): a diagnostic, the fitness is then not the calibration alone")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_robust.jsonl"))
    a = ap.parse_args()
    if {"saved", "stitched"} & set(a.variants.split(",")) and not a.search_from:
        ap.error("the saved and stitched variants evaluate the allocation given by --search-from")
    torch.set_num_threads(2)
    every = load_samples_jsonl("benchmarks/results/brown_128x512.jsonl")
    lo, hi = (int(x) for x in a.heldout.split(":"))
    samples, held = every[:32], every[lo:hi]
    base = qforge.load("smollm2-135m")
    fp = base.model
    meas = restate_costs(load_measurement(MEAS), "compressed-tensors")
    for v in a.variants.split(","):
        if v in UNIFORM:
            b, g, sym = UNIFORM[v]
            cfg, alloc = qforge.QuantizeConfig(method="gptq", bits=b, group_size=g, sym=sym), None
            name = f"uniform W{b} g{g} {'sym' if sym else 'asym'}"
        elif v == "search":
            from qforge.mixed.search import searched_allocation

            cfg = qforge.QuantizeConfig(method="gptq", bpw=a.bpw)
            t = time.perf_counter()
            start = Allocation.load(a.search_from) if a.search_from else plan(meas, a.bpw)
            fitness = samples[:a.fitness]
            if a.fitness_extra:
                from qforge.calibration import build_calibration

                spec, n = a.fitness_extra.rsplit(":", 1)
                fitness = fitness + build_calibration(spec, base.tokenizer, int(n), 512).samples
            alloc = searched_allocation(fp, meas, start, samples, fitness, cfg,
                                        a.generations, a.offspring, span=a.span, seed=a.seed, show_progress=True)
            search_s = time.perf_counter() - t
            done = alloc.search["generations"]
            tag = f"g{done}" + (f"_f{a.fitness}" if a.fitness != 16 else "") + (f"_s{a.span}" if a.span != 2 else "")
            tag += f"_x{a.fitness_extra.replace(':', '-')}" if a.fitness_extra else ""
            alloc.save(f"benchmarks/results/mixed_search_{a.bpw}_{tag}.json")
            name = f"mixed {a.bpw} search {tag} (last run: o{a.offspring} f{a.fitness} span {a.span})"
            run = alloc.search["runs"][-1]
            print(f"search {search_s:.0f} s, fitness KL {run['kl_start']:.4f} -> {run['kl_end']:.4f} on "
                  f"{run['sequences']} sequences, {run['accepted']} accepted, {alloc.bpw:.4f} bpw", flush=True)
        elif v in ("saved", "stitched"):
            cfg, alloc = qforge.QuantizeConfig(method="gptq", bpw=a.bpw), Allocation.load(a.search_from)
            name = f"{'saved allocation' if v == 'saved' else 'stitched database model of'} {a.search_from.name}"
        else:
            cfg, alloc = qforge.QuantizeConfig(method="gptq", bpw=a.bpw), VARIANTS[v](meas, a.bpw)
            name = f"mixed {a.bpw} {v}"
        m = qforge.load("smollm2-135m", cfg)
        t = time.perf_counter()
        if v == "stitched":
            stitch(m.model, alloc, samples, cfg)
        else:
            m.quantize(samples, allocation=alloc, show_progress=False)
        secs = time.perf_counter() - t
        # the fp reference is recomputed per variant: kept, 64 x 512 x vocab log-probabilities would take 6.4 GB
        kl = [float(kl_divergence(logp(fp, s), logp(m.model, s)).mean()) for s in held]
        srt = sorted(kl)
        ppl = {d: perplexity(m.model, m.tokenizer, load_eval_text(d), 2048, a.windows, show_progress=False)["ppl"]
               for d in a.datasets.split(",")}
        if v == "stitched":                                # no packed layers: the allocation's count
            bpw = alloc.bpw
        else:
            with tempfile.TemporaryDirectory() as d:      # bpw as the files store it
                bpw = m.export(Path(d) / "ct", "compressed-tensors")["bits_per_weight"]
        row = {"run": name, "bpw": bpw,
               "seconds": secs, "heldout": a.heldout, "heldout_kl_mean": sum(kl) / len(kl),
               "heldout_kl_median": srt[len(srt) // 2], "heldout_kl_max": srt[-1],
               "worst": sorted(range(len(kl)), key=lambda i: -kl[i])[:3], "ppl": ppl, "windows": a.windows,
               "heldout_kl": kl}
        print(json.dumps({k: v for k, v in row.items() if k != "heldout_kl"}), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
