"""Dense little-endian bit packing of small unsigned integers into int32 words.

Every 32 consecutive values along the packed dimension become `bits` int32 words: value i of the
run occupies bits [i*bits, (i+1)*bits) of the run's 32*bits-bit little-endian stream, so a value may
straddle two words (3 bits: the 10 | 1 | 10 | 1 | 10 layout of AutoGPTQ). For 2, 4 and 8 bits this is
the plain "value j at shift j*bits" layout. GPTQ's qweight/qzeros and compressed-tensors'
weight_packed use this stream; AWQ's GEMM layout permutes values first (formats/awq.py).
"""
from __future__ import annotations

import torch

from ..errors import QForgeError
from ..utils.tensors import row_slices


def _check(n: int, bits: int, what: str) -> None:
    if not 1 <= bits <= 8:
        raise QForgeError(f"cannot pack {bits}-bit values (1 to 8 bits)")
    if n % 32:
        raise QForgeError(f"{what}: {n} values along the packed dimension; packing needs a multiple of 32")


def pack_int32(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Integer tensor (each value in [0, 2^bits)) -> int32 tensor with size n*bits/32 along `dim`."""
    v = values.movedim(dim, -1)             # contiguous when `values` is a transposed [out, in] matrix
    n = v.shape[-1]
    _check(n, bits, "pack_int32")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise QForgeError(f"values out of the {bits}-bit range [0, {(1 << bits) - 1}]")
    if 32 % bits == 0:          # no value straddles two words: a run of 32/bits values is one word
        return _pack_whole_words(v, bits).movedim(-1, dim)
    v = v.to(torch.int64)
    runs = v.reshape(*v.shape[:-1], n // 32, 32)                    # [..., R, 32]
    words = torch.zeros(*runs.shape[:-1], bits, dtype=torch.int64, device=v.device)  # [..., R, bits]
    for i in range(32):
        off = i * bits
        w, s = divmod(off, 32)
        words[..., w] |= (runs[..., i] << s) & 0xFFFFFFFF
        if s + bits > 32:                                           # straddles into the next word
            words[..., w + 1] |= runs[..., i] >> (32 - s)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # reinterpret as signed int32
    return words.reshape(*v.shape[:-1], n * bits // 32).to(torch.int32).movedim(-1, dim)


def _pack_whole_words(v: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_int32 along the last dim when 32 % bits == 0: value j of a word at shift j*bits (disjoint bit fields,
    so a sum is their OR), ~1M values at a time (int64 temporaries of a whole 28672 x 8192 layer: 3.8 GB)."""
    per = 32 // bits
    rows = v.reshape(-1, v.shape[-1])
    out = torch.empty(rows.shape[0], rows.shape[1] // per, dtype=torch.int32, device=v.device)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)
    for r in row_slices(*rows.shape):
        words = (rows[r].to(torch.int64).view(-1, rows.shape[1] // per, per) << shifts).sum(-1)
        out[r] = torch.where(words >= 1 << 31, words - (1 << 32), words)   # as signed int32
    return out.view(*v.shape[:-1], v.shape[-1] // per)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int = -1, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of pack_int32: int32 [.., n*bits/32 along dim] -> values [.., n along dim] as `dtype` (uint8 for
    codes: an int64 result of a 28672 x 8192 layer is 1.9 GB to fault in)."""
    if packed.shape[dim] % bits:
        raise QForgeError(f"unpack_int32: {packed.shape[dim]} words is not a whole number of {bits}-bit runs")
    if 32 % bits == 0:          # no value straddles two words: every shift at once, in the words' own layout
        dim = dim % packed.dim()
        p = packed.to(torch.int32).unsqueeze(dim + 1)                    # [..., W, 1, ...]
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=p.device)
        vals = (p >> shifts.view(-1, *[1] * (p.dim() - dim - 2))) & ((1 << bits) - 1)   # [..., W, 32/bits, ...]
        shape = list(packed.shape)                                       # (arithmetic shifts: the sign bits
        shape[dim] *= 32 // bits                                         # are masked off)
        return vals.reshape(shape).to(dtype)
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    words = p.reshape(*p.shape[:-1], p.shape[-1] // bits, bits)      # [..., R, bits]
    mask = (1 << bits) - 1
    out = torch.empty(*words.shape[:-1], 32, dtype=torch.int64, device=p.device)
    for i in range(32):
        w, s = divmod(i * bits, 32)
        val = words[..., w] >> s
        if s + bits > 32:
            val = val | (words[..., w + 1] << (32 - s))
        out[..., i] = val & mask
    return out.reshape(*p.shape[:-1], -1).movedim(-1, dim).to(dtype)


def unpack_codes_t(packed: torch.Tensor, bits: int, chunk: int = 1 << 20) -> torch.Tensor:
    """unpack_int32(packed, bits, dim=0).t() as a contiguous uint8 [m, n]: codes packed along dim 0 of an int32
    [n*bits/32, m] tensor (GPTQ's qweight), a few rows of words at a time, so each temporary stays in cache
    (unpacking a whole 28672 x 8192 layer and then transposing it takes ~4x longer)."""
    words, m = packed.shape
    out = torch.empty(m, words * 32 // bits, dtype=torch.uint8, device=packed.device)
    step = bits * max(1, chunk // (32 * m))                            # whole runs of `bits` words: ~chunk values
    for w0 in range(0, words, step):
        c = unpack_int32(packed[w0:w0 + step], bits, dim=0, dtype=torch.uint8)   # [rows, m]
        r0 = w0 * 32 // bits
        out[:, r0:r0 + c.shape[0]] = c.t()
    return out
