from .fp8_linear import Fp8Linear
from .quant_linear import QuantLinear, use_tuner
from .reference import dequantize_packed, matmul_reference
from .triton_matmul import KernelConfig
from .tuning import Tuner

__all__ = ["Fp8Linear", "KernelConfig", "QuantLinear", "Tuner", "dequantize_packed", "matmul_reference", "use_tuner"]
