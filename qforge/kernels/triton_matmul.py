"""Triton dequantize-and-matmul on qforge's canonical packed layout (kernels/reference.py): y = x @ Wᵀ.

Layout read (4 or 8 bits, where a word holds P = 32 / bits whole values; other widths use the reference):
  qweight int32 [K / P, N]   input row k of output column n at bits [(k % P)·b, (k % P + 1)·b) of word k // P
  qzeros  int32 [G, N / P]   zero point of (group g, column n) at bits [(n % P)·b, ...) of word n // P
  scales  [G, N]             fp16 / bf16 / fp32
  g_idx   int32 [K]          group of every input row (any order: act-order reads it row by row)

One kernel body; a `KernelConfig` picks its schedule:
- tiles: each program computes a BLOCK_M x BLOCK_N output tile over one of `split` slices of K, BLOCK_K
  rows at a time. split > 1 (decoding: the weights, not the flops, bound a small-batch linear, so batch 1
  must still spread the weight reads over every SM) adds the slices' tiles atomically into the output, in
  fp16 for fp16 outputs (as Marlin reduces its K slices in fp16), in fp32 then cast for bf16; within a
  slice accumulation is fp32.
- `dot`: each tile product on the tensor cores (tl.dot, BLOCK_M >= 16), or, for a GEMV (BLOCK_M = 1),
  multiply-and-sum on the CUDA cores; `prefetch` has a GEMV load tile k+1 before reducing tile k (Triton
  software-pipelines only the loads that feed tl.dot).
- `word_load` 1: each packed word loaded once as a [BLOCK_K / P, BLOCK_N] tile, its P codes joined on new
  axes (tl.join keeps them in the thread), permuted before N and reshaped to [BLOCK_K, BLOCK_N]; the sm_90
  code then stores the tile to shared memory 16 bytes at a time (a broadcast shift did it 2 at a time).
  2: the same words tile as P products of BLOCK_K / P rows each (rows k = P·i + j for code position j), no
  reshape (in-order groups only; tensor cores: BLOCK_K / P >= 16). The GEMV's version makes each code a
  float by exponent bits alone — code c shifted under the exponent of 1.0 reads as f = 1 + c·2^-b — and
  sums x·f in fp32 with one FMA per code; per tile Σ x (c - z) = 2^b (Σ x f - Σ x) - z Σ x (fp32: the
  cancellation costs ~2^-24·2^b·BLOCK_K relative, far under fp16's 2^-11). 0: one (cached) load per code, as
  the GPTQ-triton kernels do.
In-order groups (`group_size` > 0: static groups or no act-order; BLOCK_K divides the group size) read one
scale and zero row per K tile and apply the scale after the product: the tile holds the integers q - z,
exact in fp16/bf16, so the only roundings are the fp32 accumulation's. Act-order (`group_size` 0) reads a
group per row and dequantizes s · (q - z) in the activation dtype, as the reference does. Codes become
floats by the magic-number trick (Marlin's, FasterTransformer's): OR the code into the bits of 1024.0 (fp16)
or 128.0 (bf16), subtract the zero made the same way; the conversion units (I2F, 16 per clock per SM) would
otherwise bound a memory-bound GEMV.
`plan` picks a config by a heuristic; kernels/tuning.py's `Tuner` times `candidates` on the device and keeps
the fastest. benchmarks/KERNEL_NOTES.md has the byte floors and the versions so far.

The kernel is compiled with triton.jit for CUDA tensors, or run by Triton's interpreter on CPU tensors
(how the tests check it without a GPU).
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch's schedule (see the module docstring)."""
    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    dot: bool = True
    word_load: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}")
        if self.block_k < 16 or self.block_n < 16:
            raise ValueError("KernelConfig needs block_k and block_n >= 16 (a K tile holds whole packed words)")
        if self.dot and self.block_m < 16:
            raise ValueError("a tl.dot tile needs block_m >= 16; use dot=False (GEMV) for block_m 1")
        if not self.dot and self.block_m != 1:
            raise ValueError("the multiply-and-sum (GEMV) schedule takes block_m 1")
        if self.split < 1 or self.num_stages < 1:
            raise ValueError("KernelConfig needs split >= 1 and num_stages >= 1")
        if self.word_load not in (0, 1, 2):
            raise ValueError("KernelConfig.word_load is 0, 1 or 2")
        if self.prefetch and (self.dot or self.word_load != 1):
            raise ValueError("KernelConfig.prefetch is for the GEMV schedule with word_load 1")

    def fits(self, bits: int, group_size: int) -> bool:
        """Whether a launch with these weights can use this config (word_load 2: in-order groups, and for
        tensor-core tiles BLOCK_K / codes-per-word >= 16, the smallest tensor-core K)."""
        return self.word_load != 2 or (group_size > 0 and (not self.dot or self.block_k // (32 // bits) >= 16))


def _body(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
          BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, WORD_LOAD: tl.constexpr,
          HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr, PREFETCH: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    m_ok, n_ok = offs_m < M, offs_n < N
    z_shift = (offs_n % PACK) * BITS                                      # [BN]
    # not tl.zeros: a jitted helper, which the interpreter cannot call
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if PREFETCH:            # GEMV: the next tile's words and x load while this one is reduced (Triton
        k_first = k_start + tl.arange(0, BLOCK_K)    # pipelines only loads that feed tl.dot)
        w_first = k_start // PACK + tl.arange(0, BLOCK_K // PACK)
        x_next = tl.load(x_ptr + offs_m[None, :] * stride_xm + k_first[:, None],
                         mask=m_ok[None, :] & (k_first < k_end)[:, None], other=0.0)
        words_next = tl.load(qw_ptr + w_first[:, None] * N + offs_n[None, :],
                             mask=(w_first < k_end // PACK)[:, None] & n_ok[None, :], other=0)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)                # the tile's packed rows
        w_ok = (offs_w < k_end // PACK)[:, None] & n_ok[None, :]
        if GROUP_SIZE > 0:                  # the whole tile is one group: one scale row, one zero row [BN]
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            z = (tl.load(qz_ptr + g * (N // PACK) + offs_n // PACK, mask=n_ok, other=0) >> z_shift) & MASK
        if WORD_LOAD == 2:                  # P products over the rows k = P·i + j, one per code position j
            words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=w_ok, other=0)   # [BK/P, BN]
            w_rows = offs_w < k_end // PACK
            if not DOT:                     # GEMV: one FMA per code on f = 1 + c·2^-b (module docstring)
                xf = tl.full((BLOCK_K // PACK, BLOCK_N), 0.0, dtype=tl.float32)                   # Σ_j x·f
                xs = tl.full((BLOCK_K // PACK, 1), 0.0, dtype=tl.float32)                         # Σ_j x
                for j in tl.static_range(PACK):
                    xj = tl.load(x_ptr + offs_m[None, :] * stride_xm + (offs_w * PACK + j)[:, None],
                                 mask=m_ok[None, :] & w_rows[:, None], other=0.0).to(tl.float32)   # [BK/P, 1]
                    if 23 - BITS - j * BITS >= 0:    # code j (bits [j·b, (j+1)·b)) to bits [23 - b, 23)
                        top = words << (23 - BITS - j * BITS)
                    else:
                        top = words >> (j * BITS + BITS - 23)
                    f = ((top & (MASK << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)
                    xf += xj * f
                    xs += xj
                sum_x = tl.reduce(xs, 0, tl.standard._sum_combine)                                # [1]
                part = ((tl.reduce(xf, 0, tl.standard._sum_combine) - sum_x) * (1 << BITS)
                        - z.to(tl.float32) * sum_x)                                               # [BN]
                acc += (part * s)[None, :]
            else:
                part = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
                for j in tl.static_range(PACK):
                    xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_w * PACK + j)[None, :],
                                 mask=m_ok[:, None] & w_rows[None, :], other=0.0)                 # [BM, BK/P]
                    qj = (words >> (j * BITS)) & MASK
                    if MAGIC > 0:
                        wj = ((qj | MAGIC).to(tl.int16).to(xj.dtype, bitcast=True)
                              - (z | MAGIC).to(tl.int16).to(xj.dtype, bitcast=True)[None, :])
                    else:
                        wj = (qj - z[None, :]).to(xj.dtype)
                    part += tl.dot(xj, wj)
                acc += part * s[None, :]
        else:
            if DOT:
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)        # [BM, BK]
            elif PREFETCH:
                x = x_next
                x_next = tl.load(x_ptr + offs_m[None, :] * stride_xm + (offs_k + BLOCK_K)[:, None],
                                 mask=m_ok[None, :] & (offs_k + BLOCK_K < k_end)[:, None], other=0.0)
            else:
                x = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                            mask=m_ok[None, :] & k_ok[:, None], other=0.0)        # [BK, 1]
            wk_ok = k_ok[:, None] & n_ok[None, :]
            if WORD_LOAD == 1:          # words once; codes joined on new in-thread axes, moved before N
                if PREFETCH:
                    words = words_next
                    nxt = offs_w + BLOCK_K // PACK
                    words_next = tl.load(qw_ptr + nxt[:, None] * N + offs_n[None, :],
                                         mask=(nxt < k_end // PACK)[:, None] & n_ok[None, :], other=0)
                else:
                    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=w_ok, other=0)   # [BK/P, BN]
                if BITS == 4:           # code c = 4·a + 2·b + d sits at [row, n, a, b, d] after the joins
                    q = tl.join(tl.join(tl.join(words & MASK, (words >> 16) & MASK),
                                        tl.join((words >> 8) & MASK, (words >> 24) & MASK)),
                                tl.join(tl.join((words >> 4) & MASK, (words >> 20) & MASK),
                                        tl.join((words >> 12) & MASK, (words >> 28) & MASK)))
                    q = tl.reshape(tl.permute(q, (0, 2, 3, 4, 1)), (BLOCK_K, BLOCK_N))
                else:                   # 8 bits: code c = 2·a + b at [row, n, a, b]
                    q = tl.join(tl.join(words & MASK, (words >> 16) & MASK),
                                tl.join((words >> 8) & MASK, (words >> 24) & MASK))
                    q = tl.reshape(tl.permute(q, (0, 2, 3, 1)), (BLOCK_K, BLOCK_N))
            else:                                                                 # one load per code (cache hits)
                qw = tl.load(qw_ptr + (offs_k[:, None] // PACK) * N + offs_n[None, :], mask=wk_ok, other=0)
                q = (qw >> ((offs_k[:, None] % PACK) * BITS)) & MASK              # [BK, BN] codes
            if GROUP_SIZE > 0:
                z = z[None, :]
            else:                                                                 # act-order: a group per row
                g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)[:, None]
                s = tl.load(s_ptr + g * N + offs_n[None, :], mask=wk_ok, other=0.0).to(x.dtype)
                z = (tl.load(qz_ptr + g * (N // PACK) + offs_n[None, :] // PACK, mask=wk_ok, other=0)
                     >> z_shift[None, :]) & MASK
            if MAGIC > 0:   # the bits MAGIC | c read as a float are MAGIC's value + c exactly: an OR, not an I2F
                w = ((q | MAGIC).to(tl.int16).to(x.dtype, bitcast=True)
                     - (z | MAGIC).to(tl.int16).to(x.dtype, bitcast=True))
            else:
                w = (q - z).to(x.dtype)                                           # q - z: small integers, exact
            if GROUP_SIZE <= 0:
                w = w * s                                           # act-order: as the reference rounds it
            if DOT:
                part = tl.dot(x, w)                                               # [BM, BN] fp32
            else:
                # tl.sum is itself a jitted helper, which the interpreter cannot call: reduce with its combine fn
                part = tl.reduce(x.to(tl.float32) * w.to(tl.float32), 0, tl.standard._sum_combine)[None, :]
            if GROUP_SIZE > 0:
                part = part * s[None, :]
            acc += part
    if HAS_BIAS:                                                          # added once, by the first K slice
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(tl.program_id(2) == 0, 1.0, 0.0) * bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    if ATOMIC:
        tl.atomic_add(y_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(y_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _kernel(interpret: bool):
    if not available():
        raise RuntimeError("the Triton kernel needs triton installed")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_body)
    return triton.jit(_body)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fit_block_k(group_size: int, want: int) -> int:
    """The largest K tile <= want that divides the group size (a tile never spans two groups)."""
    return next(b for b in (want, 128, 64, 32, 16) if b <= want and (group_size <= 0 or group_size % b == 0))


def with_split(c: KernelConfig, M: int, N: int, K: int, programs: int) -> KernelConfig:
    """c with K cut so that the grid holds about `programs` programs (no cut when the tiles already do)."""
    tiles = _cdiv(M, c.block_m) * _cdiv(N, c.block_n)
    return dataclasses.replace(c, split=max(1, min(_cdiv(K, c.block_k), _cdiv(programs, tiles))))


@functools.lru_cache(maxsize=4096)
def plan(M: int, N: int, K: int, group_size: int, n_sm: int = 132) -> KernelConfig:
    """A config by heuristic (the Tuner measures), set from the Tuner's picks on an H200 (Triton 3.6, fp16,
    W4 g128, six Llama-3 8B/70B shapes; BENCHMARKS.md, benchmarks/KERNEL_NOTES.md): batch 1 with in-order
    groups a split-K GEMV of 256 columns x 32 rows, about 16 programs per SM (the pick on the two 70B MLP
    shapes, 2.8x faster than the tensor-core tiles); other batches up to 16 split-K tensor-core tiles
    16 x 128 x 128 with the interleaved products (word_load 2) where the groups allow, about 4 programs per
    SM; larger batches 64-column tiles, K tiles of 64, 4 stages, no split (the picks at batch 64 and 256)."""
    if M == 1 and group_size > 0:              # act-order's per-row grids make GEMV programs spill (sm_90)
        gemv = KernelConfig(1, 256, fit_block_k(group_size, 32), dot=False, num_warps=2, num_stages=2)
        return with_split(gemv, M, N, K, 16 * n_sm)
    if M <= SMALL_M:
        bk = fit_block_k(group_size, 128)
        interleaved = group_size > 0 and bk == 128          # 128 / (32 / bits) >= 16 rows for 4 and 8 bits
        return with_split(KernelConfig(16, 128, bk, word_load=2 if interleaved else 1), M, N, K, 4 * n_sm)
    return KernelConfig(32 if M <= 32 else 64 if M <= 64 else 128, 64, fit_block_k(group_size, 64), num_stages=4)


def k_per_split(c: KernelConfig, K: int) -> int:
    """Rows of K per slice: whole K tiles, so a tile never straddles two groups."""
    return _cdiv(_cdiv(K, c.split), c.block_k) * c.block_k


def launch_split(c: KernelConfig, K: int) -> int:
    """The K slices a launch of c really has (c.split, fewer where whole tiles leave a slice empty)."""
    return _cdiv(K, k_per_split(c, K))


def in_order_group_size(g_idx: torch.Tensor, K: int) -> int:
    """The group size when g_idx is k // group_size (static groups or no act-order), else 0."""
    g = g_idx.to("cpu", torch.int64)
    if int(g.max()) == 0:
        return 1 << 30                              # one group (per-channel): every tile reads row 0
    gs = int((g == 0).sum())                        # rows of the first group (a ragged last group is fine)
    return gs if gs % 16 == 0 and torch.equal(g, torch.arange(K) // gs) else 0


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def atomic_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype K slices are added in: fp16 and fp32 as they are; bf16 in fp32 (bf16 atomics need sm_90, and
    Triton's interpreter miscasts bf16), cast once at the end."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def magic_bits(dtype: torch.dtype, bits: int) -> int:
    """The fp16/bf16 bit pattern of 1024.0 / 128.0, whose low mantissa bits take a code exactly (fp16: codes
    < 1024; bf16: < 128); 0 where the kernel converts codes with I2F instead."""
    if dtype == torch.float16:
        return 0x6400
    return 0x4300 if dtype == torch.bfloat16 and bits <= 7 else 0


def triton_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor, bits: int, group_size: int = 0, bias: torch.Tensor | None = None,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """x [..., K] @ Wᵀ [K, N] (+ bias) in x's dtype; `group_size` from in_order_group_size (0: read g_idx);
    `config` None: plan's. Compiled for CUDA tensors, interpreted for CPU ones."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the Triton kernel handles {KERNEL_BITS} bits, not {bits}")
    if config is not None and not config.fits(bits, group_size):
        raise ValueError(f"{config} does not fit {bits}-bit weights with group size {group_size}")
    K, N = x.shape[-1], scales.shape[1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    c = config or plan(M, N, K, group_size, sm_count(x.device))
    split = launch_split(c, K)
    if split > 1:
        y = torch.zeros(M, N, dtype=atomic_dtype(x.dtype), device=x.device)
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (_cdiv(M, c.block_m), _cdiv(N, c.block_n), split)
    _kernel(not x.is_cuda)[grid](x2, qweight, qzeros, scales, g_idx, bias if bias is not None else y, y, M, N, K,
                             x2.stride(0), y.stride(0), k_per_split(c, K), BITS=bits, GROUP_SIZE=group_size,
                             BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, ATOMIC=split > 1, DOT=c.dot,
                             WORD_LOAD=c.word_load, HAS_BIAS=bias is not None, MAGIC=magic_bits(x.dtype, bits),
                             PREFETCH=c.prefetch, num_warps=c.num_warps, num_stages=c.num_stages,
                             enable_fp_fusion=True)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
