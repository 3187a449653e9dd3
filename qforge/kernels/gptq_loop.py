"""GPTQ's column loop (solvers.gptq.column_loop) as one Triton kernel per block.

Eager PyTorch runs the loop as ~9 small kernels per column (about 12,000 launches for one 4096-column
layer of W [out, 4096]), so on a GPU the solve waits on launches. The rows of W are independent given
H, so one program takes BLOCK_R rows and the whole block of b <= 256 columns in registers and walks
the columns itself: fit a group's grid at its first column (min-max, or the weighted range search of
grid.search_params), quantize, and subtract err · U1[i, i:] from the later columns. Same math as the
reference: round half to even, IEEE divisions (tl.div_rn), the search's shrink factors read from the
same tensor, and no fused multiply-adds (enable_fp_fusion=False): the reference's arithmetic, step for step.

GPTAQ (P1 given, HAS_P): column i also moves the later columns by w_i · P1[i, i+1:] (w_i before rounding), in the
reference's order: W -= (err · U1[i] - w · P1[i]).

Tensors are fp32 and contiguous: W1, S, Z [out, b]; U1, P1 [b, b]; cost1 [b]. Compiled for CUDA tensors,
run by Triton's interpreter for CPU ones (the tests).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from . import triton_matmul
from ..solvers.grid import Grid

triton = tl = None                          # imported on first use, as in triton_matmul
SEARCH_STEPS, MIN_SHRINK = 26, 0.5          # grid.search_params' defaults


def _body(w_ptr, u_ptr, s_ptr, z_ptr, c_ptr, p_ptr, codes_ptr, q_ptr, e_ptr, p1_ptr, R, b, gs,
          MAXQ: tl.constexpr, SYM: tl.constexpr, FIT: tl.constexpr, SEARCH: tl.constexpr, STEPS: tl.constexpr,
          BLOCK_R: tl.constexpr, BB: tl.constexpr, HAS_P: tl.constexpr):
    RINT: tl.constexpr = 12582912.0             # 1.5 · 2^23: (x + RINT) - RINT rounds |x| < 2^22 half to even
    BIG: tl.constexpr = 3.0e38
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BB)
    c_ok = cols < b
    ok = (rows < R)[:, None] & c_ok[None, :]
    offs = rows[:, None] * b + cols[None, :]
    W = tl.load(w_ptr + offs, mask=ok, other=0.0)                        # [BR, BB] compensated as we go
    if FIT:
        S = tl.full((BLOCK_R, BB), 1.0, tl.float32)
        Z = tl.full((BLOCK_R, BB), 0.0, tl.float32)
    else:
        S = tl.load(s_ptr + offs, mask=ok, other=1.0)
        Z = tl.load(z_ptr + offs, mask=ok, other=0.0)
    cost = tl.load(c_ptr + cols, mask=c_ok, other=0.0)                   # [BB]
    s_i = tl.full((BLOCK_R,), 1.0, tl.float32)                           # the current group's grid (FIT)
    z_i = tl.full((BLOCK_R,), 0.0, tl.float32)
    C = tl.full((BLOCK_R, BB), 0.0, tl.float32)
    Q = tl.full((BLOCK_R, BB), 0.0, tl.float32)
    E = tl.full((BLOCK_R, BB), 0.0, tl.float32)
    for i in range(0, b):
        if FIT:
            if i % gs == 0:                                              # a group starts: fit its grid
                g = (cols >= i) & (cols < i + gs) & c_ok
                # tl.min / tl.max / tl.sum are jitted helpers, which the interpreter cannot call: reduce with
                # their combine functions
                lo = tl.minimum(tl.reduce(tl.where(g[None, :], W, BIG), 1, tl.standard._elementwise_min), 0.0)
                hi = tl.maximum(tl.reduce(tl.where(g[None, :], W, -BIG), 1, tl.standard._elementwise_max), 0.0)
                if SYM:
                    hi = tl.maximum(-lo, hi)
                    lo = -hi
                dead = (lo == 0.0) & (hi == 0.0)
                lo = tl.where(dead, -1.0, lo)
                hi = tl.where(dead, 1.0, hi)
                s = tl.div_rn(hi - lo, MAXQ * 1.0)
                if SYM:
                    z = tl.full((BLOCK_R,), (MAXQ + 1) // 2, tl.float32)
                else:
                    z = (tl.div_rn(-lo, s) + RINT) - RINT
                if SEARCH:                                               # first minimum over p·scale
                    best, best_err = s, tl.full((BLOCK_R,), BIG, tl.float32)
                    for t in range(STEPS):
                        st = tl.load(p_ptr + t) * s
                        qq = tl.minimum(tl.maximum((tl.div_rn(W, st[:, None]) + RINT) - RINT + z[:, None], 0.0),
                                        MAXQ * 1.0)
                        d = (qq - z[:, None]) * st[:, None] - W
                        err = tl.reduce(tl.where(g[None, :], d * d * cost[None, :], 0.0), 1,
                                        tl.standard._sum_combine)
                        better = err < best_err
                        best_err = tl.where(better, err, best_err)
                        best = tl.where(better, st, best)
                    s = best
                S = tl.where(g[None, :], s[:, None], S)
                Z = tl.where(g[None, :], z[:, None], Z)
                s_i, z_i = s, z
        here = (cols == i)[None, :]
        w = tl.reduce(tl.where(here, W, 0.0), 1, tl.standard._sum_combine)    # column i, exactly
        if not FIT:
            s_i = tl.reduce(tl.where(here, S, 0.0), 1, tl.standard._sum_combine)
            z_i = tl.reduce(tl.where(here, Z, 0.0), 1, tl.standard._sum_combine)
        q = tl.minimum(tl.maximum((tl.div_rn(w, s_i) + RINT) - RINT + z_i, 0.0), MAXQ * 1.0)
        wq = (q - z_i) * s_i
        err = tl.div_rn(w - wq, tl.load(u_ptr + i * b + i))
        u = tl.load(u_ptr + i * b + cols, mask=c_ok & (cols >= i), other=0.0)
        if HAS_P:                                                        # GPTAQ: the reference's upd, then W - upd
            p = tl.load(p1_ptr + i * b + cols, mask=c_ok & (cols > i), other=0.0)
            W = W - (err[:, None] * u[None, :] - w[:, None] * p[None, :])
        else:
            W = W - err[:, None] * u[None, :]
        C = tl.where(here, q[:, None], C)
        Q = tl.where(here, wq[:, None], Q)
        E = tl.where(here, err[:, None], E)
    tl.store(codes_ptr + offs, C, mask=ok)
    tl.store(q_ptr + offs, Q, mask=ok)
    tl.store(e_ptr + offs, E, mask=ok)
    if FIT:
        tl.store(s_ptr + offs, S, mask=ok)
        tl.store(z_ptr + offs, Z, mask=ok)


@functools.cache
def _kernel(interpret: bool):
    global triton, tl
    if not triton_matmul.available():
        raise RuntimeError("the GPTQ loop kernel needs triton installed")
    triton, tl = triton_matmul.triton, triton_matmul.tl
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_body)
    return triton.jit(_body)


@functools.cache
def _shrinks(device: torch.device) -> torch.Tensor:
    return torch.linspace(1.0, MIN_SHRINK, SEARCH_STEPS, device=device)     # as search_params draws them


def block_width(b: int) -> int:
    """The kernel's column tile: b rounded up to a power of two (at least 16)."""
    return max(16, 1 << (b - 1).bit_length())


