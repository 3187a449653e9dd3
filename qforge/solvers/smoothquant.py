"""SmoothQuant's migration scales (Xiao et al., arXiv 2211.10438), a pure function.

For a linear Y = X Wᵀ with activation outliers in a few input channels, Y = (X diag(s)⁻¹)(W diag(s))ᵀ
moves part of each channel's range from X into W:
    s_j = max|X_j|^α / max|W_j|^(1−α)
(α = 0.5 balances the two; larger α pushes more into the weights). The activation maxima come from
calibration data; W_j is input column j of every linear that reads X.
"""
from __future__ import annotations

import torch


def smoothquant_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """x_absmax [in] (max |x_j| over calibration tokens), w_absmax [in] (max |W_ij| over rows) -> s [in] (fp32)."""
    x = x_absmax.float().clamp_min(eps)
    w = w_absmax.float().clamp_min(eps)
    s = x.pow(alpha) / w.pow(1 - alpha)
    return s.clamp_min(eps)
