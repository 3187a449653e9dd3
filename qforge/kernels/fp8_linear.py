"""Fp8Linear: a linear layer holding FP8 (E4M3) weights with one scale per output channel, or per block of rows and
columns, as compressed-tensors "float-quantized" stores them, or NVFP4's E2M1 codes, or MX's E2M1 or E4M3 codes in
groups with power-of-two scales (formats/compressed_tensors.py):

  weight        float8_e4m3fn [out, in]   the codes (E2M1 numbers for NVFP4 / MXFP4: each one an E4M3 number)
  weight_scale  [out, G]          in the dtype the checkpoint stored it in (casting it would change the model); G = 1
                                  per channel, else in / C for C-column blocks or groups (each row keeps its own)
  global_scale  float             NVFP4 only: g (an attribute, not a buffer: a cast to bf16 would round it)
  bias          [out] or None

W[o, i] = weight_scale[o, i // C] * weight[o, i] (NVFP4: / g). The forward pass is the PyTorch path on every device:
the weight dequantized to the input's dtype, then a dense matmul (kept after the first forward with `cache`, per
dtype and device, at the memory of a dense copy). A W8A8 FP8 model's input quantization is applied around it
(eval/simulate.py), as vLLM's FP8 GEMMs quantize their inputs; serving speed is vLLM's business, this module is for
evaluating and generating.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..solvers import Grid, LayerQuant, group_index


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, scale_dtype: torch.dtype = torch.float32,
                 cache: bool = False, grid: Grid = Grid(8, -1, True, fp8=True)):
        super().__init__()
        self.in_features, self.out_features, self.cache = in_features, out_features, cache
        self.grid = grid
        self._w_cache: torch.Tensor | None = None
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features, grid.n_groups(in_features), dtype=scale_dtype))
        self.global_scale: float | None = 1.0 if grid.nvfp4 else None
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_quant(cls, q: LayerQuant, bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float32,
                   cache: bool = False) -> "Fp8Linear":
        if not (q.grid.fp8 and (q.grid.group_size == -1 or q.grid.block_rows) or q.grid.fp4 or q.grid.mx):
            raise ValueError("Fp8Linear takes an FP8 layer per channel or in blocks, or an NVFP4 or MX layer")
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bias is not None, scale_dtype, cache, q.grid)
        m.weight.copy_(q.codes)
        m.weight_scale.copy_(q.scales)
        if q.grid.nvfp4:
            m.global_scale = float(q.global_scale)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def to_quant(self) -> LayerQuant:
        scales = self.weight_scale.float().contiguous()
        return LayerQuant(self.grid, self.weight.clone(), scales, torch.zeros_like(scales),
                          group_index(self.in_features, self.grid), info={},
                          global_scale=None if self.global_scale is None else torch.tensor([self.global_scale]))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in `dtype` (the product is exact in fp32: a 4-bit by <= 24-bit significand)."""
        scale = self.weight_scale.float().repeat_interleave(self.grid.group_len(self.in_features), 1)
        w = self.weight.float() * scale[:, :self.in_features]
        return (w if self.global_scale is None else w / self.global_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._w_cache
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantized(x.dtype)
            if self.cache:
                self._w_cache = w
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def clear_cache(self) -> None:
        self._w_cache = None

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` casts every floating buffer: the E4M3 codes come back to float8 (exactly: every E4M3 value is
        a bf16, fp16 and fp32 value); the scale takes the new dtype, as QuantLinear's scales do."""
        self._w_cache = None
        out = super()._apply(fn, recurse)
        if self.weight.dtype != torch.float8_e4m3fn:
            self.weight = self.weight.to(torch.float8_e4m3fn)
        return out

    def extra_repr(self) -> str:
        g = self.grid
        how = f"{g.block_rows}x{g.group_size} blocks" if g.block_rows else "per-channel" if g.group_size == -1 else \
            f"g{g.group_size}"
        kind = ("mxfp4" if g.fp4 else "mxfp8") if g.mx else "nvfp4" if g.fp4 else "fp8=e4m3"
        return f"in={self.in_features}, out={self.out_features}, {kind}, {how}"
