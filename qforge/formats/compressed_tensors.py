"""compressed-tensors "pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized",
"mxfp4-pack-quantized" and "mxfp8-quantized" (llm-compressor's formats, read by vLLM and transformers), written and
read through the compressed-tensors library.

Per quantized linear NAME with W [out, in], b bits, G groups (in order; act-order only with static groups):
  weight_packed      int32 [out, ceil(in * b / 32)]  signed codes + 2^(b-1), packed along the input as a
                                                     little-endian bit stream (the library's pack_to_int32)
  weight_scale       [out, G] (the export dtype)
  weight_zero_point  int32 [ceil(out * b / 32), G]   asymmetric only: signed zero points packed along out
  weight_shape       int64 [2]                       (out, in)
Dequantization: W[o, i] = weight_scale[o, i // group] * (q_signed[o, i] - zp_signed[o, i // group]).
qforge's unsigned codes/zeros are the signed ones + 2^(b-1). Per-channel grids use strategy "channel"
(G = 1). config.json's quantization_config lists one config group per distinct scheme.

"int-quantized" (W8A8, `act_bits` 8: what vLLM runs on int8 GEMMs), per quantized linear:
  weight             int8 [out, in]                  signed codes (q - 2^(b-1)), unpacked
  weight_scale       [out, 1] (the export dtype)     per channel ([1]: per tensor, as other tools may write)
  weight_zero_point  int8 [out, 1]                   asymmetric only
and each config group's input_activations: 8-bit int, symmetric, dynamic, strategy "token" (one scale per
token, max|x| / 127, computed as the layer runs; nothing stored), or static (`act_static`), strategy "tensor":
  input_scale        fp32 [1]                        x_q = clamp(round(x / input_scale), -128, 127), every token
qforge reads those two input schemes only (symmetric).

"float-quantized" (FP8 weights, solvers/grid.py's E4M3 grid; FP8_DYNAMIC with `act_bits` 8), per quantized linear:
  weight             float8_e4m3fn [out, in]         the E4M3 codes
  weight_scale       [out, 1] (the export dtype)     per channel ([1]: per tensor, as other tools may write)
Dequantization: W[o, i] = weight_scale[o] * weight[o, i]. With `act_bits` the config groups' input_activations are
8-bit float, dynamic, strategy "token" (max|x| / 448 per token, computed as the layer runs), or static, strategy
"tensor", with the layer's input_scale (x_q = fp8(x / input_scale)). Weights stored per tensor (llm-compressor's
FP8 scheme) are read as per channel, every row taking the one scale.
FP8 blocks (QuantizeConfig.fp8_block; llm-compressor's FP8_BLOCK), weights strategy "block", block_structure [R, C]:
  weight_scale       [ceil(out / R), in / C]         one per R x C tile
Dequantization: W[o, i] = weight_scale[o // R, i // C] * weight[o, i]
and with `act_bits` input_activations 8-bit float, dynamic, strategy "group", group_size C (max|x| / 448 per token
and group of C channels). qforge writes square tiles (R = C = group_size); `in` must be a multiple of C.

"nvfp4-pack-quantized" (NVFP4A16, QuantizeConfig.nvfp4; solvers/grid.py's NVFP4 grid), weights strategy
"tensor_group", group_size 16, scale_dtype float8_e4m3fn:
  weight_packed        uint8 [out, in / 2]            E2M1 codes, two a byte: column 2j in the low nibble, 2j+1 in the
                                                      high one; a nibble is sign (bit 3) and the index of |code| in
                                                      0, 0.5, 1, 1.5, 2, 3, 4, 6 (the library's pack_fp4_to_uint8)
  weight_scale         float8_e4m3fn [out, in / 16]   s8, each group's scale in global units
  weight_global_scale  fp32 [1]                       g
Dequantization: W[o, i] = weight_scale[o, i // 16] / g * code[o, i] (LayerQuant's scales are s8, its global_scale g;
the library multiplies by s8 / g: at most an ulp away). With `act_bits` 4 (llm-compressor's NVFP4, W4A4) the config
groups' input_activations are 4-bit float, strategy "tensor_group", group_size 16, dynamic "local" (each token's
groups' E4M3 scales computed as the layer runs) under a calibrated global scale per layer:
  input_global_scale   fp32 [1]                       448 · 6 / max|x| over the calibration set (its input_scale)

"mxfp4-pack-quantized" / "mxfp8-quantized" (MXFP4A16 / MXFP8A16, QuantizeConfig.mx; solvers/grid.py's MX grids),
weights 4-bit / 8-bit float, strategy "group", group_size 32, scale_dtype uint8:
  weight_packed        uint8 [out, in / 2]            MXFP4: E2M1 codes two a byte, as nvfp4-pack-quantized packs them
  weight               float8_e4m3fn [out, in]        MXFP8: the E4M3 codes
  weight_scale         uint8 [out, in / 32]           E8M0: each group's scale is 2^(byte - 127)
Dequantization: W[o, i] = 2^(weight_scale[o, i // 32] - 127) * code[o, i] (exact). With `act_bits` (MXFP4 / MXFP8,
W4A4 / W8A8) the config groups' input_activations are the same type, dynamic, strategy "group", group_size 32, uint8
scales: each token's group of 32 channels on the weights' grid as the layer runs (nothing stored).

FP8 KV cache (QuantizeConfig.kv_cache "fp8"; any of the formats above): quantization_config's kv_cache_scheme is
8-bit float, symmetric, static, strategy "tensor", and each attention module ATTN (model.layers.3.self_attn) stores
  ATTN.k_scale, ATTN.v_scale   fp32 [1]               the cache holds fp8(k / k_scale), fp8(v / v_scale)
(capture/kv_range.py; llm-compressor's names, which vLLM maps to its attention layers with --kv-cache-dtype fp8).
"""
from __future__ import annotations

