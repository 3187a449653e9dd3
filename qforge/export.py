"""Write a quantized model as a packed checkpoint that serving engines load (formats/), atomically:

  config.json (with quantization_config), generation_config.json, tokenizer files,
  model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json (shards of at most
  max_shard_size, tensors in model order),
  quantize_config.json (gptq only), qforge_export.json (sizes and bits per weight measured on the files, and the
  qforge QuantizeConfig the layers were made with), allocation.json and .png (mixed precision: every layer's scheme).

Non-quantized tensors (embeddings, norms, lm_head) are stored in `dtype`; quantized linears as their
format's packed tensors. Tied weights are written once, as transformers does.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import QForgeError
from .formats import FORMATS
from .models.arch import linear_ref
from .models.checkpoint_keys import safetensors_dtype
from .models.streaming import materialized_state
from .solvers import Grid, InputScheme, LayerQuant
from .solvers.grid import group_index
from .utils.atomic import atomic_dir
from .utils.shards import ShardWriter, parse_size

log = logging.getLogger(__name__)
EXPORT_RECORD = "qforge_export.json"


def _check_kind(name: str, ref) -> None:
    if ref.transposed and ref.expert is None:          # experts stored [in, out] are written [out, in] modules
        raise QForgeError(f"{name}: packed export of Conv1D weights is not supported yet; use qforge's own output "
                          f"directory")


def stored_layers(model, layers: dict[str, LayerQuant]) -> dict[str, tuple[str, LayerQuant]]:
    """The packed modules to write: {stored module name: (linear name, its layer or the rows stored there)}. Names
    and rows as the model's checkpoints store them (models/checkpoint_keys.stored_linears): a fused expert's
    gate/up rows become its two modules (Mixtral's experts.{e}.w1 and .w3), cut by LayerQuant.rows (a copy of
    their rows; shapes only for layers on the meta device)."""
    from .models.checkpoint_keys import stored_linears

    out = {}
    for stored, (name, rows) in stored_linears(model, list(layers)).items():
        q = layers[name]
        out[stored] = (name, q if rows == slice(0, q.shape[0], 1) else q.rows(rows.start, rows.stop, rows.step))
    missing = set(layers) - {n for n, _ in out.values()}
    if missing:
        raise QForgeError(f"{sorted(missing)[0]}: no tensor of the checkpoint layout stores it; cannot export it")
    return out


def _fused_params(model, layers) -> dict[str, int]:
    """Fused-expert parameters among `layers` ({param path: experts quantized}); each must be quantized whole."""
    from .models.arch import linear_ref

    count: dict[str, int] = {}
    for name in layers:
        ref = linear_ref(model, name)
        if ref.expert is not None:
            path = name.rpartition(".")[0]
            count[path] = count.get(path, 0) + 1
    for path, n in count.items():
        total = model.get_parameter(path).shape[0]
        if n != total:
            raise QForgeError(f"{path}: {n} of its {total} experts are quantized; a packed export needs all or none")
    return count


def _check_layer(fmt: str, name: str, q: LayerQuant, ref) -> bool:
    """Refuse what `fmt` cannot store; True when a GPTQ v1 zero point of 0 needs the borrow (see formats/gptq.py)."""
    _check_kind(name, ref)
    in_order = torch.equal(q.g_idx.to(torch.int32), group_index(q.shape[1], q.grid).to(torch.int32))
    FORMATS[fmt].check(name, q.shape, q.grid, in_order)
    return fmt == "gptq" and q.grid.bits != 3 and not q.grid.sym and bool((q.zeros == 0).any())


def _mixed_formats() -> str:
    return " or ".join(n for n, m in FORMATS.items() if m.MIXED)


def check_exportable(model, cfg, fmt: str, grids: dict[str, Grid] | None = None) -> None:
    """Refuse, before any quantization, settings `fmt` cannot store for the linears `cfg` will quantize:
    their kind and shape, and (unless a mixed allocation is still to be planned) their bits, groups and
    column order. `grids` gives a planned allocation's schemes by full name."""
    if fmt not in FORMATS:
        raise QForgeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_compressed_tensors_only(cfg, fmt)
    from .pipeline import quantized_linears

    planned_later = cfg.bpw is not None and grids is None
    base = None if planned_later else cfg.grid
    layers = {n: (r, (grids or {}).get(n, base)) for n, r in quantized_linears(model, cfg).items()}
    if not FORMATS[fmt].MIXED and (planned_later or len({g for _, g in layers.values()}) > 1):
        raise QForgeError(f"the {fmt} format stores one scheme for all layers; export mixed precision as "
                          f"{_mixed_formats()}")
    in_order = not (cfg.act_order and not cfg.static_groups)
    from .models.checkpoint_keys import stored_linears

    _fused_params(model, layers)                             # experts: all of a fused parameter or none
    for stored, (name, rows) in stored_linears(model, list(layers)).items():   # as the checkpoint stores them
        ref, grid = layers[name]
        _check_kind(name, ref)
        if grid is not None and grid.cuts_blocks(rows.start, rows.stop, rows.step, ref.shape[0]):
            raise QForgeError(f"{stored}: the checkpoint stores rows {rows.start}:{rows.stop}:{rows.step} of {name}, "
                              f"which cut its {grid.block_rows}-row FP8 blocks (each module the checkpoint stores "
                              f"must be whole blocks of rows: quantize these per channel)")
        # per-channel layers of an allocation are visited in act-order order, but one group is always in order
        FORMATS[fmt].check(stored, (len(range(rows.start, rows.stop, rows.step)), ref.shape[1]), grid,
                           in_order or (grid is not None and grid.group_size == -1))


