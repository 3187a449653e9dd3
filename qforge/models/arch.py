"""Architecture support as data (families.py's table of ArchSpec entries) plus generic walking: find a model's
entry, its decoder blocks and each block's linears (plain, Conv1D or one expert of a fused parameter).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import QForgeError
from .archspec import PREV_ROWS, ArchSpec, ExpertLayout, SmoothMapping
from .families import ARCHS, MODEL_TYPES, VARIANTS

__all__ = ["ARCHS", "PREV_ROWS", "ArchSpec", "ExpertLayout", "LinearRef", "SmoothMapping", "arch_spec", "block_linears",
           "get_blocks", "linear_modules", "linear_name", "linear_ref", "named_block_linears", "submodule_or_none",
           "untracked_linears"]

log = logging.getLogger(__name__)


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table entry for `model`, or a clear error naming what to add."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(VARIANTS[model_type](config) if model_type in VARIANTS else model_type)
    if spec is None:
        raise QForgeError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported yet. "
            f"Add an ArchSpec entry for {model_type!r} to ARCHS in qforge/models/families.py: the path of "
            f"its decoder-block ModuleList and its linear layers in execution order. "
            f"Supported: {', '.join(MODEL_TYPES)}."
        )
    return spec


def submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    """module.get_submodule(path), or None when there is no such module."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    blocks = model.get_submodule(spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise QForgeError(f"{spec.blocks} is a {type(blocks).__name__}, expected the ModuleList of decoder blocks")
    return blocks


def blocks_owner(model: nn.Module, spec: ArchSpec) -> tuple[nn.Module, str]:
    """The module that holds the block list (it embeds and runs the blocks) and the list's attribute name."""
    owner_path, _, attr = spec.blocks.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), attr


class LinearRef:
    """One quantizable linear inside a block, with its weight seen as [out_features, in_features].

    Wraps nn.Linear, GPT-2's Conv1D (stored [in, out]) and one expert of a fused 3-D expert
    parameter ([experts, out, in], or [experts, in, out] as `layout` says).
    """

    def __init__(self, name: str, module: nn.Module, param: str = "weight", expert: int | None = None,
                 layout: ExpertLayout | None = None):
        self.name, self.module, self.param, self.expert = name, module, param, expert
        self.layout = layout or ExpertLayout()
        self.transposed = type(module).__name__ == "Conv1D" if expert is None else self.layout.stored == "in_out"

    def _tensor(self) -> torch.Tensor:
        t = getattr(self.module, self.param)
        return t[self.expert] if self.expert is not None else t

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] view of the stored weight (a transposed view for Conv1D)."""
        t = self._tensor()
        return t.t() if self.transposed else t

    def set_weight(self, W: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(W.to(self.weight.dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias [out] (a fused expert's row of `<param>_bias`), or None."""
        if self.expert is None:
            b = getattr(self.module, "bias", None)
        else:
            b = getattr(self.module, f"{self.param}_bias", None)
            b = b[self.expert] if isinstance(b, torch.Tensor) else None
        return b if isinstance(b, torch.Tensor) else None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"LinearRef({self.name}, {self.shape[0]}x{self.shape[1]})"


def _owner(block: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The module holding dotted attribute `name` of `block` (None when there is none) and the attribute's name."""
    path, _, leaf = name.rpartition(".")
    return (submodule_or_none(block, path) if path else block), leaf


def _resolve(block: nn.Module, name: str, layout: ExpertLayout) -> list[LinearRef]:
    parent, leaf = _owner(block, name)
    p = getattr(parent, leaf, None) if parent is not None else None
    if isinstance(p, nn.Parameter) and p.dim() == 3:  # fused experts
        return [LinearRef(f"{name}.{e}", parent, leaf, e, layout) for e in range(p.shape[0])]
    module = submodule_or_none(block, name)
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
        raise QForgeError(
            f"the architecture table names {name!r} as a linear, but the block "
            f"({type(block).__name__}) has no such 2-D weight; fix its entry in qforge/models/families.py"
        )
    return [LinearRef(name, module)]


def _holds(block: nn.Module, name: str) -> bool:
    """Whether the block has `name` (an nn.Identity in its place, as Nemotron-H's absent latent projections: no)."""
    parent, leaf = _owner(block, name)
    held = getattr(parent, leaf, None) if parent is not None else None
    return held is not None and not isinstance(held, nn.Identity)


def block_linears(block: nn.Module, spec: ArchSpec) -> list[list[LinearRef]]:
    """The block's linears, grouped in execution order as the table says (a block's absent optional linears
    left out, and groups left empty by that dropped)."""
    groups = [[ref for name in group if name not in spec.optional or _holds(block, name)
               for ref in _resolve(block, name, spec.experts)] for group in spec.groups]
    return [g for g in groups if g]


def untracked_linears(block: nn.Module, spec: ArchSpec) -> list[str]:
    """Linear-like modules in a block that the table does not mention (they would stay unquantized)."""
    known = set(spec.linear_names) | set(spec.fp_linears)
    found = []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            if name not in known:
                found.append(name)
    return found


def linear_ref(model: nn.Module, full_name: str, layout: ExpertLayout | None = None) -> LinearRef:
    """A LinearRef from a full name as QuantizeResult keys it (experts: `<parent>.<param>.<e>`). `layout`: how
    fused experts are stored, when `model` is not the whole model (a block) whose table entry says it."""
    path, _, last = full_name.rpartition(".")
    if last.isdigit():
        parent_path, _, param = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(getattr(parent, param, None), nn.Parameter):
            return LinearRef(full_name, parent, param, int(last), layout or arch_spec(model).experts)
    return LinearRef(full_name, model.get_submodule(full_name))


def linear_name(spec: ArchSpec, block: int, name: str) -> str:
    """The full name of block `block`'s linear `name`, as measurements, allocations and run records key it."""
    return f"{spec.blocks}.{block}.{name}"


def named_block_linears(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[int, LinearRef]]:
    """Every block linear of `model` (one per expert for fused experts) by full name, with its block index."""
    return {linear_name(spec, i, r.name): (i, r) for i, b in enumerate(get_blocks(model, spec))
            for g in block_linears(b, spec) for r in g}


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of the table's linears in every block (nn.Linear, Conv1D or a packed QuantLinear), by
    full name. Fused 3-D expert parameters are not modules and are left out (with a log line)."""
    spec = arch_spec(model)
    out = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for name in spec.linear_names:
            m = submodule_or_none(block, name)
            if m is not None:
                out[linear_name(spec, i, name)] = m
            elif _holds(block, name):
                log.info("block %d: %s is not a module (fused experts): left out", i, name)
    return out
