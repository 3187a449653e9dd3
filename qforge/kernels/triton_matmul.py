"""Triton dequantize-and-matmul on qforge's canonical packed layout (kernels/reference.py): y = x @ Wᵀ.

Layout read (4 or 8 bits, where a word holds P = 32 / bits whole values; other widths use the reference):
  qweight int32 [K / P, N]   input row k of output column n at bits [(k % P)·b, (k % P + 1)·b) of word k // P
  qzeros  int32 [G, N / P]   zero point of (group g, column n) at bits [(n % P)·b, ...) of word n // P
  scales  [G, N]             fp16 / bf16 / fp32, used as stored
  g_idx   int32 [K]          group of every input row (any order: act-order reads it row by row)

One kernel body, two schedules chosen by the number of rows M of x (`plan`):
- GEMM (M > 16): one program per BLOCK_M x BLOCK_N output tile, looping over K, each dequantized
  [BLOCK_K, BLOCK_N] weight tile fed to tl.dot with fp32 accumulation.
- split-K (M <= 16, decoding): BLOCK_M = 16 and K cut into SPLIT_K slices, each program adding its
  partial tile atomically into an fp32 output, so that batch 1 still spreads the weight reads over
  every SM (the weights, not the flops, bound a small-batch linear).
In-order groups (`group_size` > 0, static groups or no act-order) read one scale/zero row per K tile
instead of one per weight row: BLOCK_K then divides the group size.

The kernel is compiled with triton.jit for CUDA tensors, or run by Triton's interpreter on CPU tensors
(`interpret=True`, how the tests check it without a GPU).
"""
from __future__ import annotations

import functools

import torch

triton = tl = None               # imported on first use (importing triton takes a while)
KERNEL_BITS = (4, 8)
SMALL_M = 16


@functools.cache
def available() -> bool:
    """Whether triton imports (without it QuantLinear keeps the PyTorch reference)."""
    global triton, tl
    try:
        import triton as _triton
        import triton.language as _tl
    except ImportError:
        return False
    triton, tl = _triton, _tl
    return True


def _body(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, y_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
          BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    m_ok, n_ok = offs_m < M, offs_n < N
    z_shift = (offs_n % PACK) * BITS                                      # [BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # not tl.zeros: a jitted helper the interpreter cannot call
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)        # [BM, BK]
        wk_ok = k_ok[:, None] & n_ok[None, :]
        qw = tl.load(qw_ptr + (offs_k[:, None] // PACK) * N + offs_n[None, :], mask=wk_ok, other=0)
        q = (qw >> ((offs_k[:, None] % PACK) * BITS)) & MASK              # [BK, BN] codes
        if GROUP_SIZE > 0:                                                # the whole tile is one group
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            z = ((tl.load(qz_ptr + g * (N // PACK) + offs_n // PACK, mask=n_ok, other=0) >> z_shift) & MASK)[None, :]
        else:                                                             # act-order: a group per row
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)[:, None]
            s = tl.load(s_ptr + g * N + offs_n[None, :], mask=wk_ok, other=0.0).to(tl.float32)
            z = (tl.load(qz_ptr + g * (N // PACK) + offs_n[None, :] // PACK, mask=wk_ok, other=0)
                 >> z_shift[None, :]) & MASK
        w = ((q - z).to(tl.float32) * s).to(x.dtype)                       # exact in fp32, rounded once
        acc += tl.dot(x, w)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _kernel(interpret: bool):
    if not available():
        raise RuntimeError("the Triton kernel needs triton installed")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_body)
    return triton.jit(_body)


def plan(M: int, N: int, K: int, group_size: int, n_sm: int = 132) -> dict:
    """Tile sizes and split for one call (a heuristic; benchmarks/kernels.py measures it)."""
    available()
    block_k = 64 if group_size <= 0 else next(b for b in (128, 64, 32, 16) if group_size % b == 0)
    if M <= SMALL_M:
        block_m, block_n = 16, 128
        k_tiles = triton.cdiv(K, block_k)
        split = max(1, min(k_tiles, triton.cdiv(4 * n_sm, triton.cdiv(N, block_n))))
    else:
        block_m, block_n, split = (64 if M <= 64 else 128), 128, 1
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k   # whole tiles, so groups stay aligned
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, split=triton.cdiv(K, k_per_split),
                k_per_split=k_per_split)


def in_order_group_size(g_idx: torch.Tensor, K: int) -> int:
    """The group size when g_idx is k // group_size (static groups or no act-order), else 0."""
    g = g_idx.to("cpu", torch.int64)
    if int(g.max()) == 0:
        return 1 << 30                              # one group (per-channel): every tile reads row 0
    gs = int((g == 0).sum())                        # rows of the first group (a ragged last group is fine)
    return gs if gs % 16 == 0 and torch.equal(g, torch.arange(K) // gs) else 0


def triton_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor, bits: int, group_size: int = 0, bias: torch.Tensor | None = None,
                  interpret: bool = False, n_sm: int = 132) -> torch.Tensor:
    """x [..., K] @ Wᵀ [K, N] (+ bias) in x's dtype; `group_size` from in_order_group_size (0: read g_idx)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the Triton kernel handles {KERNEL_BITS} bits, not {bits}")
    K, N = x.shape[-1], scales.shape[1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    p = plan(M, N, K, group_size, n_sm)
    atomic = p["split"] > 1
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else torch.empty(M, N, dtype=x.dtype,
                                                                                             device=x.device)
    grid = (triton.cdiv(M, p["BLOCK_M"]), triton.cdiv(N, p["BLOCK_N"]), p["split"])
    _kernel(interpret)[grid](x2, qweight, qzeros, scales, g_idx, y, M, N, K, x2.stride(0), y.stride(0),
                             p["k_per_split"], BITS=bits, GROUP_SIZE=group_size, BLOCK_M=p["BLOCK_M"],
                             BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], ATOMIC=atomic)
    y = y.to(x.dtype).reshape(*x.shape[:-1], N)
    return y + bias.to(x.dtype) if bias is not None else y
