"""Plain PyTorch dequantize-and-matmul on qforge's canonical packed layout (the reference every kernel is
tested against, and the CPU path).

Canonical layout (GPTQ's, with exact zero points):
  qweight int32 [in * b / 32, out]   codes packed along the input (formats/bitpack.py)
  qzeros  int32 [G, out * b / 32]    zero points packed along the output, stored as is
  scales  [G, out]                   fp16
  g_idx   int32 [in]
"""
from __future__ import annotations

import torch

from ..formats.bitpack import unpack_int32


def dequantize_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W^T [in, out] in `dtype`."""
    q = unpack_int32(qweight, bits, dim=0)                   # [in, out]
    z = unpack_int32(qzeros, bits, dim=1)                    # [G, out]
    g = g_idx.long()
    return (scales.to(dtype)[g] * (q - z[g]).to(dtype))


def matmul_reference(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantized W^T [in, out] (+ bias) in x's dtype."""
    y = x @ dequantize_packed(qweight, qzeros, scales, g_idx, bits, x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y
