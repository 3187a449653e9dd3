"""Fold a per-channel scale into the op that produces a linear group's input (AWQ, SmoothQuant).

For a mapping prev -> linears: prev's output channel j is divided by s[j] and every linear's input
column j multiplied by s[j], so the block computes the same function. prev is a norm (weight and bias
divided; Gemma's RMSNorm computes x·(1 + w), so w becomes (1 + w)/s - 1), a linear (rows divided; of a
fused gate/up linear only the up half, of a fused q/k/v linear only the v third), or a fused-experts
gate/up parameter whose up half feeds down_proj through act(gate) · up — one unit (one s) per expert, only the
up rows (halves or interleaved, ExpertLayout) and their bias divided. A mapping's `balance` modules
(MoE routers) read prev's output too: their input columns are multiplied by s, they are never quantized.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..models.arch import PREV_ROWS, LinearRef, SmoothMapping, submodule_or_none

log = logging.getLogger(__name__)


@dataclass
class FoldUnit:
    """One scale vector's worth of a mapping: the op whose output channels s divides, the linears that are
    scaled and quantized, the balance weights that are only scaled, and the module whose output judges s
    (None: the single linear's own output)."""

    key: str                        # result key: the mapping's prev, "<prev>.<expert>" for per-expert units
    mapping: SmoothMapping
    lins: list[LinearRef]
    balance: list[LinearRef]
    parent: str | None
    expert: int | None = None       # per-expert unit: prev's rows are the up half of this expert's gate/up


def _table_name(r: LinearRef) -> str:
    """The name the table gives `r`: a plain linear's, or a fused expert's parameter path."""
    return r.name if r.expert is None else r.name.rpartition(".")[0]


def _mapped(refs: list[LinearRef], names: tuple[str, ...]) -> list[LinearRef]:
    """The refs a mapping names."""
    return [r for r in refs if _table_name(r) in names]


def _parent_path(block: nn.Module, names: list[str]) -> str:
    """The smallest module holding every named weight ("" is the block itself)."""
    path = ".".join(os.path.commonprefix([n.split(".") for n in names]))
    while path and not isinstance(submodule_or_none(block, path), nn.Module):
        path = path.rpartition(".")[0]
    return path


def _fused_param(block: nn.Module, path: str) -> torch.Tensor | None:
    owner, _, leaf = path.rpartition(".")
    p = getattr(submodule_or_none(block, owner) if owner else block, leaf, None)
    return p if isinstance(p, nn.Parameter) and p.dim() == 3 else None


def _expert_prev(block: nn.Module, path: str, lin: LinearRef) -> LinearRef:
    """The gate/up of the expert `lin` (a down_proj) belongs to: prev of an up_half mapping over experts."""
    owner, _, leaf = path.rpartition(".")
    return LinearRef(path, block.get_submodule(owner) if owner else block, leaf, lin.expert, lin.layout)


def mapping_units(block: nn.Module, mapping: SmoothMapping, refs: list[LinearRef]) -> tuple[list[FoldUnit], str | None]:
    """The mapping's fold units in `block`, or why it does not fit (callers log and skip, never raise)."""
    lins = _mapped(refs, mapping.linears)
    if not lins:
        return [], "its linears are not in the block"
    missing = set(mapping.linears) - {_table_name(r) for r in lins}
    if missing:
        return [], f"the block lacks {', '.join(sorted(missing))}"
    held = [n for n in mapping.absent if submodule_or_none(block, n) is not None]
    if held:
        return [], f"the block has {', '.join(held)}, which reads {mapping.prev} too"
    balance = []
    for name in mapping.balance:
        m = submodule_or_none(block, name)
        if m is None or getattr(m, "weight", None) is None or m.weight.dim() != 2:
            return [], f"the block has no 2-D weight {name}"
        balance.append(LinearRef(name, m))
    fused = _fused_param(block, mapping.prev)
    if fused is not None:
        if mapping.prev_rows != "up_half" or any(r.expert is None for r in lins) or balance:
            return [], f"{mapping.prev} is a fused-experts parameter: only its up half can feed the experts' linears"
        if lins[0].layout.glu != "act_fn":
            return [], f"{mapping.prev}: its experts' GLU is not act(gate)·up, so scaling up does not pass to down"
        rows = _expert_prev(block, mapping.prev, lins[0]).shape[0]
        if rows != 2 * lins[0].shape[1]:
            return [], f"{mapping.prev}'s up half has {rows // 2} rows, the linears read {lins[0].shape[1]}"
        return [FoldUnit(f"{mapping.prev}.{r.expert}", mapping, [r], [], None, r.expert) for r in lins], None
    prev = submodule_or_none(block, mapping.prev)
    w = getattr(prev, "weight", None)
    if not isinstance(w, torch.Tensor):
        return [], f"the block has no module {mapping.prev} with a weight"
    width = w.shape[0] if w.dim() == 2 else w.shape[-1]
    parts = PREV_ROWS[mapping.prev_rows]
    if parts > 1:                                        # the linears read the last of `parts` equal row ranges
        if w.dim() != 2 or width != parts * lins[0].shape[1]:
            return [], f"{mapping.prev} has {width} output channels, not {parts} x the {lins[0].shape[1]} " \
                       f"the linears read ({mapping.prev_rows})"
        width //= parts
    if any(r.shape[1] != width for r in lins + balance):
        return [], f"{mapping.prev} has {width} output channels, the linears read {lins[0].shape[1]}"
    parent = None if len(lins) == 1 and not balance else \
        _parent_path(block, [r.name for r in lins] + list(mapping.balance))
    return [FoldUnit(mapping.prev, mapping, lins, balance, parent)], None


@torch.no_grad()
def fold_scales(block: nn.Module, unit: FoldUnit, s: torch.Tensor, norm_plus_one: bool) -> None:
    prev_path = unit.mapping.prev
    if unit.expert is not None:                          # the up rows of one expert's fused gate/up (and bias)
        prev = _expert_prev(block, prev_path, unit.lins[0])
        _, up = prev.layout.gate_up_rows(prev.shape[0])
        prev.weight[up].div_(s.to(prev.weight.device, prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias[up].div_(s.to(prev.bias.device, prev.bias.dtype))
    else:
        prev = block.get_submodule(prev_path)
        w = prev.weight
        s_ = s.to(w.device)
        if w.dim() == 2:                                 # a linear: scale its output rows (the last s.numel())
            w = w[w.shape[0] - s_.numel():]
            w.div_(s_.to(w.dtype).unsqueeze(1))
        elif norm_plus_one:
            w.copy_(((1 + w.float()) / s_ - 1).to(w.dtype))
        else:
            w.div_(s_.to(w.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias[bias.shape[0] - s_.numel():].div_(s_.to(bias.dtype))
    for r in unit.lins + unit.balance:
        r.set_weight(r.weight.float() * s.to(r.weight.device))