def _check_compressed_tensors_only(cfg, fmt: str) -> None:
    """FP8 weights, quantized inputs and the FP8 KV cache: schemes only compressed-tensors stores."""
    if getattr(cfg, "kv_cache", None) and fmt != "compressed-tensors":
        raise QForgeError(f"an FP8 KV cache's scales export as compressed-tensors (kv_cache_scheme) only: the {fmt} "
                          f"format has no place for them")
    if getattr(cfg, "mx", False) and fmt != "compressed-tensors":
        raise QForgeError(f"MX weights export as compressed-tensors (mxfp4-pack-quantized, mxfp8-quantized) only: the "
                          f"{fmt} format stores integer codes")
    if getattr(cfg, "fp8", False) and fmt != "compressed-tensors":
        raise QForgeError(f"FP8 weights export as compressed-tensors (float-quantized) only: the {fmt} format stores "
                          f"integer codes")
    if getattr(cfg, "nvfp4", False) and fmt != "compressed-tensors":
        raise QForgeError(f"NVFP4 weights export as compressed-tensors (nvfp4-pack-quantized) only: the {fmt} format "
                          f"stores integer codes")
    if getattr(cfg, "act_bits", None) is not None and fmt != "compressed-tensors":
        raise QForgeError(f"W{cfg.bits}A{cfg.act_bits} exports as compressed-tensors (int-quantized) only: the {fmt} "
                          f"format stores weight-only layers, and an engine would run them on unquantized inputs")


def packed_state_dict(model, layers: dict[str, LayerQuant], fmt: str, dtype: torch.dtype,
                      prefix: str = "", acts: InputScheme | None = None) -> dict[str, torch.Tensor]:
    """The tensors to write for `model`'s state names starting with `prefix` (tensors on the meta device, a
    streamed model's other blocks, are left out); `layers` replace their linears' weights (compressed-tensors with
    quantized inputs, `acts`: int-quantized, and a static scheme's input_scale)."""
    from .models.checkpoint_keys import per_expert_converters, revert_with, save_keys, tensor_dtypes

    mod = FORMATS[fmt]
    dtype_of = tensor_dtypes(model, dtype)          # what the model keeps in fp32 is written fp32, as save_pretrained
    dense = {name: t.detach().to(dtype_of(name)).contiguous() if t.is_floating_point() else t.detach().contiguous()
             for name, t in materialized_state(model, prefix).items()}   # tied lm_head = embed_tokens: once
    for name in layers:                                   # absent when on the meta device (a run state's)
        dense.pop(f"{name}.weight", None)
    biases = {}                                           # a fused parameter's bias: one per stored expert module
    for path in _fused_params(model, layers):
        dense.pop(path, None)
        if f"{path}_bias" in dense:
            biases[f"{path}_bias"] = dense.pop(f"{path}_bias")
    state = save_keys(model, dense)                       # the names the model's checkpoints use (Mixtral's router)
    if biases:
        state.update({k: t.contiguous() for k, t in revert_with(model, per_expert_converters(model), biases).items()})
    borrowed = []
    for stored, (name, q) in stored_layers(model, layers).items():
        ref = linear_ref(model, name)
        if _check_layer(fmt, stored, q, ref):
            borrowed.append(stored)
        packed = mod.pack(q, dtype, acts) if fmt == "compressed-tensors" else mod.pack(q)
        for key, t in packed.items():
            state[f"{stored}.{key}"] = t.contiguous()
        bias = getattr(ref.module, "bias", None) if ref.expert is None else None
        if isinstance(bias, torch.Tensor) and fmt != "compressed-tensors":
            state[f"{stored}.bias"] = bias.detach().to(torch.float16).contiguous()
    if borrowed:
        log.warning("%d of %d layers (first: %s) have zero points of 0, which GPTQ v1 stores with a borrow that "
                    "GPTQModel and transformers undo but per-field readers (vLLM's exllama path) misread",
                    len(borrowed), len(layers), borrowed[0])
    return state


