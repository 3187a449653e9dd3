"""Pure tensor solvers: weights (and statistics) in, integer codes and grid parameters out."""
from .grid import Grid, InputScheme, LayerQuant, dequantize, fit_params, group_index, quantize
from .rtn import rtn

__all__ = ["Grid", "InputScheme", "LayerQuant", "dequantize", "fit_params", "group_index", "quantize", "rtn"]
from .gptq import gptq  # noqa: E402
from .inverse_hessian import inverse_hessian_cholesky  # noqa: E402

__all__ += ["gptq", "inverse_hessian_cholesky"]
