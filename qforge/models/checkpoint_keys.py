"""Checkpoint keys -> model parameter names, by transformers' own conversion table (conversion_mapping.py).

from_pretrained renames and converts some checkpoints' tensors while loading: Mixtral's per-expert
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` are stacked and fused into `mlp.experts.gate_up_proj` and
`mlp.experts.down_proj`, legacy names are renamed. A streamed run reads a block's tensors itself, so it applies
the same transforms (transformers' WeightRenaming / WeightConverter objects, not a copy of them) to the tensors of
one block at a time. `ConvertedFiles` wraps a streaming.CheckpointFiles and offers the model's names instead of
the stored keys; `save_keys` goes the other way for writing, as save_pretrained does.

Which stored keys make which parameter is learnt once, by running every conversion on meta tensors of the
stored shapes: a converter with several outputs (a fused qkv split in three) is read once for all of them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from copy import deepcopy

import torch
from torch import nn

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}


def safetensors_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16", "F8_E4M3", ...)."""
    if name not in _DTYPES:
        raise ValueError(f"safetensors dtype {name!r} is not read by qforge")
    return _DTYPES[name]


class _Transforms:
    """The model's load-time transforms, split as transformers applies them."""

    def __init__(self, model: nn.Module, gate_up: str | None = None):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        transforms += _per_expert_layout(model, transforms, gate_up)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        # as from_pretrained: a stored key with the model's base_model_prefix in front (Llama 4's language_model.
        # of a multimodal checkpoint, read as the text model) loads without it, and the other way round
        self.prefix, self.meta = getattr(model, "base_model_prefix", "") or None, model.state_dict()

    def groups(self, keys: list[str]) -> dict[str, list[tuple[str, str | None]]]:
        """{first target name: [(stored key, the converter's source pattern or None for a renaming)]}."""
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        out: dict[str, list[tuple[str, str | None]]] = {}
        for k in sorted(keys, key=dot_natural_key):            # experts 0, 1, ..., 10 stacked in that order
            target, pattern = rename_source_key(k, self.renamings, self.converters, self.prefix, self.meta)
            out.setdefault(target, []).append((k, pattern))
        return out

    def apply(self, model: nn.Module, first: str, sources: list[tuple[str, str | None]],
              tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters one group of stored tensors makes."""
        key, pattern = sources[0]
        if pattern is None:
            return {first: tensors[key]}
        conv = deepcopy(self.by_pattern[pattern])               # one converter instance per group, as transformers
        for k, p in sources:
            conv.add_tensor(first, k, p, tensors[k])
        made = conv.convert(first, model=model, config=model.config)
        return {n: v[0] if isinstance(v, list) else v for n, v in made.items()}


def tensor_dtypes(model: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """name -> the dtype tensor `name` (a model or checkpoint name) has when `model` loads in `dtype`: fp32 for what
    its class keeps in fp32 (_keep_in_fp32_modules(_strict): DeepSeek-V3's and Nemotron-H's router score bias,
    ERNIE-MoE's router; matched with .search, as transformers matches them on load), `dtype` for the rest."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: dtype
    kept = build_glob_alternation(list(plan))[0]
    return lambda name: torch.float32 if kept.search(name) else dtype


def _per_expert_layout(model: nn.Module, transforms: list, gate_up: str | None = None) -> list:
    """Loading only: for a model with fused gate/up/down experts, also converters from one module per expert,
    `<experts>.{e}.gate_proj/up_proj/down_proj` (the names GPTQModel and llm-compressor write for every such MoE)
    to its fused parameters, unless its own table already reads those names. `gate_up`: per_expert_converters'."""
    from transformers.core_model_loading import WeightConverter

    have = {p for t in transforms if isinstance(t, WeightConverter) for p in t.source_patterns}
    return [c for c in per_expert_converters(model, gate_up) if not set(c.source_patterns) & have]


def per_expert_converters(model: nn.Module, gate_up: str | None = None) -> list:
    """transformers WeightConverters from per-expert modules `<experts>.{e}.gate_proj/up_proj/down_proj` (weights,
    and biases where the model has them) to `model`'s fused experts parameters, in its table's ExpertLayout: stacked,
    gate rows then up rows, interleaved (GPT-OSS) and transposed to [experts, in, out] (Llama 4, GPT-OSS) as it
    says. Reverted (revert_with), they name and cut what a packed export writes for the fused parameters.
    `gate_up` overrides how gate_proj and up_proj split an interleaved gate/up: "halves" reads a checkpoint whose
    writer put the first and second half of the interleaved rows under those names (GPTQModel 7.6 on GPT-OSS)."""
    from transformers.core_model_loading import Concatenate, Interleave, MergeModulelist, Transpose, WeightConverter

    from ..errors import QForgeError
    from .arch import arch_spec

    try:
        spec = arch_spec(model)
    except QForgeError:                                        # a model outside the table: none
        return []
    layout, names = spec.experts, [n for n, _ in model.named_parameters()]
    parents = sorted({n[len(spec.blocks) + 1:].split(".", 1)[1].rpartition(".")[0] for n in names   # in the block
                      if n.startswith(spec.blocks + ".") and n.endswith(".experts.gate_up_proj")})
    out = []
    for parent in parents:                                     # e.g. mlp.experts, feed_forward.experts
        has_bias = any(n.endswith(f"{parent}.gate_up_proj_bias") for n in names)
        for kind in ("weight", "bias") if has_bias else ("weight",):
            target = "" if kind == "weight" else "_bias"
            fused = [MergeModulelist(dim=0), Concatenate(dim=1)]
            down = [MergeModulelist(dim=0)]
            if (gate_up or layout.gate_up) == "interleaved":
                fused.append(Interleave(dim=1, inverse=True))
            if layout.stored == "in_out" and kind == "weight":
                fused.append(Transpose(1, 2))
                down.append(Transpose(1, 2))
            out += [WeightConverter([f"{parent}.*.gate_proj.{kind}", f"{parent}.*.up_proj.{kind}"],
                                    f"{parent}.gate_up_proj{target}", fused),
                    WeightConverter(f"{parent}.*.down_proj.{kind}", f"{parent}.down_proj{target}", down)]
    return out


def revert_with(model: nn.Module, transforms: list, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (parameter names) reverted through `transforms` (as transformers' revert_weight_conversion does
    with the model's own): the stored keys and tensors those transforms load from."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    reverse = [t.reverse_transform() for t in transforms[::-1]]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
    converters = [t for t in reverse if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, object] = {}
    for key, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = rename_source_key(key, renamings, converters, reverse=True)
        conv = groups.setdefault(renamed, deepcopy(by_pattern[pattern]) if pattern is not None
                                 else WeightRenaming(key, renamed))
        conv.add_tensor(renamed, key, pattern if pattern is not None else key, tensor)
    out = {}
    for first, conv in groups.items():
        for name, t in conv.convert(first, model=model, config=model.config).items():
            out[name] = t[0] if isinstance(t, list) else t
    return out


class ConvertedFiles:
    """A checkpoint's tensors under the model's parameter names: `where` (name -> file of its first stored
    tensor), `read(names, dtype)`, `fingerprint()`, as streaming.CheckpointFiles offers the stored keys."""

    def __init__(self, files, model: nn.Module, transforms: _Transforms,
                 groups: dict[str, list[tuple[str, str | None]]], shapes: dict[str, tuple[list[int], str]]):
        self.files, self.model, self.transforms, self.groups = files, model, transforms, groups
        self.path = files.path
        self.group_of: dict[str, str] = {}                      # parameter name -> its group's first name
        for first, sources in self.groups.items():
            meta = {k: torch.empty(shapes[k][0], dtype=_DTYPES.get(shapes[k][1], torch.float32), device="meta")
                    for k, _ in sources}
            for name in transforms.apply(model, first, sources, meta):
                self.group_of[name] = first
        self.where = {n: files.where[self.groups[g][0][0]] for n, g in self.group_of.items()}

    def read(self, names: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for first in dict.fromkeys(self.group_of[n] for n in names):     # each group once, in order
            sources = self.groups[first]
            stored = self.files.read([k for k, _ in sources], dtype)
            made = self.transforms.apply(self.model, first, sources, stored)
            del stored
            out.update({n: t for n, t in made.items() if n in names})
        return out

    def fingerprint(self) -> str:
        return self.files.fingerprint()


def converted(files, model: nn.Module):
    """`files` under `model`'s parameter names: itself when its keys need no transform, else a ConvertedFiles."""
    from safetensors import safe_open

    transforms = _Transforms(model)
    groups = transforms.groups(list(files.where))
    if all(len(s) == 1 and s[0] == (first, None) for first, s in groups.items()):
        return files
    shapes = {}
    for f in sorted(set(files.where.values())):
        with safe_open(str(files.path / f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                shapes[k] = (list(sl.get_shape()), sl.get_dtype())
    return ConvertedFiles(files, model, transforms, groups, shapes)


def save_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (parameter names) under the keys save_pretrained writes (transformers' transforms reversed):
    a streamed output stores what an in-memory one does."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def model_names(model: nn.Module, keys: list[str], gate_up: str | None = None) -> set[str]:
    """The parameter names stored keys `keys` load as (each converter's first target: a converter that splits one
    stored tensor into several parameters names only the first)."""
    return set(_Transforms(model, gate_up).groups(keys))


def to_model_keys(model: nn.Module, state: dict[str, torch.Tensor], gate_up: str | None = None
                  ) -> dict[str, torch.Tensor]:
    """`state` (stored keys, full names) under `model`'s parameter names: the in-memory form of ConvertedFiles.
    `gate_up`: per_expert_converters'."""
    transforms = _Transforms(model, gate_up)
    out: dict[str, torch.Tensor] = {}
    for first, sources in transforms.groups(list(state)).items():
        out.update(transforms.apply(model, first, sources, state))
    return out


def row_splits(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The linears among `names` that a checkpoint stores as several modules, with those modules' row counts in
    order (a fused expert's gate/up: (I, I), its gate and up modules); stored_linears' cuts."""
    parts: dict[str, list[slice]] = {}
    for name, rows in stored_linears(model, names).values():
        parts.setdefault(name, []).append(rows)
    return {n: tuple(len(range(r.start, r.stop, r.step)) for r in sorted(p, key=lambda r: r.start))
            for n, p in parts.items() if len(p) > 1}


def stored_linears(model: nn.Module, names: list[str]) -> dict[str, tuple[str, slice]]:
    """The modules a checkpoint stores the quantized linears `names` as (LayerQuant keys: module paths, or
    `<parent>.<param>.<e>` for one expert of a fused parameter): {stored module name: (linear name, its rows there,
    a slice)}. Found by reverting transformers' load transforms on an index tensor that numbers the rows of each
    weight (e.g. Mixtral's `mlp.experts.gate_up_proj.3` -> `block_sparse_moe.experts.3.w1` rows 0:I and `.w3`
    rows I:2I); fused experts a checkpoint stores as such are written one module per expert (per_expert_converters:
    GPT-OSS's interleaved gate/up -> gate_proj rows 0::2, up_proj rows 1::2). A weight the transforms split other
    than by whole rows in a regular order is refused."""
    from ..errors import QForgeError
    from .arch import linear_ref

    by_weight: dict[str, dict[int, str]] = {}          # weight parameter -> {expert (0 if not fused): linear name}
    in_out: dict[str, bool] = {}                       # weight parameter -> fused experts stored [experts, in, out]
    for n in names:
        ref = linear_ref(model, n)
        weight = n.rpartition(".")[0] if ref.expert is not None else f"{n}.weight"
        by_weight.setdefault(weight, {})[ref.expert or 0] = n
        in_out[weight] = ref.expert is not None and ref.transposed
    out: dict[str, tuple[str, slice]] = {}
    for weight, linears in by_weight.items():
        shape = model.get_parameter(weight).shape        # [out, in], [experts, out, in] or [experts, in, out]
        rows = shape[-1] if in_out[weight] else shape[-2]
        lead = list(shape[:-2])
        ids = torch.arange(math.prod(lead) * rows, dtype=torch.float64).view(*lead, rows, 1).expand(*lead, rows, 2)
        index = {weight: (ids.transpose(-1, -2) if in_out[weight] else ids).contiguous()}
        stored = save_keys(model, index)
        if lead and len(stored) == 1 and next(iter(stored.values())).dim() == len(shape):
            # fused experts stored as such, under their name or another (Granite's block_sparse_moe.input_linear):
            # written one module each
            stored = revert_with(model, per_expert_converters(model), index)
        for key, t in stored.items():
            run = t[:, 0].long() if t.dim() == 2 and t.shape[1] == 2 and torch.equal(t[:, 0], t[:, 1]) else None
            step = int(run[1] - run[0]) if run is not None and run.numel() > 1 else 1
            if run is None or not key.endswith(".weight") or not run.numel() or step < 1 or \
                    not torch.equal(run, torch.arange(int(run[0]), int(run[0]) + step * run.numel(), step)) or \
                    int(run[0]) // rows != int(run[-1]) // rows:      # whole rows, evenly spaced, of one expert
                raise QForgeError(f"{weight}: the checkpoint stores it as {key}, not as whole rows of one linear; "
                                  f"its packed export is not supported")
            expert, r0 = divmod(int(run[0]), rows)
            if expert in linears:
                out[key[: -len(".weight")]] = (linears[expert], slice(r0, r0 + step * (run.numel() - 1) + 1, step))
    return out
