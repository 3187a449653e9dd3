"""Rotate a model in place, keeping its function (QuaRot / SpinQuant's R1 and R2, fused offline).

R1 turns the residual stream h into h·R (R orthogonal [hidden, hidden], solvers/hadamard.rotation): the embedding
rows become E·R; every linear that reads the stream through a block's RMSNorm (the table's norm -> linears
mappings, their `balance` routers too) first takes the norm's weight γ into its columns (W·diag(γ); the norm keeps
weight 1, Gemma's 0) and then reads W·R; every linear that writes to the stream (a hidden-size output that neither
reads a norm nor feeds another linear: o_proj, down_proj, the experts' down) becomes Rᵀ·W (bias Rᵀ·b); the final
norm goes into the head, which reads W·R. RMSNorm(h·R) = RMSNorm(h)·R because R keeps norms, so the logits do not change, while each
outlier channel of h is spread over all of them: weights and inputs quantize with less error.
R2 rotates each attention head's values by one orthogonal [head_dim, head_dim] matrix (v_proj's rows per head,
o_proj's columns per head): attention mixes a head's value vectors linearly, so the rotation passes through
(where o_proj reads something else too, Qwen3-Next's output-gated attention, the probe shows it and R2 is undone).

The head needs its own weight (E·R is not (W·diag(γ))·R), so a tied head is untied (config.tie_word_embeddings
False; the output stores it). Models with LayerNorm (the mean subtraction does not commute with R), norms after
a sub-layer (Gemma 2/3's post-norms) or residual readers the table does not name are refused: the plan is checked
before any weight changes, and the logits of a probe before and after must agree (rotate_model raises if not).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QForgeError
from ..models.arch import ArchSpec, LinearRef, arch_spec, block_linears, blocks_owner, get_blocks
from ..solvers.hadamard import hadamard_core, rotation
from .fold import mapping_units

log = logging.getLogger(__name__)

PROBE_TOKENS = 32


@dataclass
class _BlockPlan:
    norms: list[tuple[nn.Module, list[LinearRef]]]     # each block-level RMSNorm with the linears that read it
    writers: list[LinearRef]                           # linears whose output is added to the residual stream
    values: tuple[LinearRef, LinearRef] | None         # (v_proj, o_proj) for R2


def _is_rms_norm(module: nn.Module | None) -> bool:
    w = getattr(module, "weight", None)
    return ("rmsnorm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1
            and getattr(module, "bias", None) is None)


def _child_norms(module: nn.Module) -> dict[str, nn.Module]:
    """The norms directly inside `module` (a block's, or those beside the blocks), by attribute name."""
    return {n: m for n, m in module.named_children() if "norm" in type(m).__name__.lower()}


def _plan_block(block: nn.Module, spec: ArchSpec, i: int, hidden: int) -> _BlockPlan:
    groups = block_linears(block, spec)
    refs = [r for g in groups for r in g]
    child_norms, read = _child_norms(block), {}                  # norm name -> {linear name: ref} reading it
    for mapping in spec.smooth:
        if mapping.prev not in child_norms:
            continue
        units, why = mapping_units(block, mapping, refs)
        if why is not None:
            continue
        norm = child_norms[mapping.prev]
        if not _is_rms_norm(norm):
            raise QForgeError(f"block {i}: {mapping.prev} is a {type(norm).__name__}; rotation needs RMSNorm (a "
                              f"LayerNorm's mean subtraction or bias does not commute with it)")
        read.setdefault(mapping.prev, {}).update({r.name: r for u in units for r in u.lins + u.balance})
    if not read:
        raise QForgeError(f"block {i} ({type(block).__name__}) has no norm that the table's mappings name as read "
                          f"by its linears: rotation needs the norms before its sub-layers")
    unread = sorted(set(child_norms) - set(read))
    if unread:
        raise QForgeError(f"block {i} ({type(block).__name__}) has norms {', '.join(unread)} that no linear group "
                          f"reads (a norm after a sub-layer, as Gemma 2's post-norms): rotating its residual stream "
                          f"would change the model")
    norms = [(child_norms[n], list(lins.values())) for n, lins in read.items()]   # a norm folded once
    readers = {name for lins in read.values() for name in lins}
    producers = {m.prev for m in spec.smooth}                    # linears whose output another linear reads
    writers = [r for r in refs if r.name not in readers and r.shape[0] == hidden
               and r.name not in producers and r.name.rpartition(".")[0] not in producers]
    return _BlockPlan(norms, writers, _values(block, spec, refs))


def _values(block: nn.Module, spec: ArchSpec, refs: list[LinearRef]) -> tuple[LinearRef, LinearRef] | None:
    """The block's v_proj -> o_proj pair (the table's v -> o fold), when both are plain linears."""
    by_name = {r.name: r for r in refs if r.expert is None}
    for m in spec.smooth:
        if m.prev.endswith("v_proj") and m.prev_rows == "all" and len(m.linears) == 1 and not m.balance:
            if m.prev in by_name and m.linears[0] in by_name:
                return by_name[m.prev], by_name[m.linears[0]]
    return None


def _final_norm(model: nn.Module, spec: ArchSpec) -> nn.Module:
    owner, _ = blocks_owner(model, spec)
    norms = list(_child_norms(owner).values())
    if len(norms) != 1 or not _is_rms_norm(norms[0]):
        raise QForgeError(f"{type(owner).__name__} has {len(norms)} norm(s) beside its blocks "
                          f"({', '.join(type(m).__name__ for m in norms) or 'none'}); rotation needs one final RMSNorm")
    return norms[0]


def _head_dim(model: nn.Module) -> int | None:
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)