def _input_scheme(qcfg) -> InputScheme | None:
    """The quantized linears' input scheme of a QuantizeConfig (None for weight-only runs, or without a config)."""
    return getattr(qcfg, "input_scheme", None)


def _kv_state(model, qcfg, kv_scales: dict | None) -> dict[str, torch.Tensor]:
    """The FP8 KV cache scales to write (fp32, under the keys the checkpoint stores), {} without a KV cache scheme."""
    from .models.checkpoint_keys import save_keys

    if getattr(qcfg, "kv_cache", None) and not kv_scales:
        raise QForgeError("this result's config quantizes the KV cache to FP8, but it holds no KV scales")
    return {k: v.float().contiguous() for k, v in save_keys(model, dict(kv_scales or {})).items()}


def _quant_config(fmt: str, layers: dict[str, LayerQuant], qcfg, model, quantized, kv_fp8: bool = False) -> dict:
    """The format's quantization_config; `layers` keyed by stored module names (stored_layers), `quantized` the
    model's names of the quantized linears; `kv_fp8`: the attention modules store FP8 KV cache scales."""
    grids = {q.grid for q in layers.values()}
    fused = engine_modules(layers) if len(grids) > 1 and FORMATS[fmt].MIXED else {}
    if any(g.block_rows for g in grids):
        _warn_split_blocks(layers)
    if fmt == "compressed-tensors":
        from .formats.compressed_tensors import build_config
        from .models.checkpoint_keys import save_keys

        plain = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        names = [k[: -len(".weight")] for k in save_keys(model, {f"{n}.weight": torch.empty(0, device="meta")
                                                                 for n in plain})]        # as stored
        # the unquantized linears under their stored names (vLLM maps them to its own) and, where the model names
        # them otherwise (a vision-language model's vision tower), under the model's names, which transformers reads
        ignore = {n for n in names if n not in layers} | (plain - set(quantized) - set(names))
        return build_config({n: q.grid for n, q in layers.items()}, sorted(ignore), _input_scheme(qcfg), kv_fp8)
    if len(grids) != 1 and not FORMATS[fmt].MIXED:
        raise QForgeError(f"the {fmt} format stores one scheme for all layers; this result has {len(grids)} "
                          f"(export mixed precision as {_mixed_formats()})")
    from . import __version__

    # desc_act says whether readers must follow g_idx: only grouped layers quantized in act-order without static
    # groups have theirs out of column order. Static groups and per-channel layers are the plain layout, which
    # vLLM (0.32 refuses desc_act=True) and every other reader take.
    static = bool(getattr(qcfg, "static_groups", False))
    act_order = bool(getattr(qcfg, "act_order", False)) and not static and any(g.group_size != -1 for g in grids)
    weight = Counter()
    for q in layers.values():
        weight[q.grid] += q.shape[0] * q.shape[1]
    base = max(weight, key=lambda g: (weight[g], g.bits, g.group_size, g.sym))   # most weights; deterministic
    extra = {"meta": {"quantizer": [f"qforge:{__version__}"]}}
    if len(grids) > 1:  # GPTQModel's per-module overrides: "+:" regex on the full module name -> fields
        extra["dynamic"] = {f"+:^{_module_pattern(n, fused)}$": {"bits": q.grid.bits, "group_size": q.grid.group_size,
                                                                   "sym": q.grid.sym}
                            for n, q in layers.items() if q.grid != base}
    skipped = _unquantized_block_linears(model, quantized)
    if skipped and fmt == "gptq":       # GPTQModel's and vLLM's "-:" rule: the module stays a dense linear
        extra.setdefault("dynamic", {}).update({f"-:^{re.escape(n)}$": {} for n in skipped})
    elif skipped:                       # AutoAWQ's list, which transformers and vLLM read
        extra["modules_to_not_convert"] = skipped
    return FORMATS[fmt].quantization_config(base, act_order, static, extra)


