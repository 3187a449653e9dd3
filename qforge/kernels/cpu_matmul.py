"""Packed layers on the CPU through PyTorch's weight-only matmuls: 4-bit (aten._weight_int4pack_mm_for_cpu, the CPU
port of tinygemm) and per-channel 8-bit (aten._weight_int8pack_mm). The weight stays packed in memory and is
dequantized tile by tile inside the matmul, so a decode step reads an eighth (a quarter) of an fp32 layer's bytes
instead of unpacking it per call (the reference) or keeping a dense copy (QuantLinear's `cache`).

tinygemm's 4-bit layout (what `prepare` converts qforge's packed layer into, once per activation dtype):
  packed            uint8 [N, K / 2]      codes q in 0..15 of W [N = out, K = in], from
                                          aten._convert_weight_to_int4pack_for_cpu (its own nibble order)
  scales_and_zeros  [K / gs, N, 2]        (s, z_f) per tile group of gs inputs, in the activation dtype
  perm              int64 [K] or None     input columns in group order (act-order); x is permuted to match
and w = (q - 8) · s + z_f. qforge stores w = (q - z) · s, so z_f = (8 - z) · s.
tinygemm takes gs in {32, 64, 128, 256}, N a multiple of 16 and K a multiple of gs. Any qforge grouping whose
groups, taken in group order, are whole runs of gs inputs maps onto it by repeating each group's (s, z_f)
over its runs: groups of 128 as gs 128, per-channel over K = 576 as nine runs of 64, act-order after sorting
the columns by group, a short last group when gs divides it. `plan` says whether (and how) a layer fits.

The 8-bit matmul computes x @ (c · s)ᵀ for int8 codes c [N, K] and one scale per output, so it takes
per-channel layers (one group) only: c = q - 128, and an asymmetric zero adds the rank-one term
(Σₖ xₖ) · s · (128 - z). Layers that fit neither keep the reference path.

Only the bf16 versions are vectorised in PyTorch 2.13: fp32 activations run 3-14x slower than the dense fp32
matmul (fp16 worse) and never take this path (`worth_it`). In bf16 on 2 AVX-512 cores, a batch-1 layer of
Llama-3-8B's shapes runs 3.4-4.6x faster than the dense bf16 matmul in 4 bits (1.7-2.7x on SmolLM2's small
ones), 2.5-4.9x in 8 bits, about evenly at 8 rows, slower from 16 (BENCHMARKS.md "CPU int4 matmul"). On 2
AVX2-only cores, where torch emulates the dense bf16 matmul, the int4 one is faster than it at every batch (1-256
rows) and than the dense fp32 matmul up to 4-16 rows, so there it serves every bf16 input (`dense_bf16_native`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..formats.bitpack import unpack_codes_t, unpack_int32

TILE_GROUPS = (256, 128, 64, 32)   # tinygemm's group sizes, largest first (fewest scale rows)
N_MULTIPLE = 16
MAX_ROWS_OVER_DENSE = 8            # above this many rows a dense copy of the weight, where kept, is faster (where
#                                    the CPU multiplies bf16 natively: dense_bf16_native)
# weights converted to the int4 layout at a time: the conversion takes int32 codes (4 bytes a weight: 0.94 GB for
# a 70B MLP layer at once, 128 MB in pieces of 2^25 weights). A piece is a multiple of 64 rows, the packed
# layout's row blocks, so the pieces concatenate to the whole conversion bit for bit (tests/test_cpu_kernel.py)
WEIGHTS_PER_CONVERSION = 1 << 25


def available(bits: int) -> bool:
    """Whether this PyTorch build has the CPU matmul for `bits` (4: 2.6 and later)."""
    op = {4: "_weight_int4pack_mm_for_cpu", 8: "_weight_int8pack_mm"}.get(bits)
    return op is not None and hasattr(torch.ops.aten, op)


@functools.cache
def dense_bf16_native() -> bool:
    """Whether this CPU multiplies dense bf16 matrices natively (AVX512-BF16 or AMX). Without, torch emulates them:
    on an AVX2-only EPYC the int4 matmul beat the dense bf16 one at every batch measured, 1-256 rows (3.4-4.3x from
    4 rows on Llama-3-8B's shapes; BENCHMARKS.md "CPU int4 matmul", session 39)."""
    from ..utils.device import native_compute_dtype

    return native_compute_dtype("cpu") == "bfloat16"


def worth_it(x: torch.Tensor, dense_kept: bool) -> bool:
    """Whether a weight-only matmul is the fastest CPU path for input x [..., K]: bf16 only, and at most
    MAX_ROWS_OVER_DENSE rows when a dense copy of the weight is (or may be) kept and this CPU multiplies it natively;
    without one the alternative is the reference, which unpacks the whole weight per call. Never for an x that needs
    a gradient (the ops have no backward)."""
    rows = x.numel() // max(1, x.shape[-1])
    return x.dtype == torch.bfloat16 and not x.requires_grad and (
        not dense_kept or rows <= MAX_ROWS_OVER_DENSE or not dense_bf16_native())


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor            # uint8 [N, K / 2]
    scales_and_zeros: torch.Tensor  # [K / gs, N, 2] (s, z_f) in the activation dtype
    group_size: int                 # gs
    perm: torch.Tensor | None       # int64 [K]: x[..., perm] lines the inputs up with `packed`; None: in order

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype


@dataclass(frozen=True)
class Int8Weight:
    codes: torch.Tensor             # int8 [N, K]: q - 128
    scales: torch.Tensor            # [N] in the activation dtype
    offset: torch.Tensor | None     # fp32 [N]: s · (128 - z), None when every z is 128 (symmetric)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype


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


def prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
            dtype: torch.dtype) -> Int4Weight | Int8Weight | None:
    """The CPU matmul's form of a layer in qforge's packed layout (kernels/reference.py), for activations of
    `dtype`; None when it does not fit (4 bits: see `plan`; 8 bits: per-channel only; other widths: none)."""
    if bits == 8:
        return _prepare_int8(qweight, qzeros, scales, g_idx, dtype)
    if bits != 4:
        return None
    out_features = qweight.shape[1]
    fit = plan(g_idx, out_features)
    if fit is None:
        return None
    gs, perm, tile_group = fit
    rows = max(64, WEIGHTS_PER_CONVERSION // (qweight.shape[0] * 8) // 64 * 64)
    packed = torch.cat([_int4pack_rows(qweight[:, a:a + rows], perm)
                        for a in range(0, out_features, rows)])                 # uint8 [N, K / 2]
    s = scales.float()[tile_group]                                      # [K / gs, N]
    z = unpack_int32(qzeros, 4, dim=1)[tile_group].float()              # [K / gs, N]
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(dtype).contiguous()
    return Int4Weight(packed, scales_and_zeros, gs, perm)


def _int4pack_rows(qweight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    codes = unpack_codes_t(qweight, 4)                                  # uint8 [rows, K]
    if perm is not None:
        codes = codes[:, perm]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def _prepare_int8(qweight, qzeros, scales, g_idx, dtype) -> Int8Weight | None:
    if scales.shape[0] != 1 or bool(g_idx.any()):                     # one group: per-channel
        return None
    codes = (unpack_codes_t(qweight, 8).to(torch.int16) - 128).to(torch.int8)   # [N, K]
    s = scales[0].float()
    z = unpack_int32(qzeros, 8, dim=1)[0].float()                       # [N]
    offset = None if bool((z == 128).all()) else s * (128 - z)
    return Int8Weight(codes, s.to(dtype), offset)


def matmul(x: torch.Tensor, w: Int4Weight | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ Wᵀ (+ bias) -> [..., N] in x's dtype (which must be the dtype `w` was prepared for)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(w, Int8Weight):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w.codes, w.scales)
        if w.offset is not None:                                       # asymmetric: Σₖ xₖ · s · (128 - z)
            y = (y.float() + x2.float().sum(-1, keepdim=True) * w.offset).to(x.dtype)
    else:
        if w.perm is not None:
            x2 = x2[:, w.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group_size,
                                                       w.scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])
