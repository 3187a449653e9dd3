"""GPTQ (Frantar et al., arXiv 2210.17323): quantize W column by column, compensating each column's
rounding error on the columns not yet quantized through the inverse Hessian of the layer inputs.

GPTAQ (GPTQv2, Li et al., ICML 2025, "Efficient Finetuning-Free Quantization with Asymmetric Calibration"),
with `dXXT`: the layer's inputs X̃ in the model being quantized differ from its inputs X in the fp model (the
earlier layers are quantized), and the objective is ||W X - Q X̃||² instead of ||W X̃ - Q X̃||². With
H = 2/n X̃ X̃ᵀ, dXXT = 2/n (X - X̃) X̃ᵀ and U the upper Cholesky factor of H⁻¹, each column i also moves the
later columns by w_i · P[i, :], P = α · triu(dXXT Uᵀ, 1) · U (the paper's α, 0.25 by default in GPTQModel):
inside a block of the column loop w_i as it was before rounding, across blocks ŵ_i, as the paper's code does.

Pure function: fp32 tensors in, LayerQuant out; no hooks, I/O or device choice (it runs where W is).
"""
from __future__ import annotations

import logging

import torch

from ..utils.tensors import all_finite
from .grid import Grid, LayerQuant, fit_params, nvfp4_global_scale, round_codes, search_params
from .inverse_hessian import inverse_hessian_cholesky

log = logging.getLogger(__name__)


def column_order(diag: torch.Tensor, gs: int, act_order: bool, group_aware: bool) -> torch.Tensor:
    """The order GPTQ visits the columns in: [in] permutation.

    act_order: decreasing diag(H). group_aware (GAR, Gafni et al., arXiv 2505.14638): the groups of
    `gs` consecutive columns in decreasing order of their largest diag(H), and inside each group its
    columns in decreasing diag(H); groups stay column ranges (in-order g_idx, as fast kernels want)
    while the most sensitive columns are still quantized first. A ragged last group goes last, so
    every other group starts at a multiple of `gs`. Per-channel (gs = n) is one group: act-order's
    visiting order, with nothing to record in g_idx."""
    n = diag.numel()
    if act_order:
        return torch.argsort(diag, descending=True)
    if not group_aware:
        return torch.arange(n, device=diag.device)
    full = n // gs
    local = torch.argsort(diag[: full * gs].view(full, gs), dim=1, descending=True)   # [G, gs]
    ranked = torch.argsort(diag[: full * gs].view(full, gs).amax(dim=1), descending=True)   # [G]
    perm = (local + torch.arange(full, device=diag.device)[:, None] * gs)[ranked].reshape(-1)
    tail = torch.argsort(diag[full * gs:], descending=True) + full * gs
    return torch.cat([perm, tail])


def column_loop(W1: torch.Tensor, U1: torch.Tensor, grid: Grid, gs: int, S: torch.Tensor | None = None,
                Z: torch.Tensor | None = None, cost1: torch.Tensor | None = None, scale_search: bool = False,
                P1: torch.Tensor | None = None):
    """GPTQ's sequential part on one block of b columns: quantize each column in turn and spread its
    error over the block's later columns (the reference; kernels/gptq_loop.py runs it as one kernel).

    W1 [out, b] the block's weights after the earlier blocks' updates (not modified); U1 [b, b] the
    block's diagonal block of the upper Cholesky factor of H^-1. S, Z [out, b]: every column's grid, or
    None: fitted at every gs-th column on the compensated weights (search_params weighted by cost1 [b]
    when scale_search, else fit_params). P1 [b, b] (GPTAQ): the block's diagonal block of P; column i adds
    w_i · P1[i, i+1:] to the later columns. Returns codes, Q1 = ŵ, Err1 = (w - ŵ) / U_ii, S, Z, all [out, b].
    """
    # The loop runs on the transpose ([b, out]: a column is a contiguous row, ~2x faster on a CPU than strided
    # columns) and updates with a rounded product then a subtraction (no fused multiply-add, whatever the memory
    # alignment: Triton's loop computes the same), so its results do not depend on how the tensors are laid out.
    WT = W1.t().contiguous()                                            # [b, out]
    fit = S is None
    ST, ZT = (torch.empty_like(WT), torch.empty_like(WT)) if fit else (S.t().contiguous(), Z.t().contiguous())
    codes, Q1, Err1, upd = (torch.empty_like(WT) for _ in range(4))
    d = torch.diag(U1).tolist()
    for i in range(WT.shape[0]):
        if fit and i % gs == 0:
            cols = WT[i:i + gs].t().contiguous()                         # [out, gs]
            s, z = search_params(cols, grid, cost1[i:i + gs]) if scale_search else fit_params(cols, grid)
            ST[i:i + gs], ZT[i:i + gs] = s[None, :], z[None, :]
        s, z, w = ST[i], ZT[i], WT[i]
        q = round_codes(torch.div(w, s, out=codes[i]), z, grid)             # [out] codes
        torch.mul(q - z, s, out=Q1[i])
        err = torch.sub(w, Q1[i], out=Err1[i]).div_(d[i])
        torch.outer(U1[i, i + 1:], err, out=upd[i + 1:])
        if P1 is not None:                                                  # GPTAQ: w (before rounding) · P
            upd[i + 1:].sub_(torch.outer(P1[i, i + 1:], w))
        WT[i + 1:].sub_(upd[i + 1:])                                        # compensate the rest of the block
    return codes.t(), Q1.t(), Err1.t(), ST.t(), ZT.t()