def _unquantized_block_linears(model, quantized) -> list[str]:
    """The stored names of the block linears left unquantized (`skip` patterns): readers that make every block
    linear a packed module must be told."""
    from .models.arch import arch_spec, named_block_linears
    from .models.checkpoint_keys import stored_linears

    rest = [n for n in named_block_linears(model, arch_spec(model)) if n not in quantized]
    return sorted(stored_linears(model, rest)) if rest else []


def engine_modules(layers: dict[str, LayerQuant]) -> dict[str, str]:
    """{stored module: the vLLM module it is fused into} for the fused sets whose modules share one scheme; a set
    whose modules differ is warned about (vLLM cannot load it: its fused module holds one scheme)."""
    sets = _engine_sets(layers)
    mixed = sorted(f for f, names in sets.items() if len({layers[n].grid for n in names}) > 1)
    if mixed:
        log.warning("%d module(s) vLLM fuses (first: %s) hold linears at different schemes: this export loads in "
                    "qforge, transformers and GPTQModel but not in vLLM (allocate with bpw_units='fused')",
                    len(mixed), mixed[0])
    return {n: f for f, names in sets.items() if f not in mixed for n in names}


def _engine_sets(layers: dict[str, LayerQuant]) -> dict[str, list[str]]:
    """{the vLLM module a set of stored modules is fused into: those modules} (models/fused.engine_module)."""
    from .models.fused import engine_module

    sets: dict[str, list[str]] = {}
    for n in layers:
        fused = engine_module(n)
        if fused:
            sets.setdefault(fused, []).append(n)
    return sets


def _warn_split_blocks(layers: dict[str, LayerQuant]) -> None:
    """vLLM loads FP8 blocks into a module it fuses (q/k/v, gate/up) only when every part but the last is whole
    blocks of rows (its validate_fp8_block_shape); a set that is not is warned about (qforge and transformers load
    it)."""
    from .models.fused import ENGINE_FUSED

    order = list(ENGINE_FUSED)
    for fused, names in sorted(_engine_sets(layers).items()):
        if any(n.rpartition(".")[2] not in ENGINE_FUSED for n in names):   # fused experts: one module each, not rows
            continue
        parts = sorted(names, key=lambda n: order.index(n.rpartition(".")[2]))[:-1]
        split = [n for n in parts if layers[n].grid.block_rows and layers[n].shape[0] % layers[n].grid.block_rows]
        if split:
            q = layers[split[0]]
            log.warning("%s has %d rows, not whole FP8 blocks of %d, and vLLM fuses it into %s before another "
                        "part: vLLM refuses such a merged layer (this export loads in qforge and transformers); a "
                        "block size dividing every part's rows avoids it", split[0], q.shape[0], q.grid.block_rows,
                        fused)
            return


def _module_pattern(name: str, fused: dict[str, str]) -> str:
    """A regex matching module `name` and, when it has one, the fused module vLLM matches rules against."""
    return f"(?:{re.escape(name)}|{re.escape(fused[name])})" if name in fused else re.escape(name)


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_size: int) -> None:
    shards = ShardWriter(out, max_shard_size)
    shards.write(state)
    shards.finish()


def measured_sizes(out: Path, layers: dict[str, LayerQuant]) -> dict:
    """Bytes on disk and effective bits per weight of the quantized linears, read back from the files."""
    qbytes = total = 0
    prefixes = tuple(f"{n}." for n in layers)
    for f in sorted(out.glob("*.safetensors")):
        total += f.stat().st_size
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                if key.startswith(prefixes) and not key.endswith(".bias"):
                    sl = sf.get_slice(key)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    qbytes += n * safetensors_dtype(sl.get_dtype()).itemsize
    weights = sum(q.shape[0] * q.shape[1] for q in layers.values())
    return {"safetensors_bytes": total, "quantized_layer_bytes": qbytes, "quantized_weights": weights,
            "bits_per_weight": 8 * qbytes / weights if weights else None}


