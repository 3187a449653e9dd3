"""How far each calibration source's token distribution is from the built-in mix (Jensen-Shannon, bits).

Sets qforge.calibration.checks.NARROW_JSD: single domains should sit above it, mixes below.
    .venv/bin/python benchmarks/calibration_diversity.py [--model smollm2-135m] [--nsamples 128 --seqlen 512]
"""
import argparse

from qforge.calibration import DOMAINS, build_calibration
from qforge.calibration.checks import NARROW_JSD, narrowness
from qforge.cli.table import format_table
from qforge.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--nsamples", type=int, default=128)
ap.add_argument("--seqlen", type=int, default=512)
a = ap.parse_args()
tok = load_model(a.model).tokenizer
rows = []
for spec in ["builtin:mix"] + [f"builtin:{d}" for d in DOMAINS]:
    for n, L in ((a.nsamples, a.seqlen), (32, 512)):
        c = build_calibration(spec, tok, n, L, seed=0)
        j = narrowness(c.samples, tok)
        rows.append([spec, f"{n}x{L}", j, "narrow" if j > NARROW_JSD else "ok"])
print(format_table(["source", "samples", "JSD vs mix (bits)", f"verdict (> {NARROW_JSD})"], rows))
