"""GGUF files read one tensor at a time, under the transformers model's parameter names.

gguf-py's GGUFReader memory-maps the file; `GGUFTensors.read(keys)` dequantizes only the GGUF tensors those
parameters come from (gguf-py's `dequantize`, to fp32) and passes each through transformers' tensor processor
for the file's architecture, as transformers' own GGUF loading does: Llama's q/k rows un-permuted, Qwen-MoE's
per-expert gate and up tensors written into halves of one fused `gate_up_proj`. Memory holds the tensors asked
for, not the model (transformers' `from_pretrained(gguf_file=)` holds every dequantized tensor and the model,
twice the fp32 model).

Two uses: `write_dense` converts a GGUF file to a safetensors directory one tensor at a time (the dense cache of
loading.py, and `qforge convert`), and a streamed run (streaming.py) reads a GGUF file's blocks straight from
it, with no dense copy on disk (a Q4 file's fp32 copy is eight times its size). The GGML types the file stored
its weights as are kept (`stored_types`, gguf_source.json beside a conversion): `source_grid_warning` flags a
quantization that re-creates the file's own grid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import QForgeError

log = logging.getLogger(__name__)


# GGML types whose weights lie on a uniform grid per group: (bits, group size, symmetric). K-quants: their
# sub-blocks (the scales are quantized again, which leaves the weights on a sub-block's grid); IQ types are
# codebooks, not grids, and F16/BF16/F32 are not quantized.
GGML_GRIDS = {"Q4_0": (4, 32, True), "Q4_1": (4, 32, False), "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
              "Q8_0": (8, 32, True), "Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False),
              "Q5_K": (5, 32, False), "Q6_K": (6, 16, True)}
SOURCE_FILE = "gguf_source.json"   # beside a dense conversion: {"file", "path", "types": {parameter: GGML type}}


def _read_error(path: Path, e: Exception) -> QForgeError:
    return QForgeError(f"could not read GGUF file {path}: {type(e).__name__}: {e}")


# GGUF metadata transformers 5.17 does not read, leaving the model type's default (Qwen3-MoE's expert width 768
# for every file): {field after "<arch>.": config attribute}
_UNREAD_FIELDS = {"expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_parts(path: Path) -> list[Path]:
    """The files of GGUF model `path`: itself, or for a split model (llama.cpp's gguf-split names, any part
    given: `<stem>-00001-of-00003.gguf`, ...) every part in order, the first holding the metadata."""
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise QForgeError(f"{path.name} is part of a model split in {count} files; missing: {', '.join(missing)}")
    return parts


def gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises many types on a corrupt or foreign file
        raise _read_error(path, e) from e


def gguf_config(path: Path, readers: list | None = None):
    """The transformers config of GGUF model `path` (the first file of a split one; its metadata only, no tensor
    is read), with the fields transformers leaves unread (_UNREAD_FIELDS) taken from the file. A split model's
    lm_head is untied when a later part holds it (transformers looks in the first file only). `readers`: the
    GGUFReaders of its parts if open."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise _read_error(path, e) from e
    readers = readers or [gguf_reader(p) for p in gguf_parts(path)]
    if config.tie_word_embeddings and any(t.name == "output.weight" for r in readers[1:] for t in r.tensors):
        config.tie_word_embeddings = False
    reader = readers[0]
    arch = read_field(reader, "general.architecture")[0]
    for field, attr in _UNREAD_FIELDS.items():
        value = read_field(reader, f"{arch}.{field}")
        if value and hasattr(config, attr) and getattr(config, attr) != int(value[0]):
            log.info("%s: %s = %d from the file's %s (transformers keeps %s)", path.name, attr, int(value[0]),
                     field, getattr(config, attr))
            setattr(config, attr, int(value[0]))
    return config


def gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise _read_error(path, e) from e


