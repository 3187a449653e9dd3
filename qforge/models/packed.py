"""Load packed checkpoints (gptq, awq, compressed-tensors; qforge's exports or other tools') into a
transformers model whose quantized linears are qforge QuantLinear modules.

The format is read from config.json's quantization_config. Every module that has its format's packed
tensors becomes a QuantLinear; every other tensor loads as usual (cast to `dtype`). Packed modules the model
has no module for (MoE experts stored one module each, which transformers fuses into 3-D parameters) are
dequantized and go through transformers' own load transforms (models/checkpoint_keys.py) with the rest.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import QForgeError
from ..formats import FORMATS
from ..kernels import Fp8Linear, QuantLinear
from ..solvers import Grid, InputScheme, LayerQuant
from .arch import submodule_or_none

log = logging.getLogger(__name__)


def packed_format(path: str | Path) -> str | None:
    """The packed format of a model directory, or None when it is a dense (or qforge) checkpoint."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise QForgeError(f"{cfg} is not valid JSON: {e}") from e
    if not qc:
        return None
    method = qc.get("quant_method")
    if method in FORMATS:
        fmt = qc.get("format")
        names = FORMATS[method].FORMAT_NAMES if method == "compressed-tensors" else ()
        if method == "compressed-tensors" and fmt not in (*names, None):
            raise QForgeError(f"{path}: compressed-tensors format {fmt!r} is not supported (only "
                              f"{', '.join(names)})")
        return method
    raise QForgeError(f"{path}: quantization method {method!r} is not supported; qforge loads "
                      f"{', '.join(FORMATS)}")


def _compressed_tensors_config(path: str | Path) -> dict | None:
    """The quantization_config of a compressed-tensors checkpoint, None for any other."""
    if packed_format(path) != "compressed-tensors":
        return None
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]


