"""AWQ (Lin et al., arXiv 2306.00978) as pure tensor functions: per-input-channel scales from activation
magnitudes, the fake quantization they are judged by, and the per-group clipping search.

A linear's weight is scaled column-wise, W' = W · diag(s), and its input divided, x' = x / s (the
division is folded into the previous op), so W'x' = Wx in exact arithmetic while salient input
channels (large mean |x|) get finer effective quantization steps.
"""
from __future__ import annotations

import torch

from .gptq import gptq
from .grid import Grid, group_index
from .rtn import rtn


def weight_magnitude(W: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its group's max (AutoAWQ's w_mean), [in]."""
    out_f, in_f = W.shape
    g = grid.group_len(in_f)
    pad = (-in_f) % g
    Wp = torch.nn.functional.pad(W.abs(), (0, pad)).view(out_f, -1, g)     # [out, G, g]
    Wn = Wp / (Wp.amax(dim=-1, keepdim=True) + 1e-6)
    return Wn.view(out_f, -1)[:, :in_f].mean(0)


def awq_scales(x_mag: torch.Tensor, w_mag: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s = x_mag^α (/ w_mag^(1-α) with duo scaling), normalised so that max(s)·min(s) = 1. [in] -> [in]."""
    s = x_mag.pow(alpha)
    if w_mag is not None:
        s = s / (w_mag.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Q(W · diag(s)) · diag(s)^-1: the weight the scaled layer effectively uses. [out, in]."""
    return rtn(W * s, grid).dequantize() / s


def scaled_gptq_quant(W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, grid: Grid, **gptq_opts) -> torch.Tensor:
    """The same with GPTQ as the quantizer: the scaled layer W·diag(s) reads x/s, whose Hessian is
    diag(s)^-1 H diag(s)^-1 (H [in, in] of the unscaled input). [out, in]."""
    Hs = H / s[:, None] / s[None, :]
    return gptq(W * s, Hs, grid, **gptq_opts).dequantize() / s


def _fake_quant_groups(Wg: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Fake-quantize [rows, G, g] with one min-max grid per (row, group)."""
    rows, G, g = Wg.shape
    return rtn(Wg.reshape(rows * G, g), Grid(grid.bits, -1, grid.sym)).dequantize().view(rows, G, g)


def clip_search(W: torch.Tensor, X: torch.Tensor, grid: Grid, n_grid: int = 20, max_shrink: float = 0.5,
                row_batch: int = 64) -> torch.Tensor:
    """Per (output row, group) clipping threshold that minimises the group's output error.

    W [out, in], X [n, in] sample inputs. For shrink i/n_grid, i < max_shrink·n_grid, the weights are
    clamped to ±(1 - i/n_grid)·max|w| and fake-quantized; the error is the mean over samples of the
    squared difference of the group's partial output x_g·w_g. Returns max_val [out, G].
    """
    out_f, in_f = W.shape
    g = grid.group_len(in_f)
    pad = (-in_f) % g
    Wg = torch.nn.functional.pad(W, (0, pad)).view(out_f, -1, g)          # [out, G, g]
    Xg = torch.nn.functional.pad(X, (0, pad)).view(X.shape[0], -1, g)     # [n, G, g]
    best = torch.empty(out_f, Wg.shape[1], device=W.device)
    for r0 in range(0, out_f, row_batch):
        w = Wg[r0:r0 + row_batch]                                          # [r, G, g]
        org_out = torch.einsum("ngk,rgk->rng", Xg, w)                      # [r, n, G]
        org_max = w.abs().amax(dim=-1, keepdim=True)                       # [r, G, 1]
        best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            q = _fake_quant_groups(torch.clamp(w, -max_val, max_val), grid)
            err = (torch.einsum("ngk,rgk->rng", Xg, q) - org_out).pow(2).mean(dim=1).unsqueeze(-1)  # [r, G, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best[r0:r0 + row_batch] = best_max.squeeze(-1)
    return best


def apply_clip(W: torch.Tensor, max_val: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Clamp each (row, group) of W [out, in] to ±max_val [out, G]."""
    in_f = W.shape[1]
    m = max_val[:, group_index(in_f, grid).to(max_val.device, torch.long)].to(W.device)
    return torch.clamp(W, -m, m)
