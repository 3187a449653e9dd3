"""Running Hessian H = 2/n * sum_t x_t x_t^T of a linear's inputs, accumulated in fp32.

Batches of different sizes are merged with the exact running normalisation
H_{n+m} = H_n * n/(n+m) + 2/(n+m) * X_m^T X_m, so the result equals one pass over all n+m rows.
Only real tokens reach it: calibration batches are built from equal-length samples, never padded.

H is symmetric, so only its upper triangle is accumulated, one panel of rows at a time (rows [a, a+P)
against columns [a, in)): about 40% less work than the full product, which for the MLP's wide
down-projection input is a large part of GPTQ's time on a CPU. `H` mirrors it in place on demand.

`product_dtype` bfloat16 (compute_dtype bf16): each batch's panel products run as bf16 GEMMs (exact
products, fp32 sums inside the GEMM, the panel rounded to bf16 once on output, relative 2^-9) and are
accumulated into the fp32 H; 3.5x faster on CPUs with AVX512-BF16. The rounding can leave H indefinite
where inputs are nearly dependent (QuantizeConfig.hessian_dtype float32 keeps fp32 products instead).
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import QForgeError

PANEL = 192   # rows per panel: large enough for efficient GEMMs, small enough to skip most of the lower half


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str = "cpu", product_dtype: torch.dtype = torch.float32):
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.product_dtype = product_dtype
        self._full: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, in] (any float dtype)."""
        if self._full is not None or self._upper is None:
            raise RuntimeError("HessianAccumulator: H was read (built in place) or handed over; no input can be "
                               "added after")
        x = x.reshape(-1, x.shape[-1]).to(self._upper.device, self.product_dtype)
        m = x.shape[0]
        if m == 0:
            return
        self._upper.mul_(self.n / (self.n + m))
        self.n += m
        xt = x.t()
        for a in range(0, x.shape[1], PANEL):
            if self.product_dtype == torch.float32:
                self._upper[a:a + PANEL, a:].addmm_(xt[a:a + PANEL], x[:, a:], alpha=2.0 / self.n)
            else:
                self._upper[a:a + PANEL, a:].add_(torch.mm(xt[a:a + PANEL], x[:, a:]), alpha=2.0 / self.n)
        self._full = None

    @property
    def H(self) -> torch.Tensor:
        """[in, in], exactly symmetric: the upper triangle mirrored in place, a panel at a time (no second
        [in, in] matrix: 3.3 GB for a 28672-wide input, four with the triangles' temporaries), so no input can
        be added once it is read. Equal to triu(U) + triu(U, 1)^T, zeros' signs included."""
        if self._full is None:
            U, n = self._upper, self._upper.shape[0]
            for a in range(0, n, PANEL):
                b = min(a + PANEL, n)
                blk = U[a:b, a:b]                     # the panel's diagonal block holds both triangles
                blk.copy_(torch.triu(blk) + torch.triu(blk, diagonal=1).t())
                U[b:, a:b] = U[a:b, b:].t()           # below it: the mirror of the upper part
            self._full = U.add_(0.0)                  # -0.0 + 0.0 = +0.0, as the sum of the triangles gives
        return self._full

    def take(self) -> torch.Tensor:
        """H, handed over: the accumulator keeps no reference, so a solver that reads H once can free it as soon as
        it has factored it (a 28672-wide H is 3.3 GB). The accumulator is empty afterwards."""
        if self._upper is None:
            raise RuntimeError("HessianAccumulator: H was handed over already")
        H = self.H
        self._upper = self._full = None
        return H


class FpBatches(Protocol):
    """A linear's inputs in the fp model, one [tokens, in] tensor per batch, taken in batch order: a list, or
    pipeline.FpGroupInputs (which makes each as it is taken)."""

    def __len__(self) -> int: ...

    def pop(self, index: int = 0) -> torch.Tensor: ...


class AsymmetricAccumulator(HessianAccumulator):
    """GPTAQ's statistics (solvers/gptq.py): H of the inputs x̃ a linear sees in the model being quantized, and
    dXXT = 2/n Σ (x - x̃) x̃ᵀ against its inputs x for the same tokens in the fp model. `fp_inputs`: those x, one
    per batch in the order the batches come; each is taken (pop(0)) as its x̃ arrives."""

    def __init__(self, in_features: int, fp_inputs: FpBatches, device: torch.device | str = "cpu",
                 product_dtype: torch.dtype = torch.float32):
        super().__init__(in_features, device, product_dtype)
        self.dXXT: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._fp = fp_inputs

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if not self._fp:
            raise QForgeError("GPTAQ: a linear saw more batches in the quantized model than in the fp model")
        x_fp = self._fp.pop(0)
        if x_fp.shape != x.shape:
            raise QForgeError(f"GPTAQ: a linear's fp inputs {tuple(x_fp.shape)} are not the same tokens as its "
                              f"inputs in the quantized model {tuple(x.shape)}")
        n0 = self.n
        super().add(x)
        if self.n == n0:
            return
        xq = x.to(self.dXXT.device, torch.float32)
        self.dXXT.mul_(n0 / self.n).addmm_((x_fp.to(xq.device, torch.float32) - xq).t(), xq, alpha=2.0 / self.n)

    def take_dXXT(self) -> torch.Tensor:
        """dXXT, handed over (the accumulator keeps no reference); every fp batch must have been matched."""
        if self._fp:
            raise QForgeError(f"GPTAQ: {len(self._fp)} fp batch(es) of a linear were never matched by the quantized "
                              f"model's")
        D, self.dXXT = self.dXXT, None
        return D