import re

import torch

from ..errors import QForgeError
from ..solvers import Grid, InputScheme, LayerQuant, group_index
from ..solvers.grid import mx_exponent
from ..utils.tensors import row_slices

NAME = "compressed-tensors"
KEYS = ("weight_scale", "weight_packed", "weight_zero_point", "weight_shape", "weight",  # first: in every layout
        "input_scale", "weight_global_scale", "input_global_scale")
BITS = (2, 3, 4, 5, 6, 7, 8)
FORMAT_NAMES = ("pack-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
                "mxfp8-quantized")
KV_SCALE_KEYS = ("k_scale", "v_scale")          # an attention module's FP8 KV cache scales
MIXED = True                 # per-layer schemes: one config group per scheme


def _args(grid: Grid):
    from compressed_tensors.quantization import QuantizationArgs

    if grid.block_rows:
        return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="block",
                                block_structure=[grid.block_rows, grid.group_size])
    if grid.mx:
        return QuantizationArgs(num_bits=grid.bits, type="float", symmetric=True, strategy="group",
                                group_size=grid.group_size, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    if grid.fp4:
        return QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                                group_size=grid.group_size, scale_dtype=torch.float8_e4m3fn,
                                zp_dtype=torch.float8_e4m3fn)
    if grid.group_size == -1:
        return QuantizationArgs(num_bits=grid.bits, type="float" if grid.fp8 else "int", symmetric=grid.sym,
                                strategy="channel")
    return QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.sym, strategy="group",
                            group_size=grid.group_size)


