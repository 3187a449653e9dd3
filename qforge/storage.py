"""Exact storage accounting of a quantized model, as a packed format stores it.

Per quantized linear [out, in] with G groups:
  codes   out * in * bits
  scales  out * G * 16          (fp16; FP8 blocks of R rows: ceil(out / R) * G * 16; NVFP4: out * G * 8, E4M3,
                                 and a 32-bit global scale)
  zeros   out * G * bits        (asymmetric only; a symmetric grid's zero is the constant 2^(bits-1))
  g_idx   in * 32               (act-order without static groups only; in-order g_idx is implied)
Everything else (embeddings, norms, lm_head, routers) is counted at 16 bits per value.
"""
from __future__ import annotations

from torch import nn

from .solvers import LayerQuant


def layer_bits(q: LayerQuant, act_order: bool = False, static_groups: bool = False) -> int:
    out_f, in_f = q.shape
    G = q.scales.shape[1]
    rows = -(-out_f // q.grid.block_rows) if q.grid.block_rows else out_f      # rows of scales stored
    bits = out_f * in_f * q.grid.bits + rows * G * (8 if q.grid.fp4 or q.grid.mx else 16) + (32 if q.grid.nvfp4 else 0)
    if not q.grid.sym:
        bits += out_f * G * q.grid.bits
    if act_order and not static_groups:
        bits += in_f * 32
    return bits


def model_storage(model: nn.Module, layers: dict[str, LayerQuant], act_order: bool = False,
                  static_groups: bool = False) -> dict:
    """Sizes in bytes: fp16 baseline vs quantized, and bits per weight of the quantized linears."""
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    total = sum(params.values())
    qweights = sum(q.shape[0] * q.shape[1] for q in layers.values())
    qbits = sum(layer_bits(q, act_order, static_groups) for q in layers.values())
    return {
        "params": total,
        "quantized_weights": qweights,
        "fp16_bytes": total * 2,
        "quantized_bytes": ((total - qweights) * 16 + qbits) / 8,
        "bits_per_weight": qbits / qweights if qweights else 16.0,
    }
