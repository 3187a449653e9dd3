"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel "gptq", read by transformers, vLLM, SGLang).

Per quantized linear NAME with W [out, in], b bits, G groups (tensors are named NAME.<key>):
  qweight  int32 [in * b / 32, out]   codes packed along the input dimension: every 32 consecutive input
                                      rows form a little-endian bit stream of b words (formats/bitpack.py;
                                      3 bits straddle words as 10 | 1 | 10 | 1 | 10)
  qzeros   int32 [G, out * b / 32]    zero points packed the same way along the output dimension, in the
                                      "v1" convention: each field stores zero - 1. For 2, 4 and 8 bits
                                      that is the packed words minus the packed pattern of ones (int32
                                      wrap-around, which GPTQModel undoes by adding the pattern back); 3-bit
                                      fields straddle words, so there it is (zero - 1) mod 8 per field
                                      (GPTQModel decodes, adds 1 and repacks them)
  scales   fp16  [G, out]
  g_idx    int32 [in]                 group of each input column (act-order permutes it)
  bias     fp16  [out]                (when the linear has one)
Dequantization: W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).
A zero point of 0 (asymmetric grids only) borrows from its neighbour in v1: GPTQModel undoes the
subtraction exactly, but readers that add 1 per field (vLLM's exllama path) misread it, so the exporter
warns. Both in and out must be multiples of 32.
"""
from __future__ import annotations

import torch

from ..errors import QForgeError
from ..solvers import Grid, LayerQuant
from .bitpack import pack_int32, unpack_codes_t, unpack_int32

NAME = "gptq"
KEYS = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)          # what GPTQModel's and vLLM's gptq readers accept
MIXED = True                 # per-layer schemes: quantization_config["dynamic"] overrides (export.py; a rule
                             # names the module and, where vLLM fuses it, the fused module: models/fused.py)


def check(name: str, shape: tuple[int, int], grid: Grid | None, in_order: bool) -> None:
    """Refuse what this format cannot store (`grid` None: the shape alone, before a scheme is chosen).
    Any column order is stored (g_idx), ragged last groups included."""
    out_f, in_f = shape
    if in_f % 32 or out_f % 32:
        raise QForgeError(f"{name}: {out_f}x{in_f} cannot be packed in the gptq format (both dimensions must be "
                          f"multiples of 32)")
    if grid is not None and grid.fp8:
        raise QForgeError(f"{name}: the gptq format stores integer codes; export FP8 weights as 'compressed-tensors'")
    if grid is not None and grid.bits not in BITS:
        widths = f"{', '.join(map(str, BITS[:-1]))} or {BITS[-1]}"
        raise QForgeError(f"{name}: the gptq format stores {widths}-bit weights, which its "
                          f"readers accept (this layer has {grid.bits}); export as 'compressed-tensors' instead")


def _ones(shape: tuple[int, ...], bits: int) -> torch.Tensor:
    return pack_int32(torch.ones(shape, dtype=torch.int64), bits, dim=1).to(torch.int64)


def _wrap(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFFFFFF
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def pack(q: LayerQuant) -> dict[str, torch.Tensor]:
    bits = q.grid.bits
    zeros = q.zeros.t().round().to(torch.int64)                        # [G, out]
    if bits == 3:
        qzeros = pack_int32((zeros - 1) & 7, bits, dim=1).to(torch.int64)
    else:
        qzeros = pack_int32(zeros, bits, dim=1).to(torch.int64) - _ones(tuple(zeros.shape), bits)
    return {
        "qweight": pack_int32(q.codes.t(), bits, dim=0),               # [in*b/32, out]
        "qzeros": _wrap(qzeros),                                       # [G, out*b/32]
        "scales": q.scales.t().contiguous().to(torch.float16),         # [G, out]
        "g_idx": q.g_idx.to(torch.int32).contiguous(),                 # [in]
    }


def unpack(t: dict[str, torch.Tensor], grid: Grid, v1: bool = True) -> LayerQuant:
    """v1=False reads GPTQModel's "gptq_v2" checkpoints (zero points stored as they are)."""
    bits = grid.bits
    codes = unpack_codes_t(t["qweight"], bits)                          # [out, in] uint8
    G = t["scales"].shape[0]
    if v1 and bits == 3:
        zeros = ((unpack_int32(t["qzeros"], bits, dim=1).to(torch.int64) + 1) & 7).t()      # [out, G]
    else:
        words = t["qzeros"].to(torch.int64) + (_ones((G, codes.shape[0]), bits) if v1 else 0)
        zeros = unpack_int32(_wrap(words), bits, dim=1).t()            # [out, G]
    g_idx = t.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(codes.shape[1], dtype=torch.int32) // grid.group_len(codes.shape[1])
    return LayerQuant(grid, codes, t["scales"].float().t().contiguous(),
                      zeros.float().contiguous(), g_idx.to(torch.int32), info={})


def quantization_config(grid: Grid, act_order: bool, static_groups: bool, extra: dict) -> dict:
    """config.json's quantization_config (and quantize_config.json) as GPTQModel writes it; `act_order`: some
    layer's g_idx is out of column order (desc_act)."""
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": grid.bits,
            "group_size": grid.group_size, "desc_act": act_order, "static_groups": static_groups,
            "sym": grid.sym, "lm_head": False, "pack_dtype": "int32", "true_sequential": True, **extra}


def grid_of(qc: dict) -> Grid:
    return Grid(int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True)))
