"""SmoothQuant on a whole model: per-channel activation maxima from one calibration pass, then every
table mapping prev -> linears gets s = smoothquant_scales(...) folded in (prev's output divided by s,
the linears' input columns multiplied by s), so the fp model computes the same function and the
linears' inputs have flatter channels for per-token activation quantization.

All maxima are taken before any fold: each fold is an exact equivalence, so the inputs of later
mappings only change by the channel scales the fold itself applies. A mapping whose shapes do not
fit (e.g. v_proj -> o_proj under grouped-query attention) is skipped with a log line.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..capture.blocks import make_batches
from ..errors import QForgeError
from ..models.arch import arch_spec, block_linears, get_blocks
from ..solvers.smoothquant import smoothquant_scales
from .fold import fold_scales, mapping_units

log = logging.getLogger(__name__)


@torch.no_grad()
def smooth_model(model: nn.Module, samples: list[torch.Tensor], alpha: float, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into `model` in place; returns {"<block>.<prev>": s} of the mappings applied."""
    if not 0.0 <= alpha <= 1.0:
        raise QForgeError(f"SmoothQuant alpha must be in [0, 1], not {alpha}")
    if not samples:
        raise QForgeError("SmoothQuant needs calibration samples")
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    plans, absmax, handles, skipped = [], {}, [], {}
    for i, block in enumerate(blocks):
        refs = [r for g in block_linears(block, spec) for r in g]
        for m in spec.smooth:
            units, why = mapping_units(block, m, refs)
            if not why and any(u.expert is not None for u in units):
                why = "per-expert scales need per-expert activations (AWQ only)"
            if why:
                skipped.setdefault((f"{m.prev} -> {','.join(m.linears)}", why), []).append(i)
                continue
            u = units[0]
            key = f"{i}.{u.key}"
            plans.append((key, block, u))
            handles.append(u.lins[0].module.register_forward_pre_hook(_absmax_hook(absmax, key)))
    for (mapping, why), where in skipped.items():
        log.info("SmoothQuant mapping %s skipped in %d block(s) (first: %d): %s", mapping, len(where), where[0], why)
    try:
        for ids in make_batches(samples, batch_size):
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for key, block, u in plans:
        w_absmax = torch.stack([r.weight.float().abs().amax(dim=0) for r in u.lins]).amax(dim=0)
        s = smoothquant_scales(absmax[key], w_absmax, alpha)
        fold_scales(block, u, s, spec.norm_plus_one)
        scales[key] = s
    log.info("SmoothQuant (alpha %.2f): %d mappings folded", alpha, len(scales))
    return scales


def _absmax_hook(store: dict, key: str):
    def hook(_module, args):
        a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).cpu()
        store[key] = a if key not in store else torch.maximum(store[key], a)
    return hook
