"""Round-to-nearest: each group's min-max grid (FP8: absmax / 448), every weight rounded independently."""
from __future__ import annotations

import torch

from .grid import Grid, LayerQuant, fit_params, group_index, quantize


def rtn(W: torch.Tensor, grid: Grid) -> LayerQuant:
    """W [out, in] -> LayerQuant. Groups are contiguous column ranges; the last may be ragged."""
    W = W.float()
    out_f, in_f = W.shape
    g = grid.group_len(in_f)
    full = in_f // g                                              # groups of exactly g columns
    parts = []
    if full:
        Wg = W[:, : full * g].reshape(out_f * full, g)            # one row per (channel, group)
        scale, zero = fit_params(Wg, grid)
        parts.append((quantize(Wg, scale, zero, grid).reshape(out_f, full * g),
                      scale.reshape(out_f, full), zero.reshape(out_f, full)))
    if full * g < in_f:                                           # ragged last group
        Wr = W[:, full * g:]
        scale, zero = fit_params(Wr, grid)
        parts.append((quantize(Wr, scale, zero, grid), scale[:, None], zero[:, None]))
    codes, scales, zeros = (torch.cat(t, dim=1) for t in zip(*parts))
    return LayerQuant(grid, codes.to(grid.code_dtype), scales, zeros, group_index(in_f, grid), info={"method": "rtn"})
