"""QuantLinear: a linear layer that keeps its weight packed (kernels/reference.py's layout) and
dequantizes on the fly. On CPU (and wherever no faster kernel is registered) it runs the PyTorch
reference; a GPU kernel plugs in through `QuantLinear.kernel`."""
from __future__ import annotations

import torch
from torch import nn

from ..formats.bitpack import pack_int32
from ..solvers import Grid, LayerQuant
from ..formats.bitpack import unpack_int32
from .reference import matmul_reference


class QuantLinear(nn.Module):
    kernel = None  # optional callable(x, module) -> y for CUDA tensors; None: the reference path

    def __init__(self, in_features: int, out_features: int, grid: Grid, n_groups: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        b = grid.bits
        self.register_buffer("qweight", torch.zeros(in_features * b // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * b // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_quant(cls, q: LayerQuant, bias: torch.Tensor | None = None) -> "QuantLinear":
        out_f, in_f = q.shape
        m = cls(in_f, out_f, q.grid, q.scales.shape[1], bias is not None)
        m.qweight.copy_(pack_int32(q.codes.t(), q.grid.bits, dim=0))
        m.qzeros.copy_(pack_int32(q.zeros.t().round().to(torch.int64), q.grid.bits, dim=1))
        m.scales.copy_(q.scales.t())
        m.g_idx.copy_(q.g_idx)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def to_quant(self) -> LayerQuant:
        b = self.grid.bits
        return LayerQuant(self.grid, unpack_int32(self.qweight, b, dim=0).t().to(torch.uint8).contiguous(),
                          self.scales.float().t().contiguous(),
                          unpack_int32(self.qzeros, b, dim=1).t().float().contiguous(), self.g_idx.clone(), info={})

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (fp32), for inspection; forward never materialises it."""
        return self.to_quant().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.is_cuda:
            return self.kernel(x, self)
        return matmul_reference(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.grid.bits, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.grid.bits}, "
                f"group={self.grid.group_size}, sym={self.grid.sym}")
