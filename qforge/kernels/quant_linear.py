"""QuantLinear: a linear layer that keeps its weight packed (kernels/reference.py's layout) and
dequantizes on the fly. On CUDA with 4- or 8-bit weights it runs the Triton kernel
(kernels/triton_matmul.py), with the heuristic's schedule or, once `use_tuner` gave it a Tuner, the
fastest one measured for its shape. On a CPU, bf16 inputs to 4-bit layers whose groups fit tinygemm's (nearly
all) and to per-channel 8-bit layers run PyTorch's weight-only matmuls (kernels/cpu_matmul.py) on a copy of the
weight in their layout made on first use (with `cache`, only up to 8 rows: decoding; prefill uses the dense
copy, unless the CPU only emulates bf16 GEMMs: cpu_matmul.worth_it); everything else, and `cpu_kernel=False`, the
PyTorch reference. Another CUDA kernel plugs in through `QuantLinear.kernel`.

Scales keep the dtype the checkpoint stored them in (fp16 for gptq/awq, often fp32 or bf16 for
compressed-tensors): casting them would change the model. With `cache=True` the reference path keeps
the dequantized weight after the first forward (per dtype and device; dropped by `.to()` and
`clear_cache()`) for the inputs the CPU weight-only matmuls do not take: decoding on a CPU then costs a dense matmul
instead of an unpack per token, at the memory of a dense copy of the layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.bitpack import pack_int32, unpack_codes_t, unpack_int32
from ..solvers import Grid, LayerQuant
from . import cpu_matmul, triton_matmul
from .tuning import Tuner
from .reference import dequantize_packed, matmul_reference


class QuantLinear(nn.Module):
    kernel = None  # optional callable(x, module) -> y for CUDA tensors; None: the reference path

    def __init__(self, in_features: int, out_features: int, grid: Grid, n_groups: int, bias: bool,
                 scale_dtype: torch.dtype = torch.float16, cache: bool = False, cpu_kernel: bool = True):
        super().__init__()
        self.cache, self.cpu_kernel = cache, cpu_kernel
        self._w_cache: torch.Tensor | None = None
        self._cpu_weight: cpu_matmul.Int4Weight | cpu_matmul.Int8Weight | bool | None = None   # False: no fit
        self._group_size: int | None = None         # the kernel's in-order group size, found on first use
        self.tuner: Tuner | None = None   # picks the Triton kernel's schedule (None: plan's)
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        b = grid.bits
        self.register_buffer("qweight", torch.zeros(in_features * b // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * b // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=scale_dtype))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_quant(cls, q: LayerQuant, bias: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16,
                   cache: bool = False, cpu_kernel: bool = True) -> "QuantLinear":
        out_f, in_f = q.shape
        m = cls(in_f, out_f, q.grid, q.scales.shape[1], bias is not None, scale_dtype, cache, cpu_kernel)
        m.qweight.copy_(pack_int32(q.codes.t(), q.grid.bits, dim=0))
        m.qzeros.copy_(pack_int32(q.zeros.t().round().to(torch.int64), q.grid.bits, dim=1))
        m.scales.copy_(q.scales.t())
        m.g_idx.copy_(q.g_idx)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def to_quant(self) -> LayerQuant:
        b = self.grid.bits
        return LayerQuant(self.grid, unpack_codes_t(self.qweight, b),
                          self.scales.float().t().contiguous(),
                          unpack_int32(self.qzeros, b, dim=1).t().float().contiguous(), self.g_idx.clone(), info={})

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (fp32), for inspection; forward never materialises it."""
        return self.to_quant().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.kernel is not None:
            return self.kernel(x, self)
        if x.is_cuda and triton_matmul.available() and self.grid.bits in triton_matmul.KERNEL_BITS:
            if self._group_size is None:
                self._group_size = triton_matmul.in_order_group_size(self.g_idx, self.in_features)
            args = (x, self.qweight, self.qzeros, self.scales, self.g_idx, self.grid.bits, self._group_size, self.bias)
            config = self.tuner.config(*args) if self.tuner is not None else None
            return triton_matmul.triton_matmul(*args, config=config)
        if x.device.type == "cpu" and self.cpu_kernel and cpu_matmul.worth_it(x, self.cache):
            w = self._cpu_matmul_weight(x.dtype)
            if w is not None:
                return cpu_matmul.matmul(x, w, self.bias)
        if not self.cache:
            return matmul_reference(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.grid.bits, self.bias)
        # W [out, in] as nn.Linear holds it: stored [in, out], torch's emulated bf16 GEMM (AVX2-only CPUs) was 6x slower
        w = self._w_cache
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self._w_cache = dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.grid.bits,
                                                  x.dtype).t().contiguous()
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def _cpu_matmul_weight(self, dtype: torch.dtype) -> cpu_matmul.Int4Weight | cpu_matmul.Int8Weight | None:
        """The CPU matmul's copy of the weight for `dtype` activations (made once), None if the layer does not fit."""
        w = self._cpu_weight
        if w is None or (w is not False and w.dtype != dtype):
            b = self.grid.bits
            w = cpu_matmul.prepare(self.qweight, self.qzeros, self.scales, self.g_idx, b, dtype) \
                if cpu_matmul.available(b) else None
            self._cpu_weight = False if w is None else w
        return w or None

    def clear_cache(self) -> None:
        self._w_cache = self._cpu_weight = None

    def _apply(self, fn, recurse=True):
        self._w_cache = self._group_size = self._cpu_weight = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._w_cache = self._group_size = self._cpu_weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.grid.bits}, "
                f"group={self.grid.group_size}, sym={self.grid.sym}")


def use_tuner(model: nn.Module, tuner: Tuner | None) -> int:
    """Give every QuantLinear of `model` this Tuner (one shared: a shape is timed once); None restores the
    heuristic. Returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.tuner = tuner
    return len(layers)