def skeleton(config) -> nn.Module:
    """The model of `config` with every parameter on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # an architecture this transformers lacks, an inconsistent config
        raise QForgeError(f"could not build the {getattr(config, 'model_type', '?')} model of its config: "
                          f"{type(e).__name__}: {e}") from e
    return model.eval()


class GGUFTensors:
    """The tensors of GGUF file `path` under the parameter names of `model` (its skeleton; None: built here from
    the file's config, as `.model`), read on demand. Has the interface of streaming.CheckpointFiles: `where`
    (parameter name -> file), `read`, `fingerprint`."""

    def __init__(self, path: Path, model: nn.Module | None = None):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        self.parts = gguf_parts(Path(path))
        self.path = self.parts[0]
        self.readers = [gguf_reader(p) for p in self.parts]      # parsed once: the config's fields come from them too
        self.model = model if model is not None else skeleton(gguf_config(self.path, self.readers))
        model = self.model
        try:
            arch = read_field(self.readers[0], "general.architecture")[0]
        except Exception as e:
            raise _read_error(self.path, e) from e
        # the processors read the config's head counts under transformers' names
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        self.mapping = gguf_names(model, self.processor, arch)              # GGUF name -> parameter name
        # the GGUF tensors each parameter is made of (a fused MoE parameter: several; the processors' MoE
        # patterns look the mapping up without the ".weight" suffix)
        self.sources: dict[str, list] = {}
        self.where: dict[str, str] = {}                       # parameter -> the file of its (first) tensor
        for part, reader in zip(self.parts, self.readers):
            for t in reader.tensors:
                target = self.mapping.get(t.name) or self.mapping.get(t.name.removesuffix(".weight"))
                if target is not None:
                    self.sources.setdefault(target, []).append(t)
                    self.where.setdefault(target, part.name)
                else:
                    log.debug("%s: tensor %s names no parameter of the model; skipped", part.name, t.name)
        self.shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}

    def stored_types(self) -> dict[str, str]:
        """{parameter name: the GGML type it is stored as in the file} (a fused parameter: its first part's)."""
        return {k: ts[0].tensor_type.name for k, ts in self.sources.items()}

    def read(self, keys: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Parameters `keys`, dequantized, in `dtype` (None: fp32, as dequantized)."""
        from gguf import dequantize

        out: dict[str, torch.Tensor] = {}
        for key in keys:
            made: dict[str, dict] = {"tensors": {}}      # what a processor writes into (fused MoE parameters)
            for t in self.sources[key]:
                try:
                    weights = dequantize(t.data, t.tensor_type)
                except Exception as e:
                    raise QForgeError(f"{self.path}: could not dequantize {t.name} "
                                      f"({t.tensor_type.name}): {type(e).__name__}: {e}") from e
                r = self.processor.process(weights=weights, name=t.name, tensor_key_mapping=self.mapping,
                                           parsed_parameters=made)
                if r.name is not None and r.name in self.mapping:
                    made["tensors"][self.mapping[r.name]] = torch.from_numpy(np.array(r.weights, copy=True))
            if key not in made["tensors"]:
                raise QForgeError(f"{self.path}: the tensors of {key} did not make it (transformers' processor for "
                                  f"this architecture names them otherwise)")
            t = made["tensors"][key]
            if tuple(t.shape) != self.shapes[key]:
                raise QForgeError(f"{self.path}: {key} is {list(t.shape)} in the file but {list(self.shapes[key])} in "
                                  f"the model its metadata describes (as transformers reads it)")
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def fingerprint(self) -> str:
        """sha256 of every file's name and size and of every tensor's name, type, shape and offset."""
        h = hashlib.sha256()
        for part, reader in zip(self.parts, self.readers):
            h.update(f"{part.name}|{part.stat().st_size}|".encode())
            for t in reader.tensors:
                h.update(f"{t.name}|{t.tensor_type.name}|{list(t.shape)}|{t.data_offset};".encode())
        return h.hexdigest()


def gguf_names(model: nn.Module, processor, arch: str) -> dict[str, str]:
    """{GGUF tensor name: parameter name} for `model` and GGUF architecture `arch`: what transformers'
    get_gguf_hf_weights_map returns, with gguf-py's name table built once. That function recurses into every
    submodule, matching the names relative to it too, and builds the table (every layer's names) at each: quadratic
    in depth, 103 of the 106 s of converting a 120-block SmolLM2 (BENCHMARKS.md "GGUF files"). Here each
    submodule, in the same pre-order, maps the names below it with one table; earlier matches win, as there."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    ids = [k for k, v in MODEL_ARCH_NAMES.items() if v == arch]
    if not ids:
        raise QForgeError(f"GGUF architecture {arch!r} is unknown to gguf-py {_gguf_version()}")
    table = get_tensor_name_map(ids[0], model.config.num_hidden_layers)
    names = list(model.state_dict())
    mapping: dict[str, str] = {}
    for qual, _ in model.named_modules():
        prefix = f"{qual}." if qual else ""
        found: dict[str, str] = {}
        for full in names:
            if not full.startswith(prefix):
                continue
            hf_name = processor.preprocess_name(full[len(prefix):])
            name, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, "")
            suffix = f".{suffix}" if suffix else ""
            gguf_name = table.get_name(name)
            if gguf_name is None:
                processor.perform_fallback_tensor_mapping(found, suffix, prefix, hf_name)
            else:
                found[gguf_name + suffix] = prefix + hf_name
        for k, v in found.items():
            mapping.setdefault(k, v)
    return mapping


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def write_dense(path: Path, out: Path, max_shard_bytes: int = 500 * 10**6, show_progress: bool = False,
                dtype: torch.dtype = torch.float32) -> None:
    """Write GGUF file `path` as a Hugging Face directory `out` (safetensors shards under the keys save_pretrained
    writes, config, generation config, tokenizer) into existing empty directory `out` (the caller's atomic
    directory). Memory holds the shard being filled (safetensors writes a file whole), hence small shards.
    `dtype`: the weights' (fp32 holds the dequantized values exactly; bf16/fp16 halve the size and round them)."""
    from transformers import GenerationConfig

    from ..utils.progress import progress
    from ..utils.shards import ShardWriter
    from .checkpoint_keys import save_keys
    from .loading import check_finite_tensors

    from .streaming import tied_aliases

    tensors = GGUFTensors(path)
    model, config = tensors.model, tensors.model.config
    names = list(model.state_dict())
    stored = [n for n in names if n in tensors.where]             # a tied lm_head: once, as the file stores it
    tied = tied_aliases(model, tensors.where)
    missing = [n for n in names if n not in tensors.where and n not in tied]
    if missing:
        raise QForgeError(f"{path}: no tensor of the GGUF file makes {len(missing)} parameter(s) of the "
                          f"{config.model_type} model, e.g. {missing[:3]}")
    writer = ShardWriter(out, max_shard_bytes)
    for name in progress(stored, f"dequantizing {path.name}", enabled=show_progress):
        t = tensors.read([name], dtype)
        check_finite_tensors(t.items())                          # after the cast: fp16 may overflow
        writer.write(save_keys(model, t))         # as a hub checkpoint stores it (Qwen-MoE: one tensor per expert)
    writer.finish()
    conf = config.to_dict()
    conf.pop("quantization_config", None)
    conf["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / SOURCE_FILE).write_text(json.dumps({"file": tensors.path.name, "path": str(tensors.path.resolve()),
                                               "types": tensors.stored_types()}, indent=1) + "\n")
    GenerationConfig.from_model_config(config).save_pretrained(out)
    gguf_tokenizer(tensors.path).save_pretrained(out)


def source_types(directory: Path) -> dict[str, str] | None:
    """The GGML types a dense conversion's parameters were stored as (None: not converted from GGUF)."""
    f = Path(directory) / SOURCE_FILE
    return json.loads(f.read_text())["types"] if f.is_file() else None


def source_grid_warning(types: dict[str, str] | None, blocks: str, bits: int, group_size: int) -> str | None:
    """A warning when quantizing at `bits` and `group_size` re-creates the grid the GGUF file stored the block
    weights on (as many bits or more, groups that split the file's groups): the weights are already on such a
    grid, so the quantization error, and any comparison of methods, comes out artificially small."""
    if not types or group_size <= 0:
        return None
    prefix = blocks + "."
    hits = Counter(t for name, t in types.items() if name.startswith(prefix) and t in GGML_GRIDS and
                   bits >= GGML_GRIDS[t][0] and GGML_GRIDS[t][1] % group_size == 0)
    if not hits:
        return None
    kinds = "; ".join(f"{n} as {t} ({GGML_GRIDS[t][0]}-bit, groups of {GGML_GRIDS[t][1]})" for t, n in hits.items())
    return (f"the GGUF file stored the blocks' weight tensors {kinds}: quantizing them at {bits} bits in groups of "
            f"{group_size} nearly re-creates that grid, so their error (and any comparison of methods) is "
            f"artificially small; judge at coarser groups (e.g. 64, or per-channel) or fewer bits")


def type_counts(types: dict[str, str] | None) -> dict[str, int] | None:
    """How many of the file's tensors (those the model uses) each GGML type stored, most first."""
    return dict(Counter(types.values()).most_common()) if types else None
