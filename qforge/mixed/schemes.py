"""Candidate quantization schemes for mixed precision, and what each costs as stored.

A scheme is a Grid (bits, group size, sym). Its cost for a linear [out, in] is the number of bits
its tensors take in the target packed format (codes + scales + zeros + group indices + shape
records), measured by packing an all-zero layer with that format's own `pack`: the optimiser then
spends exactly what `qforge export` writes, and the bpw it reports equals the bpw read off the files.
Without a format the cost is storage.py's accounting (qforge's own output directory).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..formats import FORMATS
from ..solvers import Grid, LayerQuant
from ..solvers.grid import group_index

CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)
# the candidate widths each format stores (its module's BITS: gptq's readers take 2, 3, 4 and 8)
FORMAT_BITS = {**{f: tuple(b for b in CANDIDATE_BITS if b in FORMATS[f].BITS) for f in ("gptq", "compressed-tensors")},
               None: CANDIDATE_BITS}
GROUPS = (32, 64, 128, -1)


def candidate_grids(in_features: int, fmt: str | None, bits: tuple[int, ...] | None = None,
                    groups: tuple[int, ...] = GROUPS) -> list[Grid]:
    """Schemes a linear with `in_features` inputs can use in `fmt`: whole groups only (the peers refuse
    ragged ones), symmetric and asymmetric (asymmetric costs nothing extra in gptq, which stores zeros anyway)."""
    if fmt not in FORMAT_BITS:
        raise ValueError(f"no mixed-precision schemes for format {fmt!r}; choose one of gptq, compressed-tensors")
    allowed = FORMAT_BITS[fmt]
    bits = tuple(b for b in (bits or allowed) if b in allowed)
    return [Grid(b, g, sym) for b in bits for g in groups
            if g == -1 or (g < in_features and in_features % g == 0) for sym in (True, False)]


@lru_cache(maxsize=4096)
def scheme_bits(shape: tuple[int, int], grid: Grid, fmt: str | None, act_order: bool = False,
                rows: tuple[int, ...] | None = None) -> int:
    """Exact stored bits of a linear of `shape` [out, in] quantized with `grid` in `fmt`; `rows`: the row counts of
    the modules `fmt` stores it as, when more than one (a fused expert's gate/up rows as its gate and up modules,
    each with its own g_idx)."""
    if rows is not None and len(rows) > 1:
        return sum(scheme_bits((r, shape[1]), grid, fmt, act_order) for r in rows)
    out_f, in_f = shape
    G = grid.n_groups(in_f)
    q = LayerQuant(grid, torch.zeros(out_f, in_f, dtype=torch.uint8), torch.ones(out_f, G),
                   torch.full((out_f, G), float(1 << (grid.bits - 1))), group_index(in_f, grid), {})
    if fmt is None:
        from ..storage import layer_bits

        return layer_bits(q, act_order)
    # the gptq format stores g_idx whatever the order; compressed-tensors refuses act-order groups
    packed = FORMATS[fmt].pack(q)
    return sum(t.numel() * t.element_size() * 8 for k, t in packed.items() if k != "bias")
