"""AutoAWQ's GEMM checkpoint format ("awq", version "gemm"; read by transformers, vLLM, SGLang), 4-bit only.

Per quantized linear NAME with W [out, in] and G groups along the input (in order, no act-order):
  qweight  int32 [in, out / 8]   codes packed along the OUTPUT dimension, eight per word, interleaved:
                                 bit slot k (bits 4k..4k+3) of word c holds output column
                                 8c + ORDER[k], ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  qzeros   int32 [G, out / 8]    zero points, packed and interleaved the same way, stored as is
  scales   fp16  [G, out]
  bias     fp16  [out]           (when the linear has one)
Dequantization: W[o, i] = scales[i // group, o] * (q[i, o] - zero[i // group, o]).
"""
from __future__ import annotations

import torch

from ..errors import QForgeError
from ..solvers import Grid, LayerQuant
from ..utils.tensors import row_slices
from .bitpack import pack_int32, unpack_int32

NAME = "awq"
KEYS = ("qweight", "qzeros", "scales")
BITS = (4,)
MIXED = False                # one scheme for every layer
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _perm(n: int) -> torch.Tensor:
    """Column order that puts column 8c + ORDER[k] into slot k of word c."""
    return (torch.arange(n).view(-1, 8)[:, list(ORDER)]).reshape(-1)


def check(name: str, shape: tuple[int, int], grid: Grid | None, in_order: bool) -> None:
    """Refuse what this format cannot store (`grid` None: the shape alone, before a scheme is chosen)."""
    out_f, in_f = shape
    if in_f % 32 or out_f % 32:
        raise QForgeError(f"{name}: {out_f}x{in_f} cannot be packed in the awq format (both dimensions must be "
                          f"multiples of 32)")
    if grid is None:
        return
    if grid.bits not in BITS:
        raise QForgeError(f"{name}: the AWQ GEMM format stores 4-bit weights only (this layer has {grid.bits})")
    if not in_order or grid.ragged(in_f):
        raise QForgeError(f"{name}: the AWQ format needs in-order, whole groups (no act-order, group size "
                          f"dividing {in_f}); export as 'gptq' instead")


def pack(q: LayerQuant) -> dict[str, torch.Tensor]:
    p = _perm(q.shape[0])
    return {
        "qweight": pack_int32(q.codes.t()[:, p], 4, dim=1),                          # [in, out/8]
        "qzeros": pack_int32(q.zeros.t().round().to(torch.int64)[:, p], 4, dim=1),   # [G, out/8]
        "scales": q.scales.t().contiguous().to(torch.float16),                       # [G, out]
    }


def unpack(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    in_f, out_f = t["qweight"].shape[0], t["qweight"].shape[1] * 8
    inv = torch.argsort(_perm(out_f))
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)                         # [out, in]
    for r in row_slices(in_f, out_f):                  # ~1M codes at a time: cache-sized, ~2x faster than whole
        codes[:, r] = unpack_int32(t["qweight"][r], 4, dim=1, dtype=torch.uint8)[:, inv].t()
    zeros = unpack_int32(t["qzeros"], 4, dim=1)[:, inv].t()                   # [out, G]
    g_idx = torch.arange(codes.shape[1], dtype=torch.int32) // grid.group_len(codes.shape[1])
    return LayerQuant(grid, codes, t["scales"].float().t().contiguous(),
                      zeros.float().contiguous(), g_idx, info={})


def quantization_config(grid: Grid, act_order: bool, static_groups: bool, extra: dict) -> dict:
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": grid.group_size,
            "zero_point": True, **extra}


def grid_of(qc: dict) -> Grid:
    return Grid(int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128))),
                sym=False)
