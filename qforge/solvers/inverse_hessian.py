"""The factor GPTQ propagates errors with: U, upper triangular, U^T U = (Hp + λI)^-1, where Hp is the layer's
Hessian with its columns in the solver's visiting order.

The reference (GPTQ's code) factors Hp + λI, inverts it and factors the inverse: three O(n³) steps, the
inversion (cholesky_inverse) alone ~5x a Cholesky on a CPU. Here: J reverses the order, and with
J (Hp + λI) J = L L^T (lower L),  Hp + λI = (J L J)(J L J)^T,  so U = (J L J)^-1 = J L^-1 J  is the upper factor
of the inverse (unique, so the same U up to rounding): one Cholesky, one triangular inversion (n³/3 flops of
matrix products), and the reversal J · J, which on a column-major matrix is the reversal of its flat storage.
Every step runs in place in one [in, in] matrix besides H (28672²: 3.3 GB), which is never modified.

Pure tensor functions: fp32 in, fp32 out, on H's device.
"""
from __future__ import annotations

import torch

from ..utils.tensors import all_finite


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, perm: torch.Tensor | None = None,
                             max_tries: int = 4) -> tuple[torch.Tensor, dict]:
    """U [in, in] upper, U^T U = (Hp + λI)^-1, Hp = H[perm][:, perm], λ = damp * mean(diag Hp), escalating λ x10
    while the factorization fails. A zero diagonal entry of H (an input that is always zero: its whole row is
    zero) counts as 1 in Hp. If every try fails (a huge or badly conditioned H), an eigendecomposition with the
    eigenvalues clamped positive, which always factorises. Returns (U, info); U is column-major."""
    n = H.shape[0]
    work = torch.empty_like(H)                        # [in, in]; work.mT is column-major, as LAPACK works
    v, status = work.mT, torch.empty((), dtype=torch.int32, device=H.device)
    order = torch.arange(n, device=H.device) if perm is None else perm
    d = damp
    for attempt in range(max_tries):
        mean_diag = _fill(work, H, order.flip(0))     # J Hp J (symmetric: v holds it too)
        work.diagonal().add_(d * mean_diag)           # + λI
        torch.linalg.cholesky_ex(v, out=(v, status))  # v := L, J (Hp + λI) J = L L^T
        if status.item() == 0:
            _invert_lower_(v)                         # v := L^-1
            _reverse_(work.view(-1))                  # v := J L^-1 J = U
            if all_finite(work):
                return v, {"damp": d, "retries": attempt, "fallback": None}
        d *= 10
    # eigen fallback: Hp = V diag(e) V^T with e clamped to >= 1e-6 * max(e) (+ the last damping)
    mean_diag = _fill(work, H, perm)
    e, V = torch.linalg.eigh(work.double())
    del work, v
    e = e.clamp_min(1e-6 * e.max().clamp_min(1e-12)) + d * float(mean_diag)
    Hinv = (V / e) @ V.T
    U = torch.linalg.cholesky(Hinv, upper=True).to(H.dtype)
    return U, {"damp": d, "retries": max_tries, "fallback": "eigh"}


def _fill(work: torch.Tensor, H: torch.Tensor, perm: torch.Tensor | None, panel: int = 2048) -> torch.Tensor:
    """work := H[perm][:, perm] (a panel of rows at a time: no [in, in] temporary) with its zero diagonal
    entries set to 1; returns mean(diag work)."""
    if perm is None:
        work.copy_(H)
    else:
        for r in range(0, H.shape[0], panel):
            torch.index_select(H.index_select(0, perm[r:r + panel]), 1, perm, out=work[r:r + panel])
    d = work.diagonal()
    d.masked_fill_(d == 0, 1.0)
    return torch.diag(work).mean().clamp_min(1e-12)


def _invert_lower_(L: torch.Tensor, nb: int = 512) -> None:
    """L [n, n] lower triangular (zeros above the diagonal) := L^-1, in place, by diagonal blocks from the last:
    with L = [[A, 0], [C, D]] and D already inverted, L^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]."""
    n = L.shape[0]
    for j in reversed(range(0, n, nb)):
        e = min(j + nb, n)
        eye = torch.eye(e - j, dtype=L.dtype, device=L.device)
        A_inv = torch.linalg.solve_triangular(L[j:e, j:e], eye, upper=False).tril_()      # [b, b]
        if e < n:
            DC = L[e:, e:] @ L[e:, j:e]                                                   # [n - e, b]
            L[e:, j:e] = torch.mm(DC, A_inv).neg_()
        L[j:e, j:e] = A_inv


def _reverse_(flat: torch.Tensor, chunk: int = 1 << 22) -> None:
    """flat[k] <-> flat[N - 1 - k], in place, a chunk from each end at a time."""
    N = flat.numel()
    for k in range(0, N // 2, chunk):
        c = min(chunk, N // 2 - k)
        head = flat[k:k + c].clone()
        flat[k:k + c] = flat[N - k - c:N - k].flip(0)
        flat[N - k - c:N - k] = head.flip(0)
