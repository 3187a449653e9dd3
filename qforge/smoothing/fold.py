"""Fold a per-channel scale into the op that produces a linear group's input (AWQ, SmoothQuant).

For a mapping prev -> linears: prev's output channel j is divided by s[j] and every linear's input
column j multiplied by s[j], so the block computes the same function. prev is a norm (weight and bias
divided; Gemma's RMSNorm computes x·(1 + w), so w becomes (1 + w)/s - 1) or a linear (rows divided).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.arch import LinearRef, SmoothMapping

log = logging.getLogger(__name__)


def _out_width(prev: nn.Module) -> int | None:
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    return w.shape[0] if w.dim() == 2 else w.shape[-1]


def can_fold(block: nn.Module, mapping: SmoothMapping, refs: list[LinearRef]) -> str | None:
    """None when the mapping fits, else why not (logged and skipped, never an error)."""
    try:
        prev = block.get_submodule(mapping.prev)
    except AttributeError:
        return f"the block has no module {mapping.prev}"
    width = _out_width(prev)
    if any(r.expert is not None for r in refs):
        return "fused expert weights are not scaled"
    if width is None or any(r.shape[1] != width for r in refs):
        return f"{mapping.prev} has {width} output channels, the linears read {refs[0].shape[1]}"
    return None


@torch.no_grad()
def fold_scales(block: nn.Module, mapping: SmoothMapping, refs: list[LinearRef], s: torch.Tensor,
                norm_plus_one: bool) -> None:
    prev = block.get_submodule(mapping.prev)
    w = prev.weight
    s_ = s.to(w.device)
    if w.dim() == 2:                                     # a linear: scale its output rows
        w.div_(s_.to(w.dtype).unsqueeze(1))
    elif norm_plus_one:
        w.copy_(((1 + w.float()) / s_ - 1).to(w.dtype))
    else:
        w.div_(s_.to(w.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s_.to(bias.dtype))
    for r in refs:
        r.set_weight(r.weight.float() * s_)
