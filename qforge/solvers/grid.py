"""The uniform integer quantization grid, as pure functions on fp32 tensors.

Asymmetric:  scale = (max - min) / maxq,  zero = round(-min / scale)      (min <= 0 <= max)
Symmetric:   scale = 2 * absmax / maxq,   zero = 2^(bits-1)                 (GPTQ's convention;
             identical codes to the signed [-2^(b-1), 2^(b-1)-1] grid with scale absmax / (maxq/2))
q = clamp(round(w / scale) + zero, 0, maxq),   w_hat = scale * (q - zero)

Groups run along the input dimension: column j of W [out, in] belongs to group g_idx[j]. Without
act-order g_idx[j] = j // group_size; a group size that does not divide `in` leaves a smaller
(ragged) last group. group_size = -1 means one group (per-channel).

FP8 (`fp8=True`, 8 bits, symmetric): the codes are OCP E4M3 (float8_e4m3fn) numbers instead of integers,
scale = absmax / 448 (E4M3's largest value) and zero = 0:  q = fp8(clamp(w / scale, -448, 448)), w_hat = scale * q.
The codes are kept as float8_e4m3fn tensors (one byte each, as compressed-tensors "float-quantized" stores them).

NVFP4 (`fp4=True`, 4 bits, symmetric; NVIDIA's format, llm-compressor's NVFP4A16): the codes are E2M1 numbers
(0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6; ties to the even one, as compressed-tensors rounds), each group's scale an E4M3
number s8 in the units of one per-tensor global scale g = 448 · 6 / max|W| (compressed-tensors'):
s8 = e4m3(g · absmax / 6) (0 -> 0.125, as compressed-tensors replaces zero scales),  w_hat = s8 · code / g.
The solvers work on g · W, where the scales are plain E4M3 numbers, and divide their Ŵ by g at the end;
LayerQuant keeps s8 as its scales and g as its global_scale, and dequantizes in the same order (compressed-tensors
computes (s8 / g) · code: at most an ulp away). The codes are kept in float8_e4m3fn storage (every E2M1 number is an
E4M3 one).

MX (`mx=True`; the OCP microscaling formats, llm-compressor's MXFP4A16 and MXFP8A16): E2M1 codes (`fp4`, MXFP4) or E4M3
codes (`fp8`, MXFP8) in groups of 32 (the format's; the grid takes any), each group's scale a power of two 2^e stored as
one E8M0 byte (e + 127), no global scale. Min-max picks compressed-tensors' exponent: e = k - emax with 2^k the group's
absmax rounded to a power of two (up from 1.75 · 2^k') and emax = floor(log2(largest code)), 2 for E2M1, 8 for E4M3, so
the absmax lands in [3.5, 7) codes (E2M1: clipped to 6 above 6) or [224, 448) (E4M3: never clipped). The range search
tries e - 1 and e + 1 beside it.

Blocks (`block_rows` R > 0, FP8 only; DeepSeek-V3's and llm-compressor's FP8_BLOCK with R = group_size = 128): a
group's scale is shared by R consecutive output rows, so every R x group_size tile of W has one scale, the largest
absmax of its rows / 448 (the last tile of a height not divisible by R is shorter). LayerQuant keeps the scales per
row ([out, groups], equal within a tile) like any other grid; formats/compressed_tensors.py stores one per tile.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QForgeError
from ..utils.tensors import row_slices


FP8_MAX = 448.0   # float8_e4m3fn's largest finite value


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int = -1   # -1: per output channel
    sym: bool = True
    fp8: bool = False      # E4M3 codes (see the module docstring); bits 8, sym
    block_rows: int = 0    # > 0: one scale per block_rows x group_size tile (FP8 blocks, see the module docstring)
    fp4: bool = False      # E2M1 codes; bits 4, sym, groups. Without mx NVFP4: E4M3 group scales over a global scale
    mx: bool = False       # power-of-two (E8M0) group scales: MXFP4 with fp4, MXFP8 with fp8

    def __post_init__(self) -> None:
        if self.fp8 and (self.bits != 8 or not self.sym):
            raise ValueError(f"an FP8 grid is 8-bit symmetric, got bits {self.bits}, sym {self.sym}")
        if self.fp4 and (self.bits != 4 or not self.sym or self.group_size <= 0 or self.fp8):
            raise ValueError(f"an FP4 grid is 4-bit symmetric in groups, got bits {self.bits}, sym {self.sym}, "
                             f"group_size {self.group_size}")
        if self.mx and not ((self.fp4 or self.fp8) and self.group_size > 0 and not self.block_rows):
            raise ValueError(f"an MX grid has FP4 or FP8 codes in groups, got fp4 {self.fp4}, fp8 {self.fp8}, "
                             f"group_size {self.group_size}, block_rows {self.block_rows}")
        if self.block_rows and not (self.fp8 and self.block_rows > 0 and self.group_size > 0):
            raise ValueError(f"blocks of rows are FP8 grids with groups, got block_rows {self.block_rows}, "
                             f"fp8 {self.fp8}, group_size {self.group_size}")

    @property
    def nvfp4(self) -> bool:
        """NVFP4: E2M1 codes whose E4M3 group scales are in units of a per-tensor global scale."""
        return self.fp4 and not self.mx

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.fp8 or self.fp4 else torch.uint8

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return (in_features + g - 1) // g

    def ragged(self, in_features: int) -> bool:
        return in_features % self.group_len(in_features) != 0

    def cuts_blocks(self, r0: int, r1: int, step: int, out_features: int) -> bool:
        """Whether rows r0:r1:step of an [out_features, ...] layer on this grid split one of its blocks of rows."""
        b = self.block_rows
        return bool(b) and (r0 % b != 0 or step != 1 or (r1 % b != 0 and r1 < out_features))


@dataclass(frozen=True)
class InputScheme:
    """How a quantized linear's inputs are quantized as the model runs (W8A8): `bits` 8, int8 or E4M3 (`fp8`),
    symmetric, with one scale per token computed as it runs or, `static`, one per layer fixed at quantization time (its
    LayerQuant.input_scale); `group_size` > 0 (FP8 blocks' inputs, dynamic): one scale per token and group of that
    many consecutive channels. `mx` (dynamic, in groups): MX inputs, E2M1 (bits 4) or E4M3 (bits 8, fp8) codes with
    one power-of-two scale per token and group (the MX weights' rule, mx_scale). `fp4` (bits 4, static, in groups):
    NVFP4 inputs, E2M1 codes with an E4M3 scale per token and group in the units of a per-tensor global scale g fixed
    at quantization time (LayerQuant.input_scale holds g; solvers/input_scale.py)."""
    bits: int = 8
    fp8: bool = False
    static: bool = False
    group_size: int = -1
    mx: bool = False
    fp4: bool = False

    @property
    def grid(self) -> Grid:
        """An MX or NVFP4 scheme's grid of a token's group (its codes and scale rule)."""
        return Grid(self.bits, self.group_size, True, fp8=self.bits == 8, fp4=self.bits == 4, mx=self.mx)


def share_rows(v: torch.Tensor, block_rows: int, reduce=torch.amax) -> torch.Tensor:
    """v [..., rows] with each run of `block_rows` rows (the last may be shorter) replaced by its reduction."""
    rows = v.shape[-1]
    pad = -rows % block_rows
    tiles = reduce(torch.nn.functional.pad(v, (0, pad)).unflatten(-1, (-1, block_rows)), dim=-1)  # pads: 0
    return tiles.repeat_interleave(block_rows, dim=-1)[..., :rows]


def fit_params(W: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid parameters of each row of W [..., rows, cols] -> scale [..., rows], zero [..., rows] (fp32). With
    grid.block_rows, rows 0.. are output channels from a block's first (the range is the block's)."""
    wmin = W.amin(dim=-1).clamp(max=0)
    wmax = W.amax(dim=-1).clamp(min=0)
    if grid.sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        if grid.block_rows:
            wmax = share_rows(wmax, grid.block_rows)
        wmin = -wmax
    if grid.mx:
        return mx_scale(wmax, grid), torch.zeros_like(wmax)
    if grid.fp4:                                      # W is g · W here: the scale is an E4M3 number
        return e4m3_scale(wmax / E2M1_MAX), torch.zeros_like(wmax)
    dead = (wmin == 0) & (wmax == 0)
    wmin, wmax = torch.where(dead, -1.0, wmin), torch.where(dead, 1.0, wmax)
    if grid.fp8:
        return wmax / FP8_MAX, torch.zeros_like(wmax)
    scale = (wmax - wmin) / grid.maxq
    if grid.sym:
        zero = torch.full_like(scale, float((grid.maxq + 1) // 2))
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def search_params(W: torch.Tensor, grid: Grid, col_weight: torch.Tensor | None = None, steps: int = 26,
                  min_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid parameters minimising each row's column-weighted squared rounding error
    sum_j c_j (w_j - ŵ_j)^2 over shrunk ranges p·[min, max], p on `steps` points from 1 down to
    `min_shrink` (the `mse` option of the GPTQ reference code, with weights). Shrinking the range
    scales the min-max scale by p and leaves the zero point as it is (both ends shrink together).
    p = 1 is fit_params' min-max grid and wins ties, so the result is never worse than min-max on the
    weighted error. With grid.block_rows a block's rows take one p, by their summed error. MX grids (powers of two)
    try p = 1, 1/2 and 2.

    W [rows, cols], col_weight [cols] (None: all 1) -> scale [rows], zero [rows] (fp32)."""
    c = torch.ones(W.shape[1], device=W.device) if col_weight is None else col_weight
    scale0, zero = fit_params(W, grid)
    p = torch.tensor([1.0, 0.5, 2.0], device=W.device) if grid.mx else \
        torch.linspace(1.0, min_shrink, steps, device=W.device)
    chunk = max(1, (1 << 18) // max(W.numel(), 1))     # candidates per batch: <= 256k elements (stays in cache)
    z, errs = zero.unsqueeze(-1), []
    for k in range(0, len(p), chunk):
        s = (p[k:k + chunk, None] * scale0).unsqueeze(-1)           # [P, rows, 1]
        if grid.nvfp4:
            s = e4m3_scale(s)
        elif grid.mx:                                               # E8M0's range
            s = s.clamp(2.0 ** -127, 2.0 ** 127)
        D = round_codes(torch.div(W, s), z, grid)                   # [P, rows, cols] codes, then in place:
        D.sub_(z).mul_(s).sub_(W).square_().mul_(c)                 # c_j (ŵ - w)^2
        errs.append(D.sum(dim=-1))                                  # [P, rows]
    errs = torch.cat(errs)
    if grid.block_rows:
        errs = share_rows(errs, grid.block_rows, torch.sum)
    best = torch.argmin(errs, dim=0)                               # first minimum: p = 1 on ties
    scale = p[best] * scale0
    if grid.mx:
        scale = scale.clamp(2.0 ** -127, 2.0 ** 127)
    return (e4m3_scale(scale) if grid.nvfp4 else scale), zero


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E4M3 number (ties to even), saturating at ±448: a float8_e4m3fn tensor."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


E2M1_MAX = 6.0   # NVFP4's largest code
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e4m3_scale(s: torch.Tensor) -> torch.Tensor:
    """NVFP4 group scales (in the global scale's units) rounded to E4M3 numbers, fp32; 0 (a group of zeros, or one
    below E4M3's smallest number) becomes 0.125, as compressed-tensors makes it."""
    s8 = to_e4m3(s).float()
    return torch.where(s8 == 0, 0.125, s8)


MX_EMAX = {4: 2, 8: 8}   # floor(log2(largest code)): E2M1's 6, E4M3's 448


def mx_scale(absmax: torch.Tensor, grid: Grid) -> torch.Tensor:
    """MX group scales 2^e of groups with these absmax values (fp32): compressed-tensors' exponent (the module
    docstring), e in E8M0's [-127, 127] (a group of zeros takes 2^-127)."""
    m, k = torch.frexp(absmax.float())                         # absmax = m · 2^k, m in [0.5, 1)
    e = k - 1 + (m >= 0.875).int() - MX_EMAX[grid.bits]        # 2m = the significand; up from 1.75
    e = torch.where(absmax > 0, e, -127).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(absmax, dtype=torch.float32), e)


def mx_exponent(scale: torch.Tensor) -> torch.Tensor:
    """The E8M0 bytes (e + 127, uint8) of MX scales 2^e; refuses what is not a power of two in E8M0's range."""
    m, k = torch.frexp(scale.float())
    e = k - 1
    if not (torch.all(m == 0.5) and torch.all((e >= -127) & (e <= 127))):
        raise QForgeError("MX scales must be powers of two from 2^-127 to 2^127")
    return (e + 127).to(torch.uint8)


def to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E2M1 number, ties to the even one (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), saturating
    at ±6: fp32 (zero unsigned)."""
    ends = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    up = torch.tensor([False, True, False, True, False, True, False], device=x.device)   # a tie goes up
    ends = torch.where(up, torch.nextafter(ends, torch.zeros_like(ends)), ends)
    values = torch.tensor(E2M1, device=x.device)
    return torch.copysign(values[torch.bucketize(x.abs().contiguous(), ends)], x) + 0.0   # -0 -> +0, as packed


def nvfp4_global_scale(W: torch.Tensor) -> float:
    """g for NVFP4 (see the module docstring): 448 · 6 / max|W| in fp32, as compressed-tensors computes it (1 for
    zeros): the largest group's scale is then 448, E4M3's largest."""
    m = W.abs().amax().float() if W.numel() else torch.tensor(0.0)
    return float(torch.tensor(FP8_MAX * E2M1_MAX) / m) if m > 0 else 1.0


def round_codes(x: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes (fp32) of x = w / scale: round(x) + zero clamped to [0, maxq], in place on x; FP8: x rounded to the
    nearest E4M3 number (ties to even, saturating at ±448; zero is 0), also in place; NVFP4: to E2M1 (to_e2m1)."""
    if grid.fp8:
        return x.copy_(to_e4m3(x))
    if grid.fp4:
        return x.copy_(to_e2m1(x))
    return x.round_().add_(zero).clamp_(0, grid.maxq)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes of W [rows, cols] on the grid of scale/zero [..., rows] (broadcast over columns), as fp32."""
    return round_codes(W / scale.unsqueeze(-1), zero.unsqueeze(-1), grid)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))


def group_index(in_features: int, grid: Grid) -> torch.Tensor:
    """In-order g_idx [in]: column j belongs to group j // group_size."""
    return torch.arange(in_features, dtype=torch.int32) // grid.group_len(in_features)


@dataclass
class LayerQuant:
    """One quantized linear: everything a packed format needs, in plain tensors.

    codes  [out, in]      uint8 integer codes (float8_e4m3fn for an FP8 grid), in the layer's original column order
    scales [out, groups]  fp32
    zeros  [out, groups]  fp32 holding integers (constant 2^(bits-1) when sym)
    g_idx  [in]           int32 group of each input column
    input_scale [1]       fp32 static scale of the layer's input (act_static W8A8: x_q = round(x / input_scale)),
                          set by the pipeline once the layer is solved; None when inputs are dynamic or unquantized
                          (NVFP4 inputs: their global scale g, x_q = e2m1(x / (e4m3(g · max|x_group| / 6) / g)))
    global_scale [1]      fp32 NVFP4's global scale g (its scales are E4M3 numbers in units of 1 / g:
                          w_hat = scale · code / g); None for other grids
    """

    grid: Grid
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    info: dict
    w_hat: torch.Tensor | None = None  # the solver's own reconstruction, for a consistency check; not saved
    row_loss: torch.Tensor | None = None  # [out] the solver's loss of each output row (GPTQ); not saved
    input_scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """W_hat [out, in] fp32, a few rows at a time: the gathered scales and zeros of the whole matrix would
        take three times its size in temporaries (2.8 GB for a 28672 x 8192 layer)."""
        g = self.g_idx.long()
        W_hat = torch.empty(self.codes.shape, dtype=torch.float32, device=self.codes.device)
        for rows in row_slices(*self.codes.shape):
            torch.mul(self.scales[rows][:, g], self.codes[rows].float() - self.zeros[rows][:, g], out=W_hat[rows])
        if self.global_scale is not None:                           # NVFP4: s8 · code / g, the solver's order
            W_hat /= self.global_scale.to(W_hat.device)
        return W_hat

    def rows(self, r0: int, r1: int, step: int = 1) -> "LayerQuant":
        """Output rows r0:r1:step as a layer of their own (rows solved as one matrix, then split; every other row:
        GPT-OSS's interleaved gate/up)."""
        if self.grid.cuts_blocks(r0, r1, step, self.shape[0]):
            raise QForgeError(f"rows {r0}:{r1}:{step} of a layer quantized in blocks of {self.grid.block_rows} rows "
                              f"cut its blocks")
        info = dict(self.info)
        if self.row_loss is not None:
            info["loss"] = float(self.row_loss[r0:r1:step].sum())
        cut = (lambda t: None if t is None else t[r0:r1:step].clone())  # own storage: saved as separate tensors
        return LayerQuant(self.grid, cut(self.codes), cut(self.scales), cut(self.zeros), self.g_idx.clone(), info,
                          cut(self.w_hat), cut(self.row_loss), self.input_scale,
                          None if self.global_scale is None else self.global_scale.clone())

    def on_meta(self) -> "LayerQuant":
        """The layer without its values: tensors on the meta device (shapes, dtypes), grid and info kept; what a
        streamed run holds of a block once its codes are on disk."""
        meta = (lambda t: t.to("meta"))
        return LayerQuant(self.grid, meta(self.codes), meta(self.scales), meta(self.zeros), meta(self.g_idx),
                          self.info, input_scale=self.input_scale, global_scale=self.global_scale)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]