@torch.no_grad()
def _probe_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens.to(model.get_input_embeddings().weight.device)).logits.float()


def _change(model: nn.Module, probe: torch.Tensor, before: torch.Tensor) -> float:
    """The largest change of the probe's logits, relative to their largest magnitude."""
    return ((_probe_logits(model, probe) - before).abs().max() / before.abs().max().clamp_min(1e-6)).item()


def _read(ref: LinearRef, R: torch.Tensor, gamma: torch.Tensor) -> None:
    ref.set_weight(ref.weight.float() * gamma @ R)               # [out, in] · diag(γ) · R


def _write(ref: LinearRef, R: torch.Tensor) -> None:
    ref.set_weight(R.T @ ref.weight.float())                     # [out, in], out the residual's channels
    if ref.bias is not None:
        ref.bias.copy_((R.T @ ref.bias.float()).to(ref.bias.dtype))


def _fold_norm(norm: nn.Module, norm_plus_one: bool) -> torch.Tensor:
    """The norm's scale γ [hidden] fp32; the norm left scaling by one."""
    gamma = norm.weight.float() + (1 if norm_plus_one else 0)
    norm.weight.fill_(0 if norm_plus_one else 1)
    return gamma


def _rotate_values(v: LinearRef, o: LinearRef, R2: torch.Tensor) -> None:
    d = R2.shape[0]
    Wv = v.weight.float()                                        # [kv_heads·d, in]
    v.set_weight(torch.einsum("ji,hjn->hin", R2, Wv.view(-1, d, Wv.shape[1])).reshape(Wv.shape))
    if v.bias is not None:
        v.bias.copy_((v.bias.float().view(-1, d) @ R2).reshape(-1).to(v.bias.dtype))
    Wo = o.weight.float()                                        # [out, heads·d]
    o.set_weight((Wo.view(Wo.shape[0], -1, d) @ R2).reshape(Wo.shape))


def _untie(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def rotate_model(model: nn.Module, kind: str = "hadamard", seed: int = 0, values: bool = True) -> dict:
    """Rotate `model` in place (R1, and R2 when `values`); its logits stay what they were. Returns a record of
    what was done (saved in the run record). Raises QForgeError, before changing anything, for a model whose
    structure rotation would not keep, and after, if the probe's logits moved anyway."""
    spec = arch_spec(model)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise QForgeError(f"rotation needs an embedding table and a linear head, not {type(emb).__name__} / "
                          f"{type(head).__name__}")
    hidden = emb.weight.shape[1]
    blocks = get_blocks(model, spec)
    plans = [_plan_block(block, spec, i, hidden) for i, block in enumerate(blocks)]
    final = _final_norm(model, spec)
    head_dim = _head_dim(model) if values else None
    pairs = [p.values for p in plans if p.values is not None]     # hybrids: the attention blocks only
    values = bool(values and head_dim and pairs
                  and all(v.shape[0] % head_dim == 0 and o.shape[1] % head_dim == 0 for v, o in pairs))
    probe = torch.randint(emb.weight.shape[0], (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(seed))
    before = _probe_logits(model, probe)
    R = rotation(hidden, kind, seed).float()
    untied = _untie(model)
    _read(LinearRef("lm_head", head), R, _fold_norm(final, spec.norm_plus_one))
    emb.weight.copy_((emb.weight.float() @ R).to(emb.weight.dtype))
    R2 = rotation(head_dim, kind, seed + 1).float() if values else None
    for block, plan in zip(blocks, plans):
        for norm, lins in plan.norms:
            gamma = _fold_norm(norm, spec.norm_plus_one)
            for ref in lins:
                _read(ref, R, gamma)
        for ref in plan.writers:
            _write(ref, R)
        if R2 is not None and plan.values is not None:
            _rotate_values(*plan.values, R2)
    limit = 1e-4 if emb.weight.dtype == torch.float32 else 5e-2
    change = _change(model, probe, before)
    if not change <= limit and R2 is not None:       # o_proj reads more than the heads' values (gated attention)
        for plan in plans:
            if plan.values is not None:
                _rotate_values(*plan.values, R2.T)   # undone: R1 alone
        values, change = False, _change(model, probe, before)
        log.info("the values' rotation (R2) changed the logits, so it is undone: o_proj reads something besides "
                 "the heads' values (an output gate?)")
    if not change <= limit:
        raise QForgeError(f"rotating {type(model).__name__} changed its logits by {change:.2g} of their range: some "
                          f"residual reader or writer is not in the architecture table (the model in memory is now "
                          f"changed; load it again)")
    core = hadamard_core(hidden) if kind == "hadamard" else None
    record = {"kind": kind, "seed": seed, "hidden": hidden, "values": values, "head_dim": head_dim if values else None,
              "untied_head": untied, "max_logit_change": change,
              "hadamard": None if core is None else {"paley_prime": core[0], "sylvester": core[1]}}
    log.info("rotated %s (%s, hidden %d%s): logits moved %.2g of their range", type(model).__name__, kind, hidden,
             f", values per head of {head_dim}" if values else "", change)
    return record

