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
    """W^T [in, out] in `dtype`: scales[g] * (q - z[g]), a few input rows at a time (whole runs of `bits`
    words), so the int64 codes and gathered zeros never exist for the whole matrix (6 GB of temporaries for a
    28672 x 8192 layer at once)."""
    z = unpack_int32(qzeros, bits, dim=1)                    # [G, out]
    s = scales.to(dtype)
    g = g_idx.long()
    W = torch.empty(qweight.shape[0] * 32 // bits, qweight.shape[1], dtype=dtype, device=qweight.device)
    words = max(bits, (1 << 20) // max(1, 32 * qweight.shape[1] // bits) * bits)   # 1M values: heap-sized
    for w0 in range(0, qweight.shape[0], words):
        q = unpack_int32(qweight[w0:w0 + words], bits, dim=0)                     # [rows, out]
        rows = slice(w0 * 32 // bits, w0 * 32 // bits + q.shape[0])
        torch.mul(s[g[rows]], (q - z[g[rows]]).to(dtype), out=W[rows])
    return W


def matmul_reference(x: torch.Tensor, qweight, qzeros, scales, g_idx, bits: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantized W^T [in, out] (+ bias) in x's dtype."""
    y = x @ dequantize_packed(qweight, qzeros, scales, g_idx, bits, x.dtype)
    return y + bias.to(x.dtype) if bias is not None else y