def gptq(W: torch.Tensor, H: torch.Tensor | list[torch.Tensor], grid: Grid, *, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, static_groups: bool = False, group_aware: bool = False,
         scale_search: bool = False, loop=column_loop, factors: dict | None = None,
         dXXT: torch.Tensor | None = None, alpha: float = 0.25) -> LayerQuant:
    """W [out, in], H [in, in] -> LayerQuant whose codes/scales/zeros/g_idx reproduce Ŵ exactly.

    act_order: columns in decreasing diag(H) order; groups are then runs of `group_size` consecutive
    columns in that order (g_idx records each column's group).
    group_aware: groups stay column ranges, visited most sensitive first (see column_order).
    static_groups: every group's grid is fitted on the original weights of its column range before any
    update or reordering (in-order g_idx); otherwise a group's grid is fitted when the solver reaches
    it, on the error-compensated weights.
    scale_search: each group's range is shrunk to minimise its rounding error weighted by what each
    column's error costs in GPTQ's loss, 1 / U_jj^2 (grid.search_params); otherwise min-max.
    loop: the column loop of one block, column_loop or a kernel with its signature (kernels.gptq_loop).
    factors: a dict the caller keeps for one H across calls (a measurement's candidate grids): U is kept there
    for the next call with the same visiting order and damping (one [in, in] matrix: the latest order's).
    H is read only until U is made. Given as a one-element list, it is handed over: gptq empties the list, so when
    the caller keeps no other reference (HessianAccumulator.take) H is freed before the column loop.
    dXXT [in, in] (GPTAQ, see the module docstring; `alpha` scales it): the loop is handed P1.
    NVFP4 grids: with W's global scale g (grid.py) the loop solves g · W (H unchanged), whose scales are E4M3 numbers
    (kept so, in units of 1 / g), and its Ŵ is divided by g, as LayerQuant.dequantize divides.
    """
    if isinstance(H, list):                           # handed over (a list, whatever the call keeps of its args)
        H = H.pop()
    if act_order and group_aware:
        raise ValueError("gptq: act_order and group_aware are two different column orders; pick one")
    if factors is not None and factors.setdefault("H", H) is not H:
        raise ValueError("gptq: these factors belong to another H")
    W, H = W.float(), H.float()                       # not modified (W is permuted into a copy below)
    out_f, in_f = W.shape
    if not (all_finite(W) and all_finite(H)):
        raise ValueError("gptq: W and H must be finite")
    g = nvfp4_global_scale(W) if grid.nvfp4 else 1.0
    if grid.nvfp4:
        W = W * g

    diag = torch.diag(H).clone()
    dead = diag == 0                                  # inputs that are always zero
    diag[dead] = 1.0                                  # H_jj := 1 (in Hp) and W[:, j] := 0 for them

    gs = grid.group_len(in_f)
    n_groups = grid.n_groups(in_f)
    dev = W.device
    scales = torch.zeros(out_f, n_groups, device=dev)
    zeros = torch.zeros(out_f, n_groups, device=dev)
    perm = column_order(diag, gs, act_order, group_aware)
    inv = torch.argsort(perm)
    W = W[:, perm]                                    # [out, in] copy, permuted
    W[:, dead[perm]] = 0.0                            # as the paper's code: no signal, no weight
    in_order_groups = static_groups or group_aware   # groups are column ranges, not runs of the visiting order
    group_of_pos = (perm // gs) if in_order_groups else (torch.arange(in_f, device=dev) // gs)  # [in], permuted order

    reordered = act_order or group_aware              # else perm is the identity
    key = None if factors is None else (damp, perm.cpu().numpy().tobytes() if reordered else None)  # no host copy
    if key is not None and key in factors:
        U, info = factors[key]
    else:                                             # [in, in] upper, U^T U = Hp^-1
        U, info = inverse_hessian_cholesky(H, damp, perm if reordered else None)
        if factors is not None:                       # the latest order's only: one [in, in] matrix kept
            for k in [k for k in factors if k != "H"]:
                del factors[k]
            factors[key] = (U, info)
    del H                                             # the caller's last reference, if it handed H over
    info = dict(info)
    P = None
    if dXXT is not None:                              # GPTAQ: P [in, in] in the visiting order, strictly upper
        D = dXXT.float()[perm][:, perm]
        D[:, dead[perm]] = 0.0
        P = alpha * torch.triu(D @ U.t(), diagonal=1) @ U
        del D
    cost = torch.diag(U) ** -2                        # [in] what a unit error of each column adds to the loss

    prefit = static_groups or grid.group_size == -1
    if prefit:                                        # grids of the original column ranges
        c0, W0 = cost[inv], W[:, inv]
        for k in range(n_groups):
            cols, c = W0[:, k * gs:(k + 1) * gs], c0[k * gs:(k + 1) * gs]
            scales[:, k], zeros[:, k] = search_params(cols, grid, c) if scale_search else fit_params(cols, grid)
        del W0
    # the loop's codes (integer-valued, or E4M3 values) and Ŵ as it computed them, each block written straight to its
    # original columns (no permuted copy to undo at the end: a W-sized matrix less at the solve's peak)
    codes = torch.zeros(out_f, in_f, dtype=grid.code_dtype, device=dev)
    Q = torch.zeros(out_f, in_f, device=dev)
    row_loss = torch.zeros(out_f, device=dev)                  # [out] sum (w - ŵ)^2 / 2 of each row, in GPTQ's loss
    group_list = group_of_pos.tolist()
    # blocks never split a group (B is a multiple of gs), so each group's grid is fitted on up-to-date weights
    B = max(gs, (block_size // gs) * gs) if gs < in_f else block_size
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        ks = group_list[i1:i2]                        # group of each column of the block
        S, Z = (scales[:, ks], zeros[:, ks]) if prefit else (None, None)
        U1 = U[i1:i2, i1:i2]
        C1, Q1, Err1, S, Z = loop(W[:, i1:i2], U1, grid, gs, S, Z, cost[i1:i2], scale_search,
                                  **({} if P is None else {"P1": P[i1:i2, i1:i2]}))
        if not prefit:
            for j in range(0, i2 - i1, gs):
                scales[:, ks[j]], zeros[:, ks[j]] = S[:, j], Z[:, j]
        cols = perm[i1:i2] if reordered else slice(i1, i2)   # the block's original columns
        codes[:, cols], Q[:, cols] = C1.to(codes.dtype), Q1
        row_loss += (Err1**2 * torch.diag(U1) ** 2).sum(dim=1) / 2
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)   # lazy batch update of the remaining columns, in place
        if P is not None:                             # GPTAQ: the block's columns (ŵ by now) · P
            W[:, i2:].addmm_(Q1, P[i1:i2, i2:])
    asymmetric = P is not None
    del W, U, P

    g_idx = group_of_pos[inv].to(torch.int32)         # group of each original column
    if grid.nvfp4:                                    # back from g · W (the scales stay in units of 1 / g)
        Q /= g
        row_loss /= g * g
    info.update(method="gptaq" if asymmetric else "gptq", loss=float(row_loss.sum()), dead_columns=int(dead.sum()))
    if info["fallback"] or info["retries"]:
        log.info("gptq: damping raised to %.3g after %d failed Cholesky tries%s", info["damp"], info["retries"],
                 ", eigendecomposition fallback" if info["fallback"] else "")
    return LayerQuant(grid, codes, scales, zeros, g_idx, info, w_hat=Q, row_loss=row_loss,
                      global_scale=torch.tensor([g]) if grid.nvfp4 else None)
