"""4-bit packed layers on the CPU through PyTorch's weight-only int4 matmul (aten._weight_int4pack_mm_for_cpu,
the CPU port of tinygemm): the weight stays 4-bit in memory and is dequantized tile by tile inside the matmul,
so a decode step reads an eighth of an fp32 layer's bytes instead of unpacking it per call (the reference)
or keeping a dense copy (QuantLinear's `cache`).

tinygemm's layout (what `prepare` converts qforge's packed layer into, once per activation dtype):
  packed            uint8 [N, K / 2]      codes q in 0..15 of W [N = out, K = in], from
                                          aten._convert_weight_to_int4pack_for_cpu (its own nibble order)
  scales_and_zeros  [K / gs, N, 2]        (s, z_f) per tile group of gs inputs, in the activation dtype
  perm              int64 [K] or None     input columns in group order (act-order); x is permuted to match
and w = (q - 8) · s + z_f. qforge stores w = (q - z) · s, so z_f = (8 - z) · s.

tinygemm takes gs in {32, 64, 128, 256}, N a multiple of 16 and K a multiple of gs. Any qforge grouping whose
groups, taken in group order, are whole runs of gs inputs maps onto it by repeating each group's (s, z_f)
over its runs: groups of 128 as gs 128, per-channel over K = 576 as nine runs of 64, act-order after sorting
the columns by group, a short last group when gs divides it. `plan` says whether (and how) a layer fits;
layers that do not keep the reference path.

Only the bf16 version is vectorised in PyTorch 2.13: fp32 activations run 3-14x slower than the dense fp32
matmul (fp16 worse) and never take this path (`worth_it`). In bf16 on 2 AVX-512 cores, a batch-1 layer of
Llama-3-8B's shapes runs 3.4-4.1x faster than the dense bf16 matmul (1.7-2x on SmolLM2's small ones), about
evenly at 8 rows, 1.3-2.5x slower from 16 (BENCHMARKS.md "CPU int4 matmul").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.bitpack import unpack_codes_t, unpack_int32

TILE_GROUPS = (256, 128, 64, 32)   # tinygemm's group sizes, largest first (fewest scale rows)
N_MULTIPLE = 16
MAX_ROWS_OVER_DENSE = 8            # above this many rows a dense copy of the weight, where kept, is faster


def available() -> bool:
    """Whether this PyTorch build has the CPU int4 matmul (2.6 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def worth_it(x: torch.Tensor, dense_kept: bool) -> bool:
    """Whether the int4 matmul is the fastest CPU path for input x [..., K]: bf16 only, and at most
    MAX_ROWS_OVER_DENSE rows when a dense copy of the weight is (or may be) kept; without one the alternative is
    the reference, which unpacks the whole weight per call."""
    rows = x.numel() // max(1, x.shape[-1])
    return x.dtype == torch.bfloat16 and (not dense_kept or rows <= MAX_ROWS_OVER_DENSE)


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor            # uint8 [N, K / 2]
    scales_and_zeros: torch.Tensor  # [K / gs, N, 2] (s, z_f) in the activation dtype
    group_size: int                 # gs
    perm: torch.Tensor | None       # int64 [K]: x[..., perm] lines the inputs up with `packed`; None: in order

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype


def plan(g_idx: torch.Tensor, out_features: int) -> tuple[int, torch.Tensor | None, torch.Tensor] | None:
    """(gs, perm, tile_group) when a layer with this g_idx [K] fits tinygemm, else None: perm sorts the inputs
    by group (None when they already are), tile_group [K / gs] is the qforge group of each run of gs inputs."""
    if out_features % N_MULTIPLE:
        return None
    g = g_idx.long()
    order = torch.argsort(g, stable=True)
    sorted_g = g[order]
    for gs in TILE_GROUPS:
        if g.numel() % gs:
            continue
        runs = sorted_g.view(-1, gs)                                  # [K / gs, gs]
        if bool((runs == runs[:, :1]).all()):                          # every run inside one group
            in_order = bool((order == torch.arange(g.numel())).all())
            return gs, None if in_order else order, runs[:, 0].clone()
    return None


def prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
            dtype: torch.dtype) -> Int4Weight | None:
    """tinygemm's form of a 4-bit layer in qforge's packed layout (kernels/reference.py), for activations of
    `dtype`; None when it does not fit (see `plan`)."""
    out_features = qweight.shape[1]
    fit = plan(g_idx, out_features)
    if fit is None:
        return None
    gs, perm, tile_group = fit
    codes = unpack_codes_t(qweight, 4)                                  # uint8 [N, K]
    if perm is not None:
        codes = codes[:, perm]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    s = scales.float()[tile_group]                                      # [K / gs, N]
    z = unpack_int32(qzeros, 4, dim=1)[tile_group].float()              # [K / gs, N]
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(dtype).contiguous()
    return Int4Weight(packed, scales_and_zeros, gs, perm)


def int4_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ Wᵀ (+ bias) -> [..., N] in x's dtype (which must be the dtype `w` was prepared for)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w.perm is not None:
        x2 = x2[:, w.perm]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group_size, w.scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])
