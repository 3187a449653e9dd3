from .quant_linear import QuantLinear, use_tuner
from .reference import dequantize_packed, matmul_reference
from .triton_matmul import KernelConfig
from .tuning import Tuner

__all__ = ["KernelConfig", "QuantLinear", "Tuner", "dequantize_packed", "matmul_reference", "use_tuner"]