def _scheme(grid: Grid, targets: list[str], acts: InputScheme | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    inputs = None
    if acts is not None and (acts.mx or acts.fp4):     # MX: dynamic; NVFP4: group scales dynamic, a global one fixed
        inputs = _args(acts.grid).model_copy(update=dict(dynamic=True) if acts.mx else
                                             dict(dynamic="local", observer="static_minmax"))
    elif acts is not None:
        how = dict(dynamic=False, strategy="tensor", observer="static_minmax") if acts.static else \
            dict(dynamic=True, strategy="token") if acts.group_size == -1 else \
            dict(dynamic=True, strategy="group", group_size=acts.group_size)
        inputs = QuantizationArgs(num_bits=acts.bits, type="float" if acts.fp8 else "int", symmetric=True, **how)
    return QuantizationScheme(targets=targets, weights=_args(grid), input_activations=inputs)


def check(name: str, shape: tuple[int, int], grid: Grid | None, in_order: bool) -> None:
    """Refuse what this format cannot store (`grid` None: the shape alone, before a scheme is chosen)."""
    if grid is None:
        return
    if grid.bits not in BITS:
        raise QForgeError(f"{name}: compressed-tensors pack-quantized stores 2 to 8 bits (this layer has {grid.bits})")
    if grid.nvfp4 and grid.group_size != 16:
        raise QForgeError(f"{name}: compressed-tensors nvfp4-pack-quantized stores groups of 16, not {grid.group_size}")
    if grid.mx and grid.group_size != 32:
        raise QForgeError(f"{name}: compressed-tensors stores MX weights in groups of 32, not {grid.group_size}")
    if grid.fp8 and grid.group_size != -1 and not (grid.block_rows or grid.mx):
        raise QForgeError(f"{name}: compressed-tensors float-quantized is written per channel or in blocks here, "
                          f"not in groups")
    if not in_order:
        raise QForgeError(f"{name}: compressed-tensors stores groups in column order only; quantize with "
                          f"--static-groups (or without --act-order), or export as 'gptq'")
    if grid.ragged(shape[1]):
        raise QForgeError(f"{name}: group size {grid.group_size} does not divide {shape[1]}; "
                          f"compressed-tensors needs whole groups")


def pack(q: LayerQuant, dtype: torch.dtype = torch.float16, acts: InputScheme | None = None) -> dict[str, torch.Tensor]:
    """The layer's tensors: pack-quantized, or int-quantized when its inputs are quantized too (`acts`), or
    float-quantized (an FP8 grid); a static input scheme adds the layer's input scale."""
    out = _pack_weight(q, dtype, acts)
    if acts is not None and acts.static:
        if q.input_scale is None:
            raise QForgeError("static input quantization needs the layer's calibrated input_scale")
        out["input_global_scale" if acts.fp4 else "input_scale"] = q.input_scale.float().reshape(1)   # NVFP4: g
    return out


def _pack_weight(q: LayerQuant, dtype: torch.dtype, acts: InputScheme | None) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.naive_quantized.base import (FloatQuantizationCompressor,
                                                                     IntQuantizationCompressor)
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    if q.grid.mx:
        return _pack_mx(q)
    if q.grid.fp4:
        if q.global_scale is None:
            raise QForgeError("an NVFP4 layer needs its global scale")
        g, s8 = q.global_scale.float().reshape(1), q.scales.float()
        if not torch.equal(s8.to(torch.float8_e4m3fn).float(), s8):
            raise QForgeError("an NVFP4 layer's scales are not E4M3 numbers")
        W_hat = s8[:, q.g_idx.long()] / g * q.codes.float()             # the library's order: divides back exactly
        state = {"weight": W_hat, "weight_scale": s8, "weight_global_scale": g}
        return dict(NVFP4PackedCompressor.compress(state, _scheme(q.grid, ["Linear"])))
    if q.grid.fp8:
        scale = q.scales.to(dtype)                                       # [out, 1] (blocks: [out, G])
        W_hat = scale.float()[:, q.g_idx.long()] * q.codes.float()       # exactly scale * code: divides back exactly
        if q.grid.block_rows:                                            # one scale per tile: [ceil(out / R), G]
            scale = scale[::q.grid.block_rows].contiguous()
            if not torch.equal(scale.repeat_interleave(q.grid.block_rows, 0)[:q.shape[0]], q.scales.to(dtype)):
                raise QForgeError(f"a layer quantized in blocks of {q.grid.block_rows} rows has scales that differ "
                                  f"inside a block")
        return dict(FloatQuantizationCompressor.compress({"weight": W_hat, "weight_scale": scale},
                                                         _scheme(q.grid, ["Linear"], acts)))
    half = 1 << (q.grid.bits - 1)
    scale = q.scales.to(dtype)                                           # [out, G]
    zp = (q.zeros - half).round().to(torch.int8)                         # signed zero points [out, G]
    g = q.g_idx.long()
    W_hat = scale.float()[:, g] * (q.codes.float() - q.zeros[:, g])      # exactly on the stored grid
    state = {"weight": W_hat, "weight_scale": scale, "weight_zero_point": zp}
    if acts is not None:
        return dict(IntQuantizationCompressor.compress(state, _scheme(q.grid, ["Linear"], acts)))
    out = dict(PackedQuantizationCompressor.compress(state, _scheme(q.grid, ["Linear"])))
    out.pop("weight", None)
    return out


def _pack_mx(q: LayerQuant) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor

    mx_exponent(q.scales)                                                # refuses scales that are not powers of two
    W_hat = q.scales[:, q.g_idx.long()] * q.codes.float()                # exact: divides back exactly
    compressor = MXFP4PackedCompressor if q.grid.fp4 else MXFP8QuantizationCompressor
    return dict(compressor.compress({"weight": W_hat, "weight_scale": q.scales.float()}, _scheme(q.grid, ["Linear"])))


def unpack(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    q = _unpack_weight(t, grid)
    if "input_scale" in t or "input_global_scale" in t:             # static inputs: one scale for every token
        s = t["input_scale" if "input_scale" in t else "input_global_scale"].float().reshape(-1)   # NVFP4: g
        if s.numel() != 1 or not 0 < s.item() < float("inf"):       # not NaN, 0 or inf
            raise QForgeError(f"input_scale must be one positive number (per tensor), got {s[:4].tolist()}")
        q.input_scale = s.clone()
    return q


def _unpack_weight(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if grid.mx:
        return _unpack_mx(t, grid)
    if grid.fp4:
        return _unpack_fp4(t, grid)
    if "weight_packed" not in t:
        return _unpack_float(t, grid) if grid.fp8 else _unpack_int(t, grid)
    shape = tuple(int(s) for s in t["weight_shape"].tolist())
    half = 1 << (grid.bits - 1)
    codes = torch.empty(shape, dtype=torch.uint8)
    for r in row_slices(*shape):                                     # ~1M codes a call: 6x faster than whole
        rows = unpack_from_int32(t["weight_packed"][r], grid.bits, torch.Size((r.stop - r.start, shape[1])))
        codes[r] = (rows.to(torch.int16) + half).to(torch.uint8)
    scales = t["weight_scale"].float().reshape(shape[0], -1)
    if "weight_zero_point" in t and not grid.sym:
        zp = unpack_from_int32(t["weight_zero_point"], grid.bits, torch.Size(scales.shape), packed_dim=0)
        zeros = zp.float() + half
    else:
        zeros = torch.full_like(scales, float(half))
    return LayerQuant(grid, codes, scales, zeros, group_index(shape[1], grid), info={})


def _unpack_int(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    """int-quantized: int8 codes stored whole."""
    w = t.get("weight")
    if w is None or w.dtype != torch.int8 or w.dim() != 2:
        raise QForgeError("int-quantized layers store an int8 [out, in] weight")
    half = 1 << (grid.bits - 1)
    codes = (w.to(torch.int16) + half).to(torch.uint8)
    G = grid.n_groups(w.shape[1])
    # [out, G], or [1] (per tensor): every channel takes it
    scales = t["weight_scale"].float().reshape(-1, G).expand(w.shape[0], G).contiguous()
    zp = t.get("weight_zero_point")
    zeros = (zp.float().reshape(-1, G).expand(w.shape[0], G) + half if zp is not None and not grid.sym
             else torch.full_like(scales, float(half)))
    return LayerQuant(grid, codes, scales, zeros.contiguous(), group_index(w.shape[1], grid), info={})


def _unpack_float(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    """float-quantized: E4M3 codes stored whole, a scale per channel (or one per tensor), or one per tile (blocks)."""
    w = t.get("weight")
    if w is None or w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        raise QForgeError("float-quantized layers store a float8_e4m3fn [out, in] weight")
    out_f, in_f = w.shape
    if grid.block_rows:
        tiles = (-(-out_f // grid.block_rows), grid.n_groups(in_f))
        if tuple(t["weight_scale"].shape) != tiles:
            raise QForgeError(f"a [{out_f}, {in_f}] weight in {grid.block_rows} x {grid.group_size} blocks needs a "
                              f"{list(tiles)} weight_scale, got {list(t['weight_scale'].shape)}")
        scales = t["weight_scale"].float().repeat_interleave(grid.block_rows, 0)[:out_f].contiguous()
    else:
        scales = t["weight_scale"].float().reshape(-1, 1).expand(out_f, 1).contiguous()
    return LayerQuant(grid, w, scales, torch.zeros_like(scales), group_index(in_f, grid), info={})


def _unpack_fp4(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    """nvfp4-pack-quantized: E2M1 codes two a byte, E4M3 group scales, a global scale."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    packed, s8, g = t.get("weight_packed"), t.get("weight_scale"), t.get("weight_global_scale")
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 2 or s8 is None or g is None:
        raise QForgeError("nvfp4-pack-quantized layers store a uint8 weight_packed, a weight_scale and a "
                          "weight_global_scale")
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    if tuple(s8.shape) != (out_f, grid.n_groups(in_f)) or g.numel() != 1 or not float(g) > 0:
        raise QForgeError(f"an NVFP4 [{out_f}, {in_f}] weight needs a [{out_f}, {grid.n_groups(in_f)}] weight_scale "
                          f"and one positive global scale, got {list(s8.shape)} and {g.flatten()[:2].tolist()}")
    codes = unpack_fp4_from_uint8(packed, out_f, in_f, dtype=torch.float32).to(torch.float8_e4m3fn)
    scales = s8.float()
    return LayerQuant(grid, codes, scales, torch.zeros_like(scales), group_index(in_f, grid), info={},
                      global_scale=g.float().reshape(1).clone())


def _unpack_mx(t: dict[str, torch.Tensor], grid: Grid) -> LayerQuant:
    """mxfp4-pack-quantized (E2M1 codes two a byte) or mxfp8-quantized (E4M3 codes), E8M0 group scales."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    w, e = t.get("weight_packed" if grid.fp4 else "weight"), t.get("weight_scale")
    dtype = torch.uint8 if grid.fp4 else torch.float8_e4m3fn
    if w is None or w.dtype != dtype or w.dim() != 2 or e is None or e.dtype != torch.uint8:
        raise QForgeError(f"MX layers store a {dtype} {'weight_packed' if grid.fp4 else 'weight'} and a uint8 "
                          f"weight_scale")
    out_f, in_f = w.shape[0], w.shape[1] * (2 if grid.fp4 else 1)
    if tuple(e.shape) != (out_f, grid.n_groups(in_f)) or bool((e == 255).any()):
        raise QForgeError(f"an MX [{out_f}, {in_f}] weight needs a [{out_f}, {grid.n_groups(in_f)}] weight_scale of "
                          f"E8M0 exponents (255 is NaN), got {list(e.shape)}")
    codes = unpack_fp4_from_uint8(w, out_f, in_f, dtype=torch.float32).to(torch.float8_e4m3fn) if grid.fp4 else w
    scales = torch.ldexp(torch.ones(e.shape), e.to(torch.int32) - 127)
    return LayerQuant(grid, codes, scales, torch.zeros_like(scales), group_index(in_f, grid), info={})


def build_config(grids: dict[str, Grid], ignore: list[str], acts: InputScheme | None = None, kv_fp8: bool = False):
    """The library's QuantizationConfig: one config group per distinct grid (int-quantized with quantized inputs,
    `acts`, float-quantized for FP8 grids); `kv_fp8`: with the FP8 KV cache scheme, whose scales the attention
    modules store."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

    by_grid: dict[Grid, list[str]] = {}
    for name, grid in grids.items():
        by_grid.setdefault(grid, []).append(name)
    if len(by_grid) == 1:
        groups = {"group_0": _scheme(next(iter(by_grid)), ["Linear"], acts)}
    else:
        groups = {f"group_{i}": _scheme(g, sorted(names), acts)
                  for i, (g, names) in enumerate(by_grid.items())}
    fmt = _format_name(by_grid, acts)
    kv = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False) if kv_fp8 \
        else None
    return QuantizationConfig(config_groups=groups, format=fmt, kv_cache_scheme=kv,
                              quantization_status="compressed", ignore=ignore)


def _format_name(grids, acts: InputScheme | None) -> str:
    """The checkpoint's format, from its grids (several: mixed precision, integer grids)."""
    if any(g.mx for g in grids):
        if len(grids) > 1:
            raise QForgeError("MX weights are exported with one grid for every layer")
        return "mxfp4-pack-quantized" if next(iter(grids)).fp4 else "mxfp8-quantized"
    return "float-quantized" if any(g.fp8 for g in grids) else "nvfp4-pack-quantized" if any(
        g.fp4 for g in grids) else "int-quantized" if acts else "pack-quantized"


def kv_cache_fp8(qc: dict) -> bool:
    """Whether a quantization_config has the FP8 KV cache scheme (per-tensor static scales: the k_scale / v_scale
    tensors); False without a kv_cache_scheme, another one refused."""
    kv = qc.get("kv_cache_scheme")
    if not kv:
        return False
    if not (kv.get("type") == "float" and kv.get("num_bits") == 8 and kv.get("strategy") == "tensor"
            and not kv.get("dynamic") and kv.get("symmetric", True)):
        raise QForgeError(f"compressed-tensors kv_cache_scheme {_describe(kv)} is not supported (qforge runs the FP8 "
                          f"cache with static per-tensor scales)")
    return True


def input_acts(qc: dict) -> InputScheme | None:
    """The input scheme a quantization_config's layers quantize their inputs with (symmetric int8 or FP8, dynamic per
    token or static per tensor, FP8 dynamic per token and group of channels, or MX: the schemes qforge runs; a static
    one's scales are its layers' input_scale tensors), or None when they take unquantized inputs; another input
    scheme is refused."""
    found = set()
    for name, group in (qc.get("config_groups") or {}).items():
        a = group.get("input_activations")
        if not a:
            found.add(None)
            continue
        how, fp8 = (a.get("dynamic"), a.get("strategy")), a.get("type") == "float"
        grouped = how == (True, "group") and fp8 and (a.get("group_size") or 0) > 0
        if grouped and a.get("num_bits") in (4, 8) and "uint8" in str(a.get("scale_dtype")):   # MX inputs
            found.add(InputScheme(a["num_bits"], a["num_bits"] == 8, False, int(a["group_size"]), mx=True))
            continue
        if how == ("local", "tensor_group") and fp8 and a.get("num_bits") == 4 and (a.get("group_size") or 0) > 0:
            found.add(InputScheme(4, False, True, int(a["group_size"]), fp4=True))     # NVFP4 inputs
            continue
        if not (a.get("type", "int") in ("int", "float") and a.get("symmetric", True) and a.get("num_bits") == 8
                and (how in ((True, "token"), (False, "tensor")) or grouped)):
            raise QForgeError(f"compressed-tensors config group {name}: input activations {_describe(a)} are not "
                              f"supported (qforge runs symmetric int8 or FP8 inputs, dynamic per token or static per "
                              f"tensor, FP8 dynamic per token in groups, MX or NVFP4)")
        found.add(InputScheme(8, fp8, how == (False, "tensor"), int(a["group_size"]) if grouped else -1))
    if len(found) > 1:
        raise QForgeError("compressed-tensors config groups with different input quantizations (or none) are not "
                          "supported")
    return next(iter(found), None)


def _describe(a: dict) -> str:
    return (f"{a.get('num_bits')}-bit {a.get('type', 'int')} {a.get('strategy')} "
            f"{'dynamic' if a.get('dynamic') else 'static'} "
            f"{'symmetric' if a.get('symmetric', True) else 'asymmetric'}")


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def grid_for(qc: dict, name: str) -> Grid:
    """The grid of module `name` from a config.json quantization_config (first matching config group)."""
    for group in qc.get("config_groups", {}).values():
        targets = group.get("targets", [])
        if any(_matches(t, name) for t in targets) or "Linear" in targets:
            w = group.get("weights") or {}
            if w.get("type", "int") == "float":
                block = w.get("block_structure") or []
                if w.get("num_bits") in (4, 8) and w.get("strategy") == "group" and w.get("group_size") == 32 \
                        and "uint8" in str(w.get("scale_dtype")):
                    return Grid(w["num_bits"], 32, True, fp8=w["num_bits"] == 8, fp4=w["num_bits"] == 4, mx=True)
                if w.get("num_bits") == 4 and w.get("strategy") == "tensor_group" and w.get("group_size") == 16:
                    return Grid(4, 16, True, fp4=True)
                if w.get("num_bits") == 8 and w.get("strategy") == "block" and len(block) == 2 and min(block) > 0:
                    return Grid(8, int(block[1]), True, fp8=True, block_rows=int(block[0]))
                if not (w.get("num_bits") == 8 and w.get("strategy") in ("channel", "tensor")):
                    raise QForgeError(f"{name}: compressed-tensors float weights are read as 8-bit E4M3 per channel, "
                                      f"tensor or block, NVFP4 (4-bit tensor_group of 16) or MX (4 or 8-bit "
                                      f"groups of 32, uint8 scales), not "
                                      f"{w.get('num_bits')}-bit per {w.get('strategy')}")
                return Grid(8, -1, True, fp8=True)
            if w.get("type", "int") != "int":
                raise QForgeError(f"{name}: compressed-tensors {w.get('type')} weights are not supported")
            gs = w.get("group_size") if w.get("strategy") == "group" else -1
            return Grid(int(w["num_bits"]), int(gs or -1), bool(w.get("symmetric", True)))
    raise QForgeError(f"{name}: no compressed-tensors config group targets this module")
