"""Architecture support as data: one ArchSpec per Hugging Face `model_type`, plus generic walking.

An ArchSpec names the ModuleList of decoder blocks and the quantizable linears of one block as
groups in execution order (q/k/v, then o, then gate/up, then down for Llama-like blocks). A linear
name is a module path inside the block, or the path of a 3-D fused-experts parameter
([experts, out, in], as transformers 5 stores MoE experts), which expands to one linear per expert.
`smooth` lists AWQ/SmoothQuant mappings (previous op -> the linears that read its output).
Adding a model family means adding one entry to ARCHS.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QForgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothMapping:
    """`prev` (a norm or linear inside the block) feeds every linear in `linears` (AWQ, SmoothQuant).

    `balance`: modules that read prev's output too but are never quantized (MoE routers): scaled with
    the linears so the function is unchanged. `prev_rows="up_half"`: prev is a fused-experts gate/up
    parameter [experts, 2·I, in] and the linears (fused experts too) read act(gate)·up — one scale
    vector per expert, folded into that expert's up rows.
    """

    prev: str
    linears: tuple[str, ...]
    balance: tuple[str, ...] = ()
    prev_rows: str = "all"

    def __post_init__(self):
        if self.prev_rows not in ("all", "up_half"):
            raise QForgeError(f"SmoothMapping {self.prev}: prev_rows must be 'all' or 'up_half', not {self.prev_rows!r}")


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                          # dotted path of the decoder-block ModuleList in the CausalLM
    groups: tuple[tuple[str, ...], ...]  # linears per block, in execution order
    smooth: tuple[SmoothMapping, ...] = ()
    norm_plus_one: bool = False          # Gemma RMSNorm scales by (1 + w)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = ArchSpec(
    blocks="model.layers",
    groups=(_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    smooth=(
        SmoothMapping("input_layernorm", _ATTN),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
        SmoothMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
)
# Gemma 2/3 put extra norms around attention and MLP: the norm that feeds the MLP is pre_feedforward_layernorm
_GEMMA2 = ArchSpec(
    blocks=_LLAMA.blocks, groups=_LLAMA.groups, norm_plus_one=True,
    smooth=(
        SmoothMapping("input_layernorm", _ATTN),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
        SmoothMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

# transformers 5 MoE blocks: experts fused into [experts, 2·I, in] gate/up and [experts, out, I] down parameters,
# the router `mlp.gate` reads the same input as the experts
_MOE = ArchSpec(
    blocks="model.layers",
    groups=(_ATTN, ("self_attn.o_proj",), ("mlp.experts.gate_up_proj",), ("mlp.experts.down_proj",)),
    smooth=(
        SmoothMapping("input_layernorm", _ATTN),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
        SmoothMapping("post_attention_layernorm", ("mlp.experts.gate_up_proj",), balance=("mlp.gate",)),
        SmoothMapping("mlp.experts.gate_up_proj", ("mlp.experts.down_proj",), prev_rows="up_half"),
    ),
)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": ArchSpec(blocks=_LLAMA.blocks, groups=_LLAMA.groups, smooth=_LLAMA.smooth, norm_plus_one=True),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        groups=(_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        smooth=(
            SmoothMapping("self_attn_layer_norm", _ATTN),
            SmoothMapping("self_attn.v_proj", ("self_attn.out_proj",)),
            SmoothMapping("final_layer_norm", ("fc1",)),
        ),
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        smooth=(
            SmoothMapping("input_layernorm", ("attention.query_key_value",)),
            SmoothMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        smooth=(SmoothMapping("ln_1", ("attn.c_attn",)), SmoothMapping("ln_2", ("mlp.c_fc",))),
    ),
    "mixtral": _MOE,
    "qwen3_moe": _MOE,                   # every block sparse (decoder_sparse_step 1, no mlp_only_layers)
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table entry for `model`, or a clear error naming what to add."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise QForgeError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported yet. "
            f"Add an ArchSpec entry for {model_type!r} to ARCHS in qforge/models/arch.py: the path of "
            f"its decoder-block ModuleList and its linear layers in execution order. "
            f"Supported: {', '.join(sorted(ARCHS))}."
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
    parameter ([experts, out, in]).
    """

    def __init__(self, name: str, module: nn.Module, param: str = "weight", expert: int | None = None):
        self.name, self.module, self.param, self.expert = name, module, param, expert
        self.transposed = type(module).__name__ == "Conv1D"

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
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"LinearRef({self.name}, {self.shape[0]}x{self.shape[1]})"


def _resolve(block: nn.Module, name: str) -> list[LinearRef]:
    path, _, leaf = name.rpartition(".")
    try:
        parent = block.get_submodule(path) if path else block
    except AttributeError:
        parent = None
    if parent is not None and isinstance(getattr(parent, leaf, None), nn.Parameter):
        p = getattr(parent, leaf)
        if p.dim() == 3:  # fused experts
            return [LinearRef(f"{name}.{e}", parent, leaf, e) for e in range(p.shape[0])]
    try:
        module = block.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
        raise QForgeError(
            f"the architecture table names {name!r} as a linear, but the block "
            f"({type(block).__name__}) has no such 2-D weight; fix its entry in qforge/models/arch.py"
        )
    return [LinearRef(name, module)]


def block_linears(block: nn.Module, spec: ArchSpec) -> list[list[LinearRef]]:
    """The block's linears, grouped in execution order as the table says."""
    return [[ref for name in group for ref in _resolve(block, name)] for group in spec.groups]


def untracked_linears(block: nn.Module, spec: ArchSpec) -> list[str]:
    """Linear-like modules in a block that the table does not mention (they would stay unquantized)."""
    known = set(spec.linear_names)
    found = []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            if name not in known:
                found.append(name)
    return found


def linear_ref(model: nn.Module, full_name: str) -> LinearRef:
    """A LinearRef from a full name as QuantizeResult keys it (experts: `<parent>.<param>.<e>`)."""
    path, _, last = full_name.rpartition(".")
    if last.isdigit():
        parent_path, _, param = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(getattr(parent, param, None), nn.Parameter):
            return LinearRef(full_name, parent, param, int(last))
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
            try:
                out[linear_name(spec, i, name)] = block.get_submodule(name)
            except AttributeError:
                log.info("block %d: %s is not a module (fused experts): left out", i, name)
    return out