def input_acts(path: str | Path) -> InputScheme | None:
    """The input scheme a packed checkpoint's quantized linears quantize their inputs with (compressed-tensors W8A8,
    FP8_DYNAMIC, static scales), None for weight-only ones."""
    qc = _compressed_tensors_config(path)
    return FORMATS["compressed-tensors"].input_acts(qc) if qc is not None else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QForgeError(f"{path} has no .safetensors files")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise QForgeError(f"{f} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    return state


def _grid(fmt: str, qc: dict, name: str) -> Grid:
    if fmt == "compressed-tensors":
        return FORMATS[fmt].grid_for(qc, name)
    grid = FORMATS[fmt].grid_of(qc)
    for pattern, override in (qc.get("dynamic") or {}).items():  # GPTQModel per-module overrides
        import re

        if pattern.startswith("+:"):
            pattern = pattern[2:]
        if not pattern.startswith("-:") and re.match(pattern, name):
            grid = Grid(int(override.get("bits", grid.bits)), int(override.get("group_size", grid.group_size)),
                        bool(override.get("sym", grid.sym)))
            break
    return grid


def packed_config(path: Path) -> tuple[str, dict, object]:
    """(format, quantization_config, the model's config without it) of a packed checkpoint directory."""
    from transformers import AutoConfig

    fmt = packed_format(path)
    if fmt is None:
        raise QForgeError(f"{path} is not a packed (gptq/awq/compressed-tensors) checkpoint")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return fmt, qc, config


def expert_gate_up(qc: dict) -> str | None:
    """How a packed checkpoint's per-expert gate_proj/up_proj split an interleaved gate/up (GPT-OSS): "halves" for
    GPTQModel's (7.6, through Defuser: the first and second half of the interleaved rows), None for the gate and up
    rows themselves (qforge's, llm-compressor's). Read from the writer quantization_config names."""
    writers = (qc.get("meta") or {}).get("quantizer") or []
    return "halves" if any(str(w).startswith("gptqmodel") for w in writers) else None


def quantized_names(fmt: str, keys) -> list[str]:
    """The modules that checkpoint tensor names `keys` store in `fmt`'s packed form."""
    first = FORMATS[fmt].KEYS[0]
    return sorted(k[: -len(first) - 1] for k in keys if k.endswith("." + first))


def packed_layer(fmt: str, qc: dict, name: str, state: dict[str, torch.Tensor], shape: tuple[int, int] | None,
                 where: Path) -> tuple[LayerQuant, torch.Tensor | None, torch.dtype]:
    """(layer, bias or None, the checkpoint's scale dtype) of module `name` (full name; its weight [out, in] is
    `shape`, or None: a stored module the model fuses, checked once fused) from its packed tensors, popped from
    `state` (keyed by full name; its bias too)."""
    grid = _grid(fmt, qc, name)
    t = {k: state.pop(f"{name}.{k}") for k in FORMATS[fmt].KEYS if f"{name}.{k}" in state}
    scale_dtype = next((v.dtype for k, v in t.items() if "scale" in k and v.is_floating_point()), torch.float16)
    try:
        v1 = {"v1": qc.get("checkpoint_format") != "gptq_v2"} if fmt == "gptq" else {}
        q = FORMATS[fmt].unpack(t, grid, **v1)
    except Exception as e:
        raise QForgeError(f"{where}: cannot unpack {name} as {fmt}: {type(e).__name__}: {e}") from e
    if shape is not None and tuple(shape) != q.shape:
        raise QForgeError(f"{name}: packed shape {q.shape} does not match the model's {tuple(shape)}")
    return q, state.pop(f"{name}.bias", None), scale_dtype


def quant_linear(fmt: str, qc: dict, name: str, state: dict[str, torch.Tensor], old: torch.nn.Module,
                 dtype: torch.dtype, cache_dequantized: bool,
                 where: Path) -> tuple[QuantLinear | Fp8Linear, LayerQuant]:
    """The QuantLinear (Fp8Linear for FP8 weights) replacing module `old` (full name `name`) from its packed tensors,
    popped from `state` (keyed by full name; its bias too)."""
    q, bias, scale_dtype = packed_layer(fmt, qc, name, state, tuple(old.weight.shape), where)
    bias = bias.to(dtype) if bias is not None else None
    if q.grid.fp4 or q.grid.mx:         # NVFP4's scales are E4M3 numbers / g, MX's powers of two: exact in fp32
        return Fp8Linear.from_quant(q, bias, torch.float32, cache_dequantized), q
    if q.grid.fp8:
        return Fp8Linear.from_quant(q, bias, scale_dtype, cache_dequantized), q
    return QuantLinear.from_quant(q, bias, scale_dtype, cache_dequantized), q


def load_packed(path: str | Path, dtype: torch.dtype = torch.float32, cache_dequantized: bool = True):
    """(model, tokenizer, {module name: LayerQuant}, format, FP8 KV scales) for a packed checkpoint directory; the KV
    scales ({"<attention module>.k_scale" / ".v_scale": fp32 [1]} under the model's names, {} without) are those of a
    compressed-tensors kv_cache_scheme.

    `cache_dequantized`: QuantLinear keeps each dequantized weight after its first forward (fast CPU
    decoding at the memory of a dense model; see kernels/quant_linear.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    fmt, qc, config = packed_config(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    state = _read_tensors(path)
    kv = pop_kv_scales(fmt, qc, state, model, path)
    layers, fused = {}, False
    for name in quantized_names(fmt, state):
        old = submodule_or_none(model, name)
        if old is None:              # a module the model fuses (Mixtral's experts.{e}.w1): dense, fused below
            layers[name], bias, _ = packed_layer(fmt, qc, name, state, None, path)
            state[f"{name}.weight"] = layers[name].dequantize()
            if bias is not None:
                state[f"{name}.bias"] = bias
            fused = True
            continue
        qlin, layers[name] = quant_linear(fmt, qc, name, state, old, dtype, cache_dequantized, path)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, qlin)
    from .checkpoint_keys import tensor_dtypes, to_model_keys

    dtype_of = tensor_dtypes(model, dtype)               # a router's score bias stays fp32, as from_pretrained keeps it
    state = {k: v.to(dtype_of(k)) if v.is_floating_point() else v for k, v in state.items()}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if dtype_of(name) != dtype:                      # only what the class keeps: packed scales keep their dtype
            t.data = t.data.to(dtype_of(name))
    if fused or any(submodule_or_none(model, k.rpartition(".")[0]) is None for k in state):
        state = to_model_keys(model, state, expert_gate_up(qc))   # stored keys -> the model's (experts fused)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    prefixes = tuple(f"{n}." for n in layers)  # QuantLinear / Fp8Linear buffers were filled from the packed tensors
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not k.startswith(prefixes) and not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise QForgeError(f"{path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for this model")
    if not layers:
        raise QForgeError(f"{path}: config.json says {fmt} but no layer has {fmt} tensors")
    log.info("loaded %s checkpoint %s: %d quantized linears%s", fmt, path, len(layers),
             f", FP8 KV scales of {len(kv) // 2} attention layers" if kv else "")
    return model, AutoTokenizer.from_pretrained(path), layers, fmt, kv


def kv_scale_names(fmt: str, qc: dict, names) -> list[str]:
    """The stored names among `names` that are FP8 KV cache scales (none without a kv_cache_scheme)."""
    if fmt != "compressed-tensors" or not FORMATS[fmt].kv_cache_fp8(qc):
        return []
    return [k for k in names if k.rpartition(".")[2] in FORMATS[fmt].KV_SCALE_KEYS]


def pop_kv_scales(fmt: str, qc: dict, state: dict[str, torch.Tensor], model, path: Path) -> dict[str, torch.Tensor]:
    """The FP8 KV cache scales of a compressed-tensors kv_cache_scheme, popped from `state` and named as the model
    names its attention modules; each attention module that stores one of k_scale / v_scale must store both."""
    if fmt != "compressed-tensors" or not FORMATS[fmt].kv_cache_fp8(qc):
        return {}
    from .checkpoint_keys import to_model_keys

    keys = FORMATS[fmt].KV_SCALE_KEYS
    kv = {k: state.pop(k).float().reshape(1) for k in kv_scale_names(fmt, qc, list(state))}
    if not kv:
        raise QForgeError(f"{path}: its kv_cache_scheme quantizes the KV cache to FP8, but it stores no "
                          f"{' / '.join(keys)} tensors")
    if any(submodule_or_none(model, k.rpartition(".")[0]) is None for k in kv):
        kv = to_model_keys(model, kv)
    owners = {k.rpartition(".")[0] for k in kv}
    for owner in sorted(owners):
        if submodule_or_none(model, owner) is None or any(f"{owner}.{key}" not in kv for key in keys):
            raise QForgeError(f"{path}: FP8 KV scales of {owner!r}: not an attention module of this model, or one of "
                              f"{' / '.join(keys)} missing")
    return kv
