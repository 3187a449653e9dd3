"""Orthogonal rotations for rotated quantization (QuaRot, SpinQuant): Hadamard matrices of the widths LLMs use.

A rotation R (orthogonal, [n, n]) applied to a residual stream spreads each outlier channel over all n channels,
so weights and activations seen through it have far lighter tails (lower kurtosis) and quantize with less error,
while the model's function is unchanged (smoothing/rotate.py folds R into the weights).

hadamard(n): a ±1 matrix with H Hᵀ = n·I, built as Sylvester's 2^k ⊗ a Paley core: Paley I gives order q + 1 for a
prime q ≡ 3 (mod 4) (12, 20, 44, 140, ...), Paley II order 2(q + 1) for a prime q ≡ 1 (mod 4) (28, 36, 60, 148, ...).
That covers widths such as 576 = 36·16 (SmolLM2), 896 = 28·32, 3072 = 12·256, 5120 = 20·256, 8960 = 140·64;
hadamard_core(n) says which core a width takes, None when none of these constructions reach it.
rotation_factors(n, kind, seed) keeps such a rotation as its Kronecker factors: applying it costs n·(sum of their
orders) per row instead of n² (a fast Hadamard transform in spirit), so rotating a 70B model's 8192-wide weights takes
seconds per block on a CPU, not a minute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ROTATIONS
from ..errors import QForgeError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley_order(q: int) -> int | None:
    """The order of q's Paley Hadamard matrix (q prime), or None."""
    if not _is_prime(q) or q == 2:
        return None
    return q + 1 if q % 4 == 3 else 2 * (q + 1)


def hadamard_core(n: int) -> tuple[int, int] | None:
    """(q, 2^k): n = (Paley order of prime q) · 2^k, the largest power of two first; q = 1: n itself a power of two.
    None when n has no such construction."""
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    while power >= 1:
        core = n // power
        if core == 1:
            return 1, power
        for q in (core - 1, core // 2 - 1):          # Paley I: core = q + 1; Paley II: core = 2(q + 1)
            if q > 1 and _paley_order(q) == core:
                return q, power
        power //= 2
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod q (χ(0) = 0). [q, q] float64."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[torch.tensor(sorted({x * x % q for x in range(1, q)}))] = 1
    chi = 2 * squares - 1
    chi[0] = 0
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q   # [i, j] -> j − i
    return chi[idx]


def paley(q: int) -> torch.Tensor:
    """Paley's Hadamard matrix for prime q: [q + 1, q + 1] (q ≡ 3 mod 4) or [2(q + 1), 2(q + 1)] (q ≡ 1 mod 4)."""
    order = _paley_order(q)
    if order is None:
        raise QForgeError(f"Paley's construction needs an odd prime, not {q}")
    Q = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)          # conference matrix: C Cᵀ = q·I
    C[0, 1:] = ones
    C[1:, 0] = -ones if q % 4 == 3 else ones
    C[1:, 1:] = Q
    eye = torch.eye(q + 1, dtype=torch.float64)
    if q % 4 == 3:                                              # C antisymmetric: H = I + C
        return eye + C
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)   # C symmetric: H = C ⊗ A + I ⊗ B
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(eye, b)


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix [n, n], n a power of two."""
    if n < 1 or n & (n - 1):
        raise QForgeError(f"Sylvester's construction needs a power of two, not {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (±1 entries, H Hᵀ = n·I), float64 [n, n]."""
    core = hadamard_core(n)
    if core is None:
        raise QForgeError(f"no Hadamard construction here reaches width {n} (it takes 2^k times 1, a prime + 1 with "
                          f"the prime 3 mod 4, or 2(prime + 1) with the prime 1 mod 4)")
    q, power = core
    return sylvester(power) if q == 1 else torch.kron(paley(q), sylvester(power))


