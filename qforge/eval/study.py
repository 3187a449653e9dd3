"""Cross-domain calibration study: quantize once per calibration domain (plus the built-in mix), evaluate
every result on every domain, and flag calibration sets that overfit.

Degradation of a cell is relative to the unquantized model on the same eval set: ppl / ppl_fp − 1.
A row's in-domain degradation is its diagonal cell; its off-domain degradation is the mean over the
other eval domains. The mix row has no diagonal: its off-domain degradation is its mean over all
domains. A domain row whose off-domain degradation exceeds `overfit_factor` × the mix's is flagged
(a narrow calibration set, e.g. role-play chat, can look excellent in-domain and wreck the rest).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import QuantizeConfig
from ..errors import QForgeError
from .datasets import EVAL_SETS

log = logging.getLogger(__name__)
MIX = "mix"


def calibration_study(model: str, cfg: QuantizeConfig, domains: list[str], nsamples: int = 32, seqlen: int = 512,
                      eval_seqlen: int = 2048, max_windows: int | None = 2, seed: int = 0, device: str = "cpu",
                      overfit_factor: float = 3.0, on_row=None) -> dict:
    """{"fp": {eval: ppl}, "ppl": {calib: {eval: ppl}}, "degradation": {calib: {...}}, "warnings": [...]}."""
    from .. import api

    unknown = [d for d in domains if d not in EVAL_SETS]
    if unknown or not domains:
        raise QForgeError(f"study domains must be built-in sets ({', '.join(EVAL_SETS)}), got {domains}")
    if not cfg.needs_calibration:
        raise QForgeError(f"method {cfg.method!r} uses no calibration data: nothing to study")
    kw = dict(datasets=domains, seqlen=eval_seqlen, max_windows=max_windows, device=device)
    fp = {r["dataset"]: r["ppl"] for r in api.evaluate(model, **kw)}
    ppl, seconds = {}, {}
    for calib in [*domains, MIX]:
        t0 = time.perf_counter()
        m = api.load(model, cfg)
        m.quantize(f"builtin:{calib}", nsamples=nsamples, seqlen=seqlen, seed=seed, device=device)
        ppl[calib] = {r["dataset"]: r["ppl"] for r in api.evaluate(m, **kw)}
        seconds[calib] = round(time.perf_counter() - t0, 1)
        log.info("calibrated on %s: %s", calib, {d: round(v, 3) for d, v in ppl[calib].items()})
        if on_row is not None:
            on_row(calib, ppl[calib])
    deg = degradation(fp, ppl, domains)
    return {"model": model, "config": cfg.to_dict(), "nsamples": nsamples, "seqlen": seqlen, "eval_seqlen": eval_seqlen,
            "max_windows": max_windows, "fp": fp, "ppl": ppl, "seconds": seconds, "degradation": deg,
            "warnings": overfit_warnings(deg, overfit_factor)}


def degradation(fp: dict[str, float], ppl: dict[str, dict[str, float]], domains: list[str]) -> dict[str, dict]:
    out = {}
    for calib, row in ppl.items():
        rel = {d: row[d] / fp[d] - 1 for d in domains}
        off = [rel[d] for d in domains if d != calib]
        out[calib] = {"in_domain": rel.get(calib) if calib != MIX else None,
                      "off_domain": sum(off) / len(off) if off else None, "cells": rel}
    return out


def overfit_warnings(deg: dict[str, dict], factor: float) -> list[str]:
    base = deg.get(MIX, {}).get("off_domain")
    if base is None:
        return []
    warnings = []
    for calib, d in deg.items():
        if calib != MIX and d["off_domain"] is not None and d["off_domain"] > factor * max(base, 1e-9):
            warnings.append(f"calibration on {calib} overfits: off-domain degradation {d['off_domain']:+.1%} is "
                            f"{d['off_domain'] / max(base, 1e-9):.1f}x the mix's ({base:+.1%}); in-domain {d['in_domain']:+.1%}")
    return warnings


def plot_study(study: dict, path: str | Path) -> None:
    """Heat map of ppl / ppl_fp − 1: calibration domain (rows) x eval domain (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = list(study["ppl"]), list(study["fp"])
    M = np.array([[study["degradation"][r]["cells"][c] * 100 for c in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2, 0.6 * len(rows) + 1.5))
    im = ax.imshow(M, cmap="Reds")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [f"calib {r}" for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{study['ppl'][rows[i]][cols[j]]:.1f}\n{M[i, j]:+.0f}%", ha="center", va="center", fontsize=7)
    ax.set_title("perplexity (and % over fp) by calibration domain")
    fig.colorbar(im, ax=ax, label="% over fp")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
