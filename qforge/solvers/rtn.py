"""Round-to-nearest: each group's min-max grid (FP8: absmax / 448; NVFP4: absmax / 6 in E4M3, over a global scale;
MX: a power of two), every weight rounded independently."""
from __future__ import annotations

import torch

from .grid import Grid, LayerQuant, fit_params, group_index, nvfp4_global_scale, quantize


def rtn(W: torch.Tensor, grid: Grid) -> LayerQuant:
    """W [out, in] -> LayerQuant. Groups are contiguous column ranges; the last may be ragged. NVFP4: the global
    scale g is W's (grid.py; linears an engine fuses are solved stacked, so they share it)."""
    if not grid.nvfp4:
        return _rtn(W.float(), grid)
    g = nvfp4_global_scale(W)
    q = _rtn(W.float() * g, grid)                                 # scales: E4M3 numbers in units of 1 / g
    q.global_scale = torch.tensor([g])
    return q


def _rtn(W: torch.Tensor, grid: Grid) -> LayerQuant:
    out_f, in_f = W.shape
    g = grid.group_len(in_f)
    full = in_f // g                                              # groups of exactly g columns
    parts = []
    if full:
        Wg = W[:, : full * g].reshape(out_f, full, g).transpose(0, 1)   # [groups, out, g]: a group's rows together
        scale, zero = fit_params(Wg, grid)                              # [groups, out]
        codes = quantize(Wg, scale, zero, grid)
        parts.append((codes.transpose(0, 1).reshape(out_f, full * g), scale.t(), zero.t()))
    if full * g < in_f:                                           # ragged last group
        Wr = W[:, full * g:]
        scale, zero = fit_params(Wr, grid)
        parts.append((quantize(Wr, scale, zero, grid), scale[:, None], zero[:, None]))
    codes, scales, zeros = (torch.cat(t, dim=1) for t in zip(*parts))
    return LayerQuant(grid, codes.to(grid.code_dtype), scales, zeros, group_index(in_f, grid), info={"method": "rtn"})
