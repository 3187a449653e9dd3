"""qforge's own output directory (written atomically):

  config.json, model.safetensors, tokenizer files   dense model holding the dequantized weights
                                                    (loads in plain transformers; `qforge eval DIR`)
  qforge_quant.safetensors   per quantized linear NAME: NAME.codes uint8 [out, in], NAME.scales fp32
                             [out, G], NAME.zeros fp32 [out, G], NAME.g_idx int32 [in] (what packed
                             formats are made from); static input scales (act_static): NAME.input_scale fp32 [1];
                             NVFP4: NAME.global_scale fp32 [1] (codes then float8_e4m3fn, as FP8's)
  A streamed run (models/streaming.py) writes both block by block instead: model-00001-of-N.safetensors
  holds everything outside the decoder blocks and model-0000<i+2>-of-N block i (model.safetensors.index.json
  maps tensors to files, as transformers reads it); qforge_quant-0000<i+1>-of-M.safetensors holds block i's
  layers and qforge_quant.safetensors.index.json {"layers": {NAME: file}} lists them.
  qforge_config.json         the QuantizeConfig;   qforge_calibration.json  the CalibrationConfig
  calibration.jsonl          the exact calibration samples ({"input_ids": [...]}), reusable with --calib
  run_record.json            versions, timings, peak memory, sizes, per-layer errors, ragged groups
  awq_results.safetensors    AWQ methods: the scales and clips applied (smoothing/store.py; --awq-from)
  kv_scales.safetensors      FP8 KV cache (kv_cache "fp8"): "<attention module>.k_scale" / ".v_scale" fp32 [1]
  allocation.json, allocation.png   mixed precision (--bpw): the scheme of every layer (mixed/plan.py)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .calibration import save_samples_jsonl
from .config import CalibrationConfig, QuantizeConfig
from .errors import QForgeError
from .solvers import Grid, LayerQuant
from .utils.atomic import atomic_dir

QUANT_FILE = "qforge_quant.safetensors"
QUANT_INDEX = "qforge_quant.safetensors.index.json"
CONFIG_FILE = "qforge_config.json"
CALIB_CONFIG_FILE = "qforge_calibration.json"
CALIB_SAMPLES_FILE = "calibration.jsonl"
RECORD_FILE = "run_record.json"
SMOOTHQUANT_FILE = "smoothquant_scales.safetensors"   # W8A8: {"<block>.<prev op>": scales [channels]}, folded in
KV_SCALES_FILE = "kv_scales.safetensors"              # FP8 KV cache: {"<attention module>.k_scale": fp32 [1], ...}


def is_qforge_output(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_layers(layers: dict[str, LayerQuant], path: Path) -> None:
    tensors = {}
    for name, q in layers.items():
        tensors[f"{name}.codes"] = q.codes.contiguous()
        tensors[f"{name}.scales"] = q.scales.contiguous()
        tensors[f"{name}.zeros"] = q.zeros.contiguous()
        tensors[f"{name}.g_idx"] = q.g_idx.contiguous()
        for extra in ("input_scale", "global_scale"):
            if getattr(q, extra) is not None:
                tensors[f"{name}.{extra}"] = getattr(q, extra).contiguous()
    meta = {name: json.dumps({"bits": q.grid.bits, "group_size": q.grid.group_size, "sym": q.grid.sym,
                              **({"fp8": True} if q.grid.fp8 else {}),
                              **({"block_rows": q.grid.block_rows} if q.grid.block_rows else {}),
                              **({"fp4": True} if q.grid.fp4 else {}),
                              **({"mx": True} if q.grid.mx else {})})
            for name, q in layers.items()}
    save_file(tensors, str(path), metadata=meta)


def load_layers(path: Path) -> dict[str, LayerQuant]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        out = {}
        for name, m in meta.items():
            g = json.loads(m)
            grid = Grid(g["bits"], g["group_size"], g["sym"], g.get("fp8", False), g.get("block_rows", 0),
                        g.get("fp4", False), g.get("mx", False))
            out[name] = LayerQuant(grid, t[f"{name}.codes"], t[f"{name}.scales"], t[f"{name}.zeros"],
                                   t[f"{name}.g_idx"], info={},
                                   input_scale=t.get(f"{name}.input_scale"),
                                   global_scale=t.get(f"{name}.global_scale"))
    except QForgeError:
        raise
    except Exception as e:  # SafetensorError, bad JSON metadata, a missing tensor or field
        raise QForgeError(f"{path} is corrupt or not written by qforge: {type(e).__name__}: {e}") from e
    return out


def read_layers(out: str | Path, prefix: str = "", values: bool = True) -> dict[str, LayerQuant]:
    """The layers of output directory `out` (one file or a streamed run's shards) whose names start with
    `prefix`; without `values`, their shapes only (LayerQuant.on_meta), read a shard at a time."""
    out = Path(out)
    if (out / QUANT_INDEX).is_file():
        try:
            where = json.loads((out / QUANT_INDEX).read_text())["layers"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QForgeError(f"{out / QUANT_INDEX} is corrupt: {e}") from e
        files = sorted({f for n, f in where.items() if n.startswith(prefix)})
    else:
        files = [QUANT_FILE]
    layers: dict[str, LayerQuant] = {}
    for f in files:
        layers.update({n: q if values else q.on_meta() for n, q in load_layers(out / f).items()
                       if n.startswith(prefix)})
    return layers


def save_output(out: str | Path, model, tokenizer, qcfg: QuantizeConfig, layers: dict[str, LayerQuant],
                record: dict, calib_cfg: CalibrationConfig | None = None, calib_samples=None,
                overwrite: bool = False, awq: dict | None = None, allocation=None, streamed=None,
                smoothquant: dict | None = None, kv_scales: dict | None = None) -> Path:
    """`streamed`: a streamed run's (runstate.BlockStore, models.streaming.BlockLoader); the model's blocks and
    `layers`' values are read from the store one block at a time, the weights outside the blocks by the loader
    (the model holds neither)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if streamed is None:
            model.save_pretrained(tmp)
            save_layers(layers, tmp / QUANT_FILE)
        else:
            _save_streamed(tmp, model, *streamed)
        tokenizer.save_pretrained(tmp)
        qcfg.save(tmp / CONFIG_FILE)
        if calib_cfg is not None:
            calib_cfg.save(tmp / CALIB_CONFIG_FILE)
        if calib_samples is not None:
            save_samples_jsonl(calib_samples, tmp / CALIB_SAMPLES_FILE)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if awq:
            from .models.arch import arch_spec
            from .smoothing.store import AWQ_FILE, save_awq

            save_awq(awq, arch_spec(model).blocks, tmp / AWQ_FILE,
                     {"bits": qcfg.bits, "group_size": qcfg.group_size, "sym": qcfg.sym, "rotation": qcfg.rotation_key})
        if smoothquant:                             # what W8A8's SmoothQuant folded in (already in the weights)
            save_file({k: v.contiguous() for k, v in smoothquant.items()}, str(tmp / SMOOTHQUANT_FILE))
        if kv_scales:
            save_file({k: v.contiguous() for k, v in kv_scales.items()}, str(tmp / KV_SCALES_FILE))
        if allocation is not None:
            allocation.write_beside(tmp)
    return out


def _save_streamed(tmp: Path, model, store, loader) -> None:
    """The dense model and the layers, one shard per block from `store`, plus the non-block tensors (`loader`)."""
    from .models.arch import arch_spec, get_blocks
    from .models.checkpoint_keys import save_keys
    from .models.streaming import materialized_state
    from .utils.shards import ShardWriter

    blocks = arch_spec(model).blocks
    n = len(get_blocks(model, arch_spec(model)))
    qshard = (lambda k: f"qforge_quant-{k:05d}-of-{n:05d}.safetensors")
    shards = ShardWriter(tmp)                                  # one shard per write: per block
    with loader.outside(model):
        shards.write(save_keys(model, materialized_state(model)))   # outside the blocks (on the meta device)
    qmap = {}
    for i in range(n):
        rel, layers, *_ = store.read(i)
        shards.write(save_keys(model, {f"{blocks}.{i}.{name}": t for name, t in rel.items()}))   # as save_pretrained
        save_layers(layers, tmp / qshard(i + 1))
        qmap.update({name: qshard(i + 1) for name in layers})
    shards.finish()
    (tmp / QUANT_INDEX).write_text(json.dumps({"layers": qmap}, indent=2) + "\n")
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


def read_kv_scales(out: str | Path) -> dict[str, torch.Tensor]:
    """A qforge output's FP8 KV scales ({} when it has none)."""
    path = Path(out) / KV_SCALES_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as e:
        raise QForgeError(f"{path} is corrupt or unreadable: {type(e).__name__}: {e}") from e


def read_config(path: str | Path) -> QuantizeConfig:
    try:
        return QuantizeConfig.load(Path(path) / CONFIG_FILE)
    except (json.JSONDecodeError, TypeError) as e:
        raise QForgeError(f"{path}/{CONFIG_FILE} is corrupt: {e}") from e


def read_record(path: str | Path) -> dict:
    p = Path(path) / RECORD_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def check_layers_match(layers: dict[str, LayerQuant], model: torch.nn.Module) -> None:
    """The saved codes dequantize exactly to the dense weights stored beside them."""
    from .models.arch import linear_ref

    for name, q in layers.items():
        W = linear_ref(model, name).weight
        if not torch.equal(W, q.dequantize().to(W.dtype)):
            raise QForgeError(f"{name}: the dense weights and the saved codes disagree; the output is corrupt")
