"""Linears that serving engines fuse into one module, which then holds one quantization scheme.

vLLM (and engines built like it) runs a block's q/k/v as one `qkv_proj`, gate/up as one `gate_up_proj`, DeepSeek's
q_a/kv_a as one `fused_qkv_a_proj` and a MoE block's experts (gate/up and down of every expert) as one fused-experts
module. A mixed-precision checkpoint loads there only when each such set shares one scheme, and a GPTQ `dynamic`
rule reaches the fused module only when it names the fused module (vLLM matches rules against its own names).

Fused sets come from the architecture table, with no per-family list: the linears of one block in one table
group (they read one input) under one parent module (self_attn.{q,k,v}_proj; a parallel block's attention and MLP
input linears are two sets), and every expert of one fused-experts parent. A set ties what an engine may fuse:
on DeepSeek without q-LoRA it ties q_proj to kv_a_proj_with_mqa, which vLLM keeps apart.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import QForgeError
from .archspec import ArchSpec

# vLLM's name for the module it fuses from checkpoint modules of these leaf names (its packed_modules_mapping)
ENGINE_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                "q_a_proj": "fused_qkv_a_proj", "kv_a_proj_with_mqa": "fused_qkv_a_proj"}
_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")     # <...>.experts.<e>.<proj>, as checkpoints store experts


def fused_sets(spec: ArchSpec, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{set name: its linears' full names} over `names` (full names as measurements key them:
    `<blocks>.<i>.<table name>`, an expert `<blocks>.<i>.<fused parameter>.<e>`), every name in one set.
    A set's name is its one linear's name, `<parent>.{a,b,c}` for several, `<experts parent>.*` for experts."""
    group_of = {n: k for k, g in enumerate(spec.groups) for n in g}
    head = f"{spec.blocks}."
    sets: dict[tuple, list[str]] = {}
    for full in names:
        block, _, rest = full[len(head):].partition(".") if full.startswith(head) else ("", "", "")
        param, _, expert = rest.rpartition(".")
        if block.isdigit() and expert.isdigit() and param in group_of:         # one expert of a fused parameter
            key = (int(block), param.rpartition(".")[0], "*")
        elif block.isdigit() and rest in group_of:
            key = (int(block), rest.rpartition(".")[0], group_of[rest])
        else:
            raise QForgeError(f"{full} is not a block linear of this architecture ({spec.blocks}.<i>.<linear>)")
        sets.setdefault(key, []).append(full)
    return {_set_name(head, key, members): tuple(members) for key, members in sets.items()}


def _set_name(head: str, key: tuple, members: list[str]) -> str:
    block, parent, kind = key
    if len(members) == 1:
        return members[0]
    prefix = f"{head}{block}.{parent + '.' if parent else ''}"
    if kind == "*":
        return f"{prefix}*"
    return prefix + "{" + ",".join(m[len(prefix):] for m in members) + "}"


def engine_module(stored: str) -> str | None:
    """The name vLLM gives the fused module that holds checkpoint module `stored`, or None when it is not fused."""
    m = _EXPERT.match(stored)
    if m:
        return m[1]
    parent, _, leaf = stored.rpartition(".")
    fused = ENGINE_FUSED.get(leaf)
    return f"{parent}.{fused}" if fused and parent else None