def num_warps(bb: int) -> int:
    return 4 if bb <= 64 else 8


def triton_column_loop(W1: torch.Tensor, U1: torch.Tensor, grid: Grid, gs: int, S: torch.Tensor | None = None,
                       Z: torch.Tensor | None = None, cost1: torch.Tensor | None = None, scale_search: bool = False,
                       P1: torch.Tensor | None = None, block_r: int = 16):
    """solvers.gptq.column_loop's contract (same arguments and results, GPTAQ's P1 included), one kernel launch per
    block."""
    R, b = W1.shape
    if grid.fp8:
        raise ValueError("the GPTQ loop kernel rounds to integer grids; FP8 grids take solvers.gptq.column_loop")
    if b > 256:
        raise ValueError(f"the GPTQ loop kernel holds at most 256 columns per block, got {b}")
    fit = S is None
    W1 = W1.float().contiguous()
    S = torch.empty_like(W1) if fit else S.float().contiguous()
    Z = torch.empty_like(W1) if fit else Z.float().contiguous()
    cost1 = torch.ones(b, device=W1.device) if cost1 is None else cost1.float().contiguous()
    codes, Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    BB = block_width(b)
    kernel = _kernel(not W1.is_cuda)
    U1, has_p = U1.float().contiguous(), P1 is not None
    P1 = P1.float().contiguous() if has_p else U1                      # not read without HAS_P
    kernel[(-(-R // block_r),)](W1, U1, S, Z, cost1, _shrinks(W1.device), codes, Q1, Err1, P1,
                                R, b, gs, MAXQ=grid.maxq, SYM=grid.sym, FIT=fit, SEARCH=scale_search,
                                STEPS=SEARCH_STEPS, BLOCK_R=block_r, BB=BB, HAS_P=has_p,
                                num_warps=num_warps(BB), num_stages=1, enable_fp_fusion=False)
    return codes, Q1, Err1, S, Z


def column_loop_for(device, float_codes: bool = False) -> Callable:
    """The column loop to hand gptq() for tensors on `device`: the kernel on CUDA with triton, else (and for FP8,
    NVFP4 or MX grids, `float_codes`, which the kernel does not round) the reference."""
    from ..solvers.gptq import column_loop

    if torch.device(device).type == "cuda" and triton_matmul.available() and not float_codes:
        return triton_column_loop
    return column_loop
