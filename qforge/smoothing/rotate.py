"""Rotate a model in place, keeping its function (QuaRot / SpinQuant's R1 and R2, fused offline).

R1 turns the residual stream h into h·R (R orthogonal [hidden, hidden], solvers/hadamard.rotation_factors): the
embedding rows become E·R; every linear that reads the stream through a block's RMSNorm (the table's norm -> linears
mappings, their `balance` routers too) first takes the norm's weight γ into its columns (W·diag(γ); the norm keeps
weight 1, Gemma's 0) and then reads W·R; every linear that writes to the stream (a hidden-size output that neither
reads a norm nor feeds another linear: o_proj, down_proj, the experts' down) becomes Rᵀ·W (bias Rᵀ·b); the final
norm goes into the head, which reads W·R. RMSNorm(h·R) = RMSNorm(h)·R because R keeps norms, so the logits do not change, while each
outlier channel of h is spread over all of them: weights and inputs quantize with less error.
R2 rotates each attention head's values by one orthogonal [head_dim, head_dim] matrix (v_proj's rows per head,
o_proj's columns per head): attention mixes a head's value vectors linearly, so the rotation passes through
(where o_proj reads something else too, Qwen3-Next's output-gated attention, the probe shows it and R2 is dropped).

The head needs its own weight (E·R is not (W·diag(γ))·R), so a tied head is untied (config.tie_word_embeddings
False; the output stores it). Models with LayerNorm (the mean subtraction does not commute with R), norms after
a sub-layer (Gemma 2/3's post-norms) or residual readers the table does not name are refused: the plan (a Rotation,
made from the model's structure alone) is checked before any weight changes — the first block of each structure,
run on a probe, must give block(h)·R for h·R — and in memory the logits of the probe after must agree too.
rotate_model rotates a model in memory; rotate_streamed hands the Rotation to a streamed model's loader
(models/streaming.py), which rotates each block as it reads it and the weights outside the blocks.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..capture.blocks import capture_block_inputs, run_block
from ..errors import QForgeError
from ..models.arch import ArchSpec, LinearRef, arch_spec, block_linears, blocks_owner, get_blocks
from ..solvers.hadamard import KroneckerRotation, hadamard_core, rotation, rotation_factors
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


def _real(t: torch.Tensor) -> bool:
    return t.device.type != "meta"


def _shared(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (_real(a) and _real(b) and a.data_ptr() == b.data_ptr())


def _relative(after: torch.Tensor, before: torch.Tensor) -> float:
    """The largest change from `before` to `after`, relative to the largest magnitude of `before`."""
    return ((after.float() - before.float()).abs().max() / before.float().abs().max().clamp_min(1e-6)).item()


def _read(ref: LinearRef, R: KroneckerRotation, gamma: torch.Tensor) -> None:
    ref.set_weight(R.right(ref.weight.float() * gamma))          # [out, in] · diag(γ) · R


def _write(ref: LinearRef, R: KroneckerRotation) -> None:
    ref.set_weight(R.transposed_left(ref.weight.float()))        # Rᵀ · [out, in], out the residual's channels
    if ref.bias is not None:
        ref.bias.copy_(R.transposed_left(ref.bias.float()).to(ref.bias.dtype))


def _rotated_rows(weight: torch.Tensor, R: KroneckerRotation, gamma: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, rows: int = 8192) -> nn.Parameter:
    """weight [vocab, hidden]·diag(γ)·R in fp32, `rows` at a time, into a new table of `dtype` (None: weight's): memory
    holds the table as read, its rotated copy and a chunk (a 70B vocabulary's table is 4.2 GB in fp32)."""
    out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    for i in range(0, weight.shape[0], rows):
        chunk = weight[i:i + rows].float()
        out[i:i + rows] = R.right(chunk if gamma is None else chunk * gamma).to(out.dtype)
    return nn.Parameter(out, requires_grad=False)


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


def untie_config(model: nn.Module) -> None:
    """The model's config no longer ties its head to its embeddings (the rotated head is W·diag(γ)·R, not E·R)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


class Rotation:
    """R1 (and R2) of one model, planned on its structure alone (a streamed skeleton's meta weights will do), so a
    model whose structure rotation would not keep raises QForgeError here, untouched (_check_blocks then runs the
    plan on a probe). rotate_block(i, block) and rotate_outside(model) change the weights, all at once
    (rotate_model) or as a streamed model reads them (models/streaming.BlockLoader.rotation)."""

    def __init__(self, model: nn.Module, kind: str = "hadamard", seed: int = 0, values: bool = True):
        spec = arch_spec(model)
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if not isinstance(head, nn.Linear) or not isinstance(getattr(emb, "weight", None), torch.Tensor):
            raise QForgeError(f"rotation needs an embedding table and a linear head, not {type(emb).__name__} / "
                              f"{type(head).__name__}")
        self.kind, self.seed, self.norm_plus_one = kind, seed, spec.norm_plus_one
        self.hidden, self.vocab = emb.weight.shape[1], emb.weight.shape[0]
        self.plans = [_plan_block(block, spec, i, self.hidden) for i, block in enumerate(get_blocks(model, spec))]
        self.final = _final_norm(model, spec)
        self.tied = _shared(head.weight, emb.weight) or bool(getattr(model.config, "tie_word_embeddings", False))
        head_dim = _head_dim(model) if values else None
        pairs = [p.values for p in self.plans if p.values is not None]     # hybrids: the attention blocks only
        self.values = bool(values and head_dim and pairs
                           and all(v.shape[0] % head_dim == 0 and o.shape[1] % head_dim == 0 for v, o in pairs))
        self.head_dim = head_dim if self.values else None
        self.R = rotation_factors(self.hidden, kind, seed)                         # [hidden, hidden], factored
        self.R2 = rotation(head_dim, kind, seed + 1).float() if self.values else None  # [head_dim, head_dim]

    def probe(self) -> torch.Tensor:
        """[1, PROBE_TOKENS] token ids drawn from the seed: the input of the checks."""
        return torch.randint(self.vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(self.seed))

    @torch.no_grad()
    def rotate_block(self, i: int, block: nn.Module) -> None:
        plan = self.plans[i]
        for norm, lins in plan.norms:
            gamma = _fold_norm(norm, self.norm_plus_one)
            for ref in lins:
                _read(ref, self.R, gamma)
        for ref in plan.writers:
            _write(ref, self.R)
        if self.values and plan.values is not None:
            _rotate_values(*plan.values, self.R2)

    @torch.no_grad()
    def undo_values(self, i: int) -> None:
        """Block i's R2 taken back (its R1 stays)."""
        if self.plans[i].values is not None:
            _rotate_values(*self.plans[i].values, self.R2.T)

    def drop_values(self) -> None:
        self.values, self.head_dim = False, None
        log.info("the values' rotation (R2) changed the model's outputs, so it is dropped (R1 alone): o_proj reads "
                 "something besides the heads' values (an output gate?)")

    @torch.no_grad()
    def rotate_outside(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        """The embeddings E·R and the final norm folded into the head, W·diag(γ)·R, each a new table (so a tied head
        gets its own; untie_config says so) in `dtype` (None: the table's own), rotated from the values as read; a
        part a streamed pass left on the meta device is skipped (the final norm is then left at one: the pass runs
        no head)."""
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        gamma = _fold_norm(self.final, self.norm_plus_one) if _real(self.final.weight) else None
        if _real(head.weight) and gamma is not None:
            head.weight = _rotated_rows(head.weight, self.R, gamma, dtype)
        if _real(emb.weight):
            emb.weight = _rotated_rows(emb.weight, self.R, None, dtype)

    def record(self, change: float) -> dict:
        core = hadamard_core(self.hidden) if self.kind == "hadamard" else None
        return {"kind": self.kind, "seed": self.seed, "hidden": self.hidden, "values": self.values,
                "head_dim": self.head_dim if self.values else None, "untied_head": self.tied,
                "max_logit_change": change,
                "hadamard": None if core is None else {"paley_prime": core[0], "sylvester": core[1]}}


@torch.no_grad()
def _probe_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens.to(model.get_input_embeddings().weight.device)).logits.float()


def _moved(model: nn.Module, change: float) -> str:
    return (f"rotating {type(model).__name__} changed its outputs by {change:.2g} of their range: some residual "
            f"reader or writer is not in the architecture table")


def _max_relative(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    return max(_relative(a, b) for a, b in zip(after, before))


def _check_blocks(rot: Rotation, blocks, inputs, reading, limit: float) -> tuple[float, int]:
    """The first block of each structure (its class and parameter names) run on the probe's hidden states h as
    read, then rotated and run on h·R: its outputs must be block(h)·R (any h will do: RMSNorm(h·R) = RMSNorm(h)·R).
    `reading(i, block)`: a context in which block i holds its weights as read, its changes gone after. R2 is dropped
    for every block where one fails only with it (o_proj reads more than the heads' values: gated attention).
    Returns the largest change and the number of blocks checked; raises QForgeError, nothing changed, if one moved."""
    h, change, seen = inputs.hidden, 0.0, set()
    hR = [rot.R.right(x) for x in h]
    for i, block in enumerate(blocks):
        structure = (type(block).__name__, tuple(n for n, _ in block.named_parameters()))
        if structure in seen:
            continue
        seen.add(structure)
        with reading(i, block):
            calls, device = inputs.for_block(i), next(block.parameters()).device
            expected = [rot.R.right(y) for y in run_block(block, h, calls, device)]
            rot.rotate_block(i, block)
            moved = _max_relative(run_block(block, hR, calls, device), expected)
            if not moved <= limit and rot.values:
                rot.undo_values(i)
                rot.drop_values()
                moved = _max_relative(run_block(block, hR, calls, device), expected)
        if not moved <= limit:
            raise QForgeError(f"{_moved(blocks[i], moved)} (block {i}; nothing was changed)")
        change = max(change, moved)
    return change, len(seen)


@contextlib.contextmanager
def _restored(i: int, block: nn.Module):
    """Block i as it is while inside, its weights put back after."""
    state = {k: v.clone() for k, v in block.state_dict().items()}
    try:
        yield block
    finally:
        block.load_state_dict(state)


@torch.no_grad()
def rotate_model(model: nn.Module, kind: str = "hadamard", seed: int = 0, values: bool = True) -> dict:
    """Rotate `model` in place (R1, and R2 when `values`); its logits stay what they were. Returns a record of
    what was done (saved in the run record). Raises QForgeError, before changing anything, for a model whose
    structure rotation would not keep (from the plan, then _check_blocks on a probe), and after, if the probe's
    logits moved anyway."""
    spec = arch_spec(model)
    rot = Rotation(model, kind, seed, values)
    probe = rot.probe().to(model.get_input_embeddings().weight.device)
    limit = 1e-4 if model.get_input_embeddings().weight.dtype == torch.float32 else 5e-2
    blocks = get_blocks(model, spec)
    _check_blocks(rot, blocks, capture_block_inputs(model, spec, [probe]), _restored, limit)
    before = _probe_logits(model, probe)
    rot.rotate_outside(model)
    untie_config(model)
    for i, block in enumerate(blocks):
        rot.rotate_block(i, block)
    change = _relative(_probe_logits(model, probe), before)
    if not change <= limit:
        raise QForgeError(f"{_moved(model, change)} (the model in memory is now changed; load it again)")
    log.info("rotated %s (%s, hidden %d%s): logits moved %.2g of their range", type(model).__name__, kind,
             rot.hidden, f", values per head of {rot.head_dim}" if rot.values else "", change)
    return rot.record(change)


@torch.no_grad()
def rotate_streamed(model: nn.Module, loader, kind: str = "hadamard", seed: int = 0, values: bool = True) -> dict:
    """Rotate a streamed model (a models/streaming.py skeleton, read by `loader`, a BlockLoader): planned on the
    skeleton, checked on the probe (_check_blocks: the first block of each structure read — one for a dense model,
    not the whole model; then the final norm and head on the probe's h against h·R) and handed to the loader, which
    from then on rotates each block as it reads it and the weights outside them inside outside()."""
    spec = arch_spec(model)
    rot = Rotation(model, kind, seed, values)
    probe = rot.probe()
    with loader.outside(model, without="head"):
        inputs = capture_block_inputs(model, spec, [probe])
    change, checked = _check_blocks(rot, get_blocks(model, spec), inputs, loader.loaded, 1e-4)
    final, head, h = rot.final, model.get_output_embeddings(), inputs.hidden[0]
    with loader.outside(model, without="embeddings"):
        before = head(final(h))
        rot.rotate_outside(model)
        moved = _relative(head(final(rot.R.right(h))), before)
    if not moved <= 1e-4:
        raise QForgeError(f"{_moved(model, moved)} (its final norm and head; nothing was changed)")
    untie_config(model)
    loader.rotation = rot
    change = max(change, moved)
    log.info("%s will be rotated as its blocks are read (%s, hidden %d%s): checked on %d block(s) and the head, "
             "outputs moved %.2g of their range", type(model).__name__, kind, rot.hidden,
             f", values per head of {rot.head_dim}" if rot.values else "", checked, change)
    return rot.record(change)