def export(model, tokenizer, layers: dict[str, LayerQuant], qcfg, out: str | Path, fmt: str,
           dtype: torch.dtype = torch.float16, overwrite: bool = False,
           max_shard_size: str | int = "4GB", allocation=None, kv_scales: dict | None = None) -> dict:
    """Write `model` (its quantized linears given by `layers`) in format `fmt`; returns the measured sizes.
    `allocation` (mixed precision: a mixed.plan.Allocation) is written beside, as in a saved output; `kv_scales`
    (QuantizeResult.kv_scales) with the FP8 KV cache scheme."""
    if fmt not in FORMATS:
        raise QForgeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not layers:
        raise QForgeError("nothing to export: no quantized layers")
    max_shard_size = parse_size(max_shard_size)
    _check_compressed_tensors_only(qcfg, fmt)
    state = packed_state_dict(model, layers, fmt, dtype, acts=_input_scheme(qcfg))
    kv = _kv_state(model, qcfg, kv_scales)
    state.update(kv)
    stored = {s: q.on_meta() for s, (_, q) in stored_layers(model, {n: q.on_meta() for n, q in layers.items()}).items()}
    qconf = _quant_config(fmt, stored, qcfg, model, layers, bool(kv))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_shards(state, tmp, max_shard_size)
        sizes = _write_configs(tmp, model, tokenizer, stored, fmt, qconf, dtype, qcfg)
        if allocation is not None:
            allocation.write_beside(tmp)
    log.info("exported %s to %s: %.3f bits/weight over the quantized linears", fmt, out, sizes["bits_per_weight"])
    return sizes


def export_streamed(model, tokenizer, qcfg, blocks, out: str | Path, fmt: str, dtype: torch.dtype = torch.float16,
                    overwrite: bool = False, max_shard_size: str | int = "4GB", allocation=None,
                    kv_scales: dict | None = None) -> dict:
    """Export a streamed run block by block: memory holds one block (then the weights outside the blocks) and
    at most one shard of packed tensors. `model`: its skeleton (blocks on the meta device); `blocks`: a
    models.streaming.SavedBlocks (`load(i, block)` -> that block's layers, `release(block)`, `outside(model,
    dtype)`). The weights outside the blocks come first, then the blocks in order."""
    from .models.arch import arch_spec, get_blocks

    if fmt not in FORMATS:
        raise QForgeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_compressed_tensors_only(qcfg, fmt)
    acts, kv = _input_scheme(qcfg), _kv_state(model, qcfg, kv_scales)
    limit = parse_size(max_shard_size)
    spec = arch_spec(model)
    skeleton = get_blocks(model, spec)
    seen: dict[str, LayerQuant] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shards = ShardWriter(tmp, limit)
        with blocks.outside(model, dtype):
            shards.write({**packed_state_dict(model, {}, fmt, dtype), **kv})   # outside the blocks (meta device)
        for i, block in enumerate(skeleton):
            layers = blocks.load(i, block)
            shards.write(packed_state_dict(model, layers, fmt, dtype, f"{spec.blocks}.{i}.", acts))
            blocks.release(block)
            seen.update({n: q.on_meta() for n, q in layers.items()})
        if not seen:
            raise QForgeError("nothing to export: no quantized layers")
        shards.finish()
        stored = {s: q for s, (_, q) in stored_layers(model, seen).items()}          # on the meta device
        sizes = _write_configs(tmp, model, tokenizer, stored, fmt,
                               _quant_config(fmt, stored, qcfg, model, seen, bool(kv)), dtype, qcfg)
        if allocation is not None:
            allocation.write_beside(tmp)
    log.info("exported %s to %s block by block: %.3f bits/weight over the quantized linears", fmt, out,
             sizes["bits_per_weight"])
    return sizes


def _write_configs(tmp: Path, model, tokenizer, layers: dict[str, LayerQuant], fmt: str, qconf: dict,
                   dtype: torch.dtype, qcfg=None) -> dict:
    """config.json with the format's quantization config, generation config, tokenizer, qforge_export.json."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    if fmt == "compressed-tensors":
        from compressed_tensors.compressors import ModelCompressor

        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ModelCompressor(quantization_config=qconf).update_config(str(tmp))
    else:
        config["quantization_config"] = qconf
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if fmt == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(qconf, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    sizes = {"format": fmt, **measured_sizes(tmp, layers)}
    record = {**sizes, "qforge_config": qcfg.to_dict()} if qcfg is not None else sizes
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return sizes
