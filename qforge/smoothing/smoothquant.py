"""SmoothQuant (Xiao et al., arXiv 2211.10438): every table mapping prev -> linears gets
s = smoothquant_scales(...) folded in (prev's output divided by s, the linears' input columns multiplied
by s), so the fp block computes the same function and the linears' inputs have flatter channels for
per-token activation quantization.

smooth_block is the quantization pipeline's stage: block i's maxima come from its own inputs (the
quantized earlier blocks' outputs, as it will be served; one block in memory, so it streams). smooth_model
does a whole fp model from one pass (the simulation's SmoothQuant on unquantized weights).

All of a block's maxima are taken before any fold: each fold is an exact equivalence, so the inputs of
later mappings only change by the channel scales the fold itself applies. A mapping whose shapes do not
fit (e.g. v_proj -> o_proj under grouped-query attention) is skipped with a log line.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..capture.blocks import BlockCall, make_batches, run_block
from ..capture.linear_inputs import tap_inputs
from ..errors import QForgeError
from ..models.arch import ArchSpec, arch_spec, block_linears, get_blocks
from ..solvers.smoothquant import smoothquant_scales
from .fold import FoldUnit, fold_scales, mapping_units

log = logging.getLogger(__name__)


def block_units(block: nn.Module, spec: ArchSpec) -> tuple[list[FoldUnit], list[tuple[str, str]]]:
    """The mappings SmoothQuant folds into `block` (one unit each), and the (mapping, reason) of those it skips."""
    refs = [r for g in block_linears(block, spec) for r in g]
    units, skipped = [], []
    for m in spec.smooth:
        found, why = mapping_units(block, m, refs)
        if not why and any(u.expert is not None for u in found):
            why = "per-expert scales need per-expert activations (AWQ only)"
        if why:
            skipped.append((f"{m.prev} -> {','.join(m.linears)}", why))
        else:
            units.append(found[0])
    return units, skipped


@torch.no_grad()
def smooth_block(block: nn.Module, spec: ArchSpec, hidden: list[torch.Tensor], calls: list[BlockCall], alpha: float,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into `block` in place, its maxima from one run on `hidden` (its inputs, fp32);
    returns {unit key: s}."""
    units, skipped = block_units(block, spec)
    for mapping, why in skipped:
        log.debug("SmoothQuant mapping %s skipped: %s", mapping, why)
    absmax: dict[str, torch.Tensor] = {}
    with tap_inputs([u.lins[0] for u in units], {u.lins[0].name: _absmax_sink(absmax, u.key) for u in units}):
        run_block(block, hidden, calls, device)
    return fold_smoothquant(block, spec, units, absmax, alpha)


@torch.no_grad()
def smooth_model(model: nn.Module, samples: list[torch.Tensor], alpha: float, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into every block of the fp `model` in place, the maxima from one pass over
    `samples`; returns {"<block>.<prev>": s} of the mappings applied."""
    _check_alpha(alpha)
    if not samples:
        raise QForgeError("SmoothQuant needs calibration samples")
    spec = arch_spec(model)
    plans, skipped = [], {}
    for i, block in enumerate(get_blocks(model, spec)):
        units, why_not = block_units(block, spec)
        for mapping_why in why_not:
            skipped.setdefault(mapping_why, []).append(i)
        plans.append((block, units, {}))
    for (mapping, why), where in skipped.items():
        log.info("SmoothQuant mapping %s skipped in %d block(s) (first: %d): %s", mapping, len(where), where[0], why)
    with contextlib.ExitStack() as taps:          # smooth_block's taps, one block's set each (names are per block)
        for _, units, maxima in plans:
            taps.enter_context(tap_inputs([u.lins[0] for u in units],
                                          {u.lins[0].name: _absmax_sink(maxima, u.key) for u in units}))
        for ids in make_batches(samples, batch_size):
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    scales = {f"{i}.{k}": s for i, (block, units, maxima) in enumerate(plans)
              for k, s in fold_smoothquant(block, spec, units, maxima, alpha).items()}
    log.info("SmoothQuant (alpha %.2f): %d mappings folded", alpha, len(scales))
    return scales


def fold_smoothquant(block: nn.Module, spec: ArchSpec, units: list[FoldUnit], absmax: dict[str, torch.Tensor],
                     alpha: float) -> dict[str, torch.Tensor]:
    """Fold each unit's scales, from its input maxima absmax[unit key] and its linears' weights, into `block`."""
    _check_alpha(alpha)
    scales = {}
    for u in units:
        w_absmax = torch.stack([r.weight.float().abs().amax(dim=0) for r in u.lins]).amax(dim=0)
        s = smoothquant_scales(absmax[u.key].to(w_absmax.device), w_absmax, alpha)
        fold_scales(block, u, s, spec.norm_plus_one)
        scales[u.key] = s.cpu()
    return scales


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise QForgeError(f"SmoothQuant alpha must be in [0, 1], not {alpha}")


def _absmax_sink(store: dict, key: str):
    """A sink that keeps the running per-channel max |x| of the 2-D inputs [tokens, channels] it is handed."""
    def sink(x: torch.Tensor) -> None:
        a = x.detach().float().abs().amax(dim=0).cpu()
        store[key] = a if key not in store else torch.maximum(store[key], a)
    return sink