@dataclass(frozen=True)
class KroneckerRotation:
    """An orthogonal R = (F_1 ⊗ ... ⊗ F_m)·diag(s), [n, n], kept as its factors."""

    factors: tuple[torch.Tensor, ...]      # float64 orthogonal [m_i, m_i], the m_i multiplying to n
    signs: torch.Tensor | None = None      # [n] ±1 float64, or None

    @property
    def n(self) -> int:
        return math.prod(f.shape[0] for f in self.factors)

    def dense(self) -> torch.Tensor:
        """R, float64 [n, n]."""
        R = self.factors[0]
        for f in self.factors[1:]:
            R = torch.kron(R, f)
        return R if self.signs is None else R * self.signs.unsqueeze(0)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x·R for x [..., n] (a linear reading the rotated stream: W·R; the embeddings: E·R)."""
        return self._apply(x, x.numel() // x.shape[-1], 1)

    def transposed_left(self, W: torch.Tensor) -> torch.Tensor:
        """Rᵀ·W for W [n, ...] (a linear writing to the rotated stream)."""
        return self._apply(W, 1, W.numel() // W.shape[0])

    def _apply(self, x: torch.Tensor, lead: int, trail: int) -> torch.Tensor:
        """x seen as [lead, n, trail], its n axis as [m_1, ..., m_m] (index j = j_1·m_2···m_m + ... + j_m, as kron
        orders it): each axis k in turn takes F_kᵀ from the left (y'[l] = Σ_j F_k[j, l] y[j]: both x·R and Rᵀ·W),
        then the signs. n·Σ m_k multiply-adds per column instead of n². In x's dtype, fp32 arithmetic for halves."""
        n, dtype = self.n, torch.promote_types(x.dtype, torch.float32)
        y, pre, post = x.to(dtype).reshape(lead, n, trail), lead, n
        for f in self.factors:
            m, f = f.shape[0], f.to(dtype=dtype, device=x.device)
            post //= m
            if post * trail == 1:                                    # the last axis: one GEMM
                y = y.reshape(-1, m) @ f
            else:                                                    # [pre, m, post·trail], batched over pre
                y = torch.matmul(f.T, y.reshape(pre, m, post * trail))
            pre *= m
        y = y.reshape(lead, n, trail)
        if self.signs is not None:
            y = y * self.signs.to(dtype=dtype, device=x.device).view(1, n, 1)
        return y.reshape(x.shape).to(x.dtype)


def _sylvester_factors(power: int) -> list[torch.Tensor]:
    """Sylvester's normalized H_power as none (power 1), one or two factors of near-equal orders (H_ab = H_a ⊗ H_b)."""
    if power <= 64:
        return [sylvester(power) / power ** 0.5] if power > 1 else []
    a = 1 << (power.bit_length() - 1) // 2
    return [sylvester(a) / a ** 0.5, sylvester(power // a) / (power // a) ** 0.5]


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix [n, n] float64 (QR of a Gaussian, signs fixed by R's diagonal)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R)).unsqueeze(0)).contiguous()


def rotation_factors(n: int, kind: str, seed: int) -> KroneckerRotation:
    """An orthogonal [n, n] rotation of `kind`, as Kronecker factors:
    "hadamard": QuaRot's randomized Hadamard H·diag(s)/√n (s random signs; H = Paley core ⊗ Sylvester 2^k); a width
      hadamard() cannot reach takes a random orthogonal core ⊗ the Hadamard of its power-of-two factor (as
      orthogonal, then, on the odd part);
    "orthogonal": a random orthogonal matrix (SpinQuant's starting point, without its training): one dense factor."""
    if kind not in ROTATIONS:
        raise QForgeError(f"rotation must be one of {', '.join(ROTATIONS)}, not {kind!r}")
    g = torch.Generator().manual_seed(seed)
    if kind == "orthogonal":
        return KroneckerRotation((random_orthogonal(n, g),))
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    core = hadamard_core(n)
    if core is not None:
        q, power = core
        head = [] if q == 1 else [paley(q) / (n // power) ** 0.5]
        return KroneckerRotation(tuple(head + _sylvester_factors(power)), signs)
    power = n & -n                                               # the largest power of two dividing n
    return KroneckerRotation((random_orthogonal(n // power, g), *_sylvester_factors(power)), signs)


def rotation(n: int, kind: str, seed: int) -> torch.Tensor:
    """rotation_factors(n, kind, seed)'s R as one float64 [n, n] matrix (R Rᵀ = I)."""
    return rotation_factors(n, kind, seed).dense()
