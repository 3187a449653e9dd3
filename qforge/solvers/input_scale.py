"""Static input scales (QuantizeConfig.act_static): one scale s for every token a linear reads, fixed in advance.

    x̂ = clamp(round(x / s), -128, 127) · s        (int8)      or      x̂ = fp8(x / s) · s        (E4M3, saturating)

NVFP4 inputs (`fp4`) keep the per-tensor global scale g = 448 · 6 / max|x| instead (compressed-tensors'
input_global_scale, computed in its order so that it is the library's to the bit); each token's groups then take
their own E4M3 scales in its units as the layer runs (eval/simulate.fake_quant_nvfp4).

"max": s = max|x| / qmax over the calibration inputs (qmax 127 or 448), nothing clipped. "mse": s = r · max|x| / qmax
with the ratio r of RATIOS that minimizes Σ (x̂ - x)² over the same inputs: clipping the rare largest inputs buys a
finer step for all others (a per-tensor int8 step set by one outlier token zeroes most small inputs).
"""
from __future__ import annotations

import torch

from .grid import E2M1_MAX, FP8_MAX, to_e4m3

RATIOS = tuple(round(1.0 - 0.05 * k, 2) for k in range(19))       # 1.0, 0.95, ..., 0.1


def qmax(fp8: bool) -> float:
    return FP8_MAX if fp8 else 127.0


def nvfp4_input_scale(absmax: torch.Tensor) -> torch.Tensor:
    """NVFP4 inputs' global scale g = 448 · 6 / max|x| [1] fp32 (the module docstring)."""
    return (FP8_MAX * E2M1_MAX / absmax.float()).reshape(1)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """x [..., channels] quantized with its fixed `scale` [1] and dequantized: int8 (symmetric, codes -128..127) or
    E4M3; values beyond the scale's range saturate."""
    s = scale.to(x.device)
    xf = x.float() / s
    q = to_e4m3(xf).float() if fp8 else torch.clamp(torch.round(xf), -128, 127)
    return (q * s).to(x.dtype)


def clip_errors(x: torch.Tensor, absmax: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """[len(RATIOS)] fp32: Σ (x̂ - x)² of x [tokens, in] under each candidate scale r · absmax / qmax (absmax: the
    largest |x| of all the inputs the scale will serve, of which x is a part)."""
    xf = x.float()
    return torch.stack([(fake_quant_static(xf, absmax * r / qmax(fp8), fp8) - xf).pow(2).sum() for r in RATIOS])
