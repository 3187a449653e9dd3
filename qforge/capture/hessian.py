"""Running Hessian H = 2/n * sum_t x_t x_t^T of a linear's inputs, accumulated in fp32.

Batches of different sizes are merged with the exact running normalisation
H_{n+m} = H_n * n/(n+m) + 2/(n+m) * X_m^T X_m, so the result equals one pass over all n+m rows.
Only real tokens reach it: calibration batches are built from equal-length samples, never padded.
"""
from __future__ import annotations

import torch


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, in] (any float dtype)."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        self.H.addmm_(x.t(), x, alpha=2.0 / self.n)
