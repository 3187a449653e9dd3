"""Simulated (fake) quantization of activations and of the KV cache, for evaluation.

Values are rounded to their integer grid and dequantized at once; the math stays in floating point,
so the perplexity shows the grid's damage, not a kernel's speed (as in arXiv 2402.18158).

- Activations (`--act-bits`): the input of every quantized linear, per token (one scale per row of
  the last dimension), symmetric and dynamic, as vLLM's int8 kernels quantize a W8A8 layer's input:
      s = max|x| / (2^(b-1) - 1),   x̂ = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) · s
  or, FP8 (`fp8`, 8 bits), to the nearest E4M3 number, as vLLM quantizes an FP8_DYNAMIC layer's input:
      s = max|x| / 448,   x̂ = fp8(x / s) · s
  (FP8 blocks' inputs, `group_size` g: the same per token and run of g channels, vLLM's per-token-group quantization)
  or, MX (`mx`, groups of g = 32), each token's run of g channels on the MX weights' grid (solvers/grid.py): a
  power-of-two scale s = mx_scale(max|x|), x̂ = e2m1(x / s) · s (4 bits) or fp8(x / s) · s (8 bits)
  or, NVFP4 (`fp4`, groups of g = 16, with each linear's calibrated global scale G, its `scales` entry), as
  compressed-tensors computes it: s8 = e4m3(G · max|x| / 6) (0 -> 0.125), e = s8 / G, x̂ = e2m1(x / e) · e
  or, static (`scales`: each linear's calibrated input_scale s, one for all tokens), the same with s fixed:
      x̂ = clamp(round(x / s), -128, 127) · s   or   x̂ = fp8(x / s) · s   (saturating at ±448 · s)
- KV cache (`--kv-bits`): keys and values as the attention layer writes them into its cache (keys
  after the rotary embedding), per token and head in groups of `group_size` channels of head_dim
  (-1: the whole head), asymmetric min-max:
      s = (max - min) / (2^b - 1),  z = round(-min / s),  x̂ = (clamp(round(x / s) + z, 0, 2^b - 1) - z) · s
  The quantization happens in the cache's `update`, so attention reads only quantized keys and values.
  FP8 (`--kv-fp8`): keys and values cast to E4M3 with a per-tensor scale of 1, as vLLM's `--kv-cache-dtype fp8`
  stores them when the checkpoint carries no calibrated k/v scales: x̂ = fp8(clamp(x, -448, 448)); with a model's
  calibrated scales (QuantizeConfig.kv_cache "fp8": each attention layer's k_scale and v_scale, capture/kv_range.py)
  x̂ = fp8(x / s) · s, saturating at ±448 · s.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import QForgeError
from ..models.arch import linear_modules
from ..solvers.grid import E2M1_MAX, FP8_MAX, InputScheme, e4m3_scale, mx_scale, round_codes, to_e2m1, to_e4m3
from ..solvers.input_scale import fake_quant_static

log = logging.getLogger(__name__)


def fake_quant_per_token(x: torch.Tensor, bits: int, divisor: float | None = None) -> torch.Tensor:
    """Symmetric dynamic fake quantization of x [..., channels], one scale per row: max|x| / divisor, by default
    2^(b-1) - 1 (vLLM's kernels: 127 at 8 bits); compressed-tensors' own fake quantization (llm-compressor's model
    objects) divides by (2^b - 1) / 2 = 127.5 and clamps the largest code."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / (divisor or qmax)).clamp_min(1e-12)
    return (torch.clamp(torch.round(xf / s), -qmax - 1, qmax) * s).to(x.dtype)


def fake_quant_fp8_per_token(x: torch.Tensor, group_size: int = -1) -> torch.Tensor:
    """Dynamic per-token FP8 (E4M3) fake quantization of x [..., channels]: one scale max|x| / 448 per row, or per
    row and group of `group_size` channels (the last group of a width it does not divide is shorter)."""
    def fq(xf):
        s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
        return to_e4m3(xf / s).float() * s
    return _in_groups(x, x.shape[-1] if group_size == -1 else group_size, fq)


def _in_groups(x: torch.Tensor, group_size: int, fq) -> torch.Tensor:
    """fq applied to x [..., d] in groups of `group_size` channels: fq(xf) for xf [..., groups, group_size] fp32 (a
    last group of a width it does not divide padded with zeros, which change no group's max), back in x's shape and
    dtype."""
    d = x.shape[-1]
    xf = torch.nn.functional.pad(x.float(), (0, -d % group_size)).unflatten(-1, (-1, group_size))
    return fq(xf).flatten(-2)[..., :d].to(x.dtype)


def fake_quant_mx(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Dynamic MX fake quantization of x [..., channels] (the module docstring): E2M1 (4 bits) or E4M3 (8) codes, one
    power-of-two scale per row and group of `group_size` channels (compressed-tensors' dynamic MX inputs)."""
    grid = InputScheme(bits, bits == 8, group_size=group_size, mx=True).grid

    def fq(xf):
        s = mx_scale(xf.abs().amax(dim=-1, keepdim=True), grid)
        return round_codes(xf / s, None, grid) * s
    return _in_groups(x, group_size, fq)


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, group_size: int = 16) -> torch.Tensor:
    """NVFP4 fake quantization of x [..., channels] (the module docstring): per row and group of `group_size`
    channels an E4M3 scale in the units of `global_scale` g [1], E2M1 codes."""
    g = global_scale.float().to(x.device)

    def fq(xf):
        eff = e4m3_scale(g * (xf.abs().amax(dim=-1, keepdim=True) / E2M1_MAX)) / g
        return to_e2m1(xf / eff) * eff
    return _in_groups(x, group_size, fq)


def fake_quant_groups_asym(x: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """Asymmetric min-max fake quantization of x [..., d] in groups of `group_size` along d.

    The range is each group's own [min, max] (KIVI's convention for keys and values): unlike the weight
    grid (`solvers.grid.fit_params`) it is not widened to contain 0, since no cached value needs an exact zero.
    """
    d = x.shape[-1]
    g = d if group_size == -1 else group_size
    if d % g:
        raise QForgeError(f"KV group size {group_size} does not divide the head dimension {d}")
    maxq = 2**bits - 1
    xg = x.float().reshape(*x.shape[:-1], d // g, g)
    lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    s = ((hi - lo) / maxq).clamp_min(1e-12)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(xg / s) + z, 0, maxq)
    return ((q - z) * s).reshape(x.shape).to(x.dtype)


class QuantizedKVCache(DynamicCache):
    """A DynamicCache whose keys and values are fake-quantized as they are written (FP8 with `scales`: {layer index:
    (k_scale, v_scale)}, every layer's; scale 1 without). `keep` False: nothing is cached, update() hands back the
    quantized states (one forward without a past, block by block: eval/streamed.py)."""

    def __init__(self, config, bits: int, group_size: int = -1, fp8: bool = False,
                 scales: dict[int, tuple[float, float]] | None = None, keep: bool = True):
        super().__init__(config=config)
        self.kv_bits, self.kv_group_size, self.kv_fp8, self.scales = bits, group_size, fp8, scales
        self.keep = keep

    def _quantize(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:          # [B, heads, T, head_dim]
        if self.kv_fp8:
            return (to_e4m3(x.float() / scale).float() * scale).to(x.dtype)
        return fake_quant_groups_asym(x, self.kv_bits, self.kv_group_size)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.scales is not None and layer_idx not in self.scales:
            raise QForgeError(f"cache layer {layer_idx} has no FP8 KV scales")
        ks, vs = self.scales[layer_idx] if self.scales is not None else (1.0, 1.0)
        k, v = self._quantize(key_states, ks), self._quantize(value_states, vs)
        return super().update(k, v, layer_idx, *args, **kwargs) if self.keep else (k, v)


def kv_cache_factory(model: nn.Module, bits: int | None, group_size: int = -1, fp8: bool = False,
                     scales: dict[str, torch.Tensor] | None = None, keep: bool = True):
    """A zero-argument callable making a fresh quantizing cache per forward, or None (no KV quantization).
    `scales`: a model's FP8 KV scales (QModel.kv_scales: "<attention module>.k_scale" / ".v_scale"), FP8 only.
    `keep`: QuantizedKVCache's (False for a streamed evaluation)."""
    if bits is None:
        return None
    if bits not in (2, 3, 4, 8) or (fp8 and bits != 8):
        raise QForgeError(f"--kv-bits must be 8{'' if fp8 else ', 4, 3 or 2'}, not {bits}")
    by_layer = None
    if scales:
        if not fp8:
            raise QForgeError("calibrated KV scales are FP8 scales")
        by_layer = {}
        for name in {k.rpartition(".")[0] for k in scales}:
            idx = getattr(model.get_submodule(name), "layer_idx", None)
            if idx is None:
                raise QForgeError(f"{name} holds FP8 KV scales but has no layer_idx: not an attention module")
            by_layer[idx] = (float(scales[f"{name}.k_scale"]), float(scales[f"{name}.v_scale"]))
    return lambda: QuantizedKVCache(model.config, bits, group_size, fp8, by_layer, keep)


@contextlib.contextmanager
def quantized_activations(model: nn.Module, scheme: InputScheme | None, names: set[str] | None = None,
                          scales: dict[str, torch.Tensor] | None = None,
                          divisor: float | None = None) -> Iterator[int]:
    """Within the context, every table linear (or those of the full `names`) sees its input fake-quantized as
    `scheme` says (None: nothing changes): per token (`divisor`: fake_quant_per_token's; `fp8`: to E4M3, 8 bits only,
    per token and group of `group_size` channels when > 0; `mx`: MX, per token and group), or, `static`, with its own
    input scale from `scales`, {full name: input_scale [1]}, one for each of `names` (8 bits; `fp4`: 4 bits, NVFP4 in
    groups under that global scale); yields the count."""
    if scheme is None:
        yield 0
        return
    bits, fp8, group_size, mx, fp4 = scheme.bits, scheme.fp8, scheme.group_size, scheme.mx, scheme.fp4
    if scheme.static != (scales is not None):
        raise QForgeError(f"static inputs take one input scale per linear, dynamic ones none: static {scheme.static}, "
                          f"{'no ' if scales is None else ''}scales given")
    if fp4 and not (bits == 4 and scales is not None and group_size > 0):
        raise QForgeError(f"NVFP4 inputs are 4-bit in groups with calibrated global scales, got {bits} bits, group "
                          f"size {group_size}{'' if scales is not None else ', no scales'}")
    if group_size != -1 and not ((fp8 or mx) and scales is None and group_size > 0 or fp4):
        raise QForgeError(f"inputs in groups are FP8 blocks', MX or NVFP4 inputs, got group size {group_size}")
    if mx and not (group_size > 0 and bits == (8 if fp8 else 4)):
        raise QForgeError(f"MX inputs are 4-bit E2M1 or 8-bit E4M3 (fp8) in groups, got {bits} bits, fp8 {fp8}, "
                          f"group size {group_size}")
    if bits not in (4, 8) or (fp8 and bits != 8):
        raise QForgeError(f"--act-bits must be 8{'' if fp8 else ' or 4'} for {'FP8' if fp8 else 'int'} inputs, "
                          f"not {bits}")
    mods = {n: m for n, m in linear_modules(model).items() if names is None or n in names}
    if names is not None and len(mods) < len(names):
        log.warning("%d of %d quantized layers are not modules (fused experts): their inputs stay unquantized",
                    len(names) - len(mods), len(names))
    if not mods:
        raise QForgeError("no linears to quantize activations of")
    if scales is not None:
        if bits != (4 if fp4 else 8) or set(mods) - set(scales):
            raise QForgeError(f"static input scales are 8-bit (NVFP4's global scales 4-bit) and one per quantized "
                              f"linear; {len(set(mods) - set(scales))} of {len(mods)} linears have none")
        fqs = {n: (lambda x, s=scales[n]: fake_quant_nvfp4(x, s, group_size)) if fp4 else
               (lambda x, s=scales[n]: fake_quant_static(x, s, fp8)) for n in mods}
    else:
        fq = (lambda x: fake_quant_mx(x, bits, group_size)) if mx else \
            (lambda x: fake_quant_fp8_per_token(x, group_size)) if fp8 else \
            (lambda x: fake_quant_per_token(x, bits, divisor))
        fqs = {n: fq for n in mods}
    handles = [m.register_forward_pre_hook(lambda _m, args, fq=fqs[n]: (fq(args[0]), *args[1:]))
               for n, m in mods.items()]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
