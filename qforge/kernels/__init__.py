from .quant_linear import QuantLinear
from .reference import dequantize_packed, matmul_reference

__all__ = ["QuantLinear", "dequantize_packed", "matmul_reference"]
