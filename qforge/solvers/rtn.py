"""Round-to-nearest: each group's min-max grid, every weight rounded independently."""
from __future__ import annotations

import torch

from .grid import Grid, LayerQuant, fit_params, group_index, quantize


def rtn(W: torch.Tensor, grid: Grid) -> LayerQuant:
    """W [out, in] -> LayerQuant. Groups are contiguous column ranges; the last may be ragged."""
    W = W.float()
    out_f, in_f = W.shape
    g = grid.group_len(in_f)
    n_groups = grid.n_groups(in_f)
    codes = torch.empty(out_f, in_f)
    scales = torch.empty(out_f, n_groups)
    zeros = torch.empty(out_f, n_groups)
    for k in range(n_groups):
        cols = slice(k * g, min((k + 1) * g, in_f))
        scale, zero = fit_params(W[:, cols], grid)                 # [out], [out]
        codes[:, cols] = quantize(W[:, cols], scale, zero, grid.maxq)
        scales[:, k], zeros[:, k] = scale, zero
    return LayerQuant(grid, codes.to(torch.uint8), scales, zeros, group_index(in_f, grid), info={"method": "rtn"})
