"""Models larger than RAM: a skeleton model whose decoder blocks are read from the checkpoint one at a time.

`load_streamed(spec)` builds the model with its parameters on the meta device (accelerate's
init_empty_weights; buffers such as rotary tables are real). `BlockLoader.load(i, block)` reads block i's
tensors from the safetensors files (or a GGUF file, dequantized: models/gguf.py) in fp32 (checked finite);
`release(block)` puts its parameters back on the meta device. The weights outside the block list (embeddings,
final norm, lm_head) are read only inside `BlockLoader.outside(model)`: for the calibration capture and for
writing the outputs. Memory holds one block and the calibration activations (a 70B model's fp32 embeddings and
lm_head alone are 8.4 GB). A packed checkpoint streams too, for evaluation (eval/streamed.py): `PackedBlockLoader`
dequantizes each block's packed linears into the skeleton's own modules. `SavedBlocks` reads a finished streamed
run's blocks for export. A rotated run (smoothing/rotate.rotate_streamed) sets `BlockLoader.rotation`: every block
is rotated as it is read, and the weights outside the blocks inside outside().

Checkpoint keys are read under the model's parameter names: keys transformers renames or converts while
loading (Mixtral's per-expert tensors fused into 3-D parameters) go through transformers' own transforms, a
block's tensors at a time (models/checkpoint_keys.py); a checkpoint whose keys still do not name the model's
parameters is refused, naming keys that differ.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import QForgeError
from ..utils.shards import INDEX
from .arch import arch_spec, get_blocks, submodule_or_none
from .gguf import skeleton
from .loading import LoadedModel, check_finite_tensors, gguf_file, resolve_model
from .packed import (expert_gate_up, kv_scale_names, packed_config, packed_format, packed_layer, pop_kv_scales,
                     quantized_names)

log = logging.getLogger(__name__)


class CheckpointFiles:
    """The tensors of a safetensors checkpoint directory (one file, or shards listed by an index), by key."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        index = path / INDEX
        try:
            if index.is_file():
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            elif (path / "model.safetensors").is_file():
                files = ["model.safetensors"]
            else:
                raise QForgeError(f"{path} has no model.safetensors or {INDEX}: streaming reads safetensors only")
            self.where: dict[str, str] = {}
            for f in files:
                with safe_open(str(path / f), "pt") as sf:
                    self.where.update({k: f for k in sf.keys()})
        except QForgeError:
            raise
        except Exception as e:  # a missing shard, bad JSON, a damaged header
            raise QForgeError(f"could not read the checkpoint index of {path}: {type(e).__name__}: {e}") from e

    def read(self, keys: list[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The tensors `keys` in `dtype` (floating point; None: as stored) or as stored."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for f, ks in by_file.items():
            try:
                with safe_open(str(self.path / f), "pt") as sf:
                    for k in ks:
                        t = sf.get_tensor(k)
                        out[k] = t.to(dtype) if t.is_floating_point() and dtype is not None else t
            except Exception as e:
                raise QForgeError(f"could not read {self.path / f}: {type(e).__name__}: {e}") from e
        return out

    def fingerprint(self) -> str:
        """sha256 of every file's name, size and safetensors header (names, dtypes, shapes, offsets)."""
        h = hashlib.sha256()
        for f in sorted(set(self.where.values())):
            p = self.path / f
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f"{f}|{p.stat().st_size}|".encode() + fh.read(n))
        return h.hexdigest()


def load_streamed(spec: str) -> tuple[LoadedModel, "BlockLoader"]:
    """A skeleton of MODEL `spec` (a local directory, GGUF file or alias: read straight from the GGUF file,
    models/gguf.py), every parameter on the meta device, and the loader of its blocks and of the weights outside
    them. Those are read once here, one tensor at a time, to refuse a non-finite one before any work, then
    dropped until `BlockLoader.outside` is entered."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = gguf_file(spec)
    if gguf is not None:                        # read straight from the file: no dense copy on disk
        from .gguf import GGUFTensors, gguf_tokenizer

        tensors = GGUFTensors(gguf)
        lm, loader = _streamed(spec, gguf, tensors.model, gguf_tokenizer(gguf), tensors, None)
        lm.source_types = tensors.stored_types()
        return lm, loader
    where = resolve_model(spec)
    if isinstance(where, str):
        raise QForgeError(f"streaming reads a local checkpoint; {spec!r} is not a local directory or GGUF file")
    where = Path(where)
    files = CheckpointFiles(where)
    fmt = packed_format(where)
    try:
        model = skeleton(packed_config(where)[2] if fmt else AutoConfig.from_pretrained(str(where)))
        tokenizer = AutoTokenizer.from_pretrained(str(where))
    except Exception as e:
        raise QForgeError(f"could not build the model of {where}: {type(e).__name__}: {e}") from e
    if not fmt:                                 # stored keys that from_pretrained converts (Mixtral's experts)
        from .checkpoint_keys import converted

        files = converted(files, model)
    return _streamed(spec, where, model, tokenizer, files, fmt)


def _streamed(spec: str, where: Path, model: nn.Module, tokenizer, files, fmt: str | None):
    """Check that `files` (a checkpoint's tensors under `model`'s names) make every parameter and that the
    weights outside the blocks are finite; the loader of its blocks."""
    loader = PackedBlockLoader(files, model, where) if fmt else BlockLoader(files, model)
    names = model.state_dict()                  # every tensor name the model has, blocks included
    targets = set(files.where)                  # the names the checkpoint's tensors load as
    if fmt:                                     # packed modules load as their dense weights, then as any key
        from .checkpoint_keys import model_names

        packed = set(quantized_names(fmt, files.where))
        targets = model_names(model, [k for k in files.where if (k.rpartition(".")[0] not in packed or
                                      k.endswith(".bias")) and k not in loader.kv_names] +
                              [f"{p}.weight" for p in packed],
                              expert_gate_up(loader.qc))
    missing = sorted(n for n in names if n not in targets and n not in loader.tied)
    extra = sorted(k for k in targets if k not in names)
    if missing:
        raise QForgeError(f"{where}: the checkpoint's tensor names are not the model's parameter names ("
                          f"{len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unknown, e.g. {extra[:2]}), "
                          f"so its blocks cannot be read one at a time; load it without streaming")
    if extra:                                   # as from_pretrained: a multimodal checkpoint's vision tower
        log.warning("%s: %d stored tensors are not the model's and stay unread (e.g. %s)", where, len(extra),
                    extra[:2])
    for k in loader.outside_keys:
        check_finite_tensors(files.read([k], dtype=None).items())     # as stored: no fp32 copy
    for block in get_blocks(model, loader.spec):  # persistent buffers the skeleton made (DeepSeek's router bias)
        if BlockLoader.materialized(block):       # come from the checkpoint too, block by block
            BlockLoader.release(block)
    return_freed_memory()
    log.info("streaming %s: %d blocks read one at a time", where, len(get_blocks(model, loader.spec)))
    from .gguf import source_types

    return LoadedModel(model, tokenizer, spec, where, source_types(where) if where.is_dir() else None), loader


def tied_aliases(model: nn.Module, stored) -> dict[str, str]:
    """Tied embeddings the checkpoint stores once (under either name): {the absent name: the stored one}."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None or emb is None:
        return {}
    by_module = {id(m): f"{n}.weight" for n, m in model.named_modules()}
    pair = (by_module[id(head)], by_module[id(emb)])
    present = [n for n in pair if n in stored]
    return {n: present[0] for n in pair if n not in stored} if len(present) == 1 else {}


class BlockLoader:
    """Reads `model`'s decoder block i from `files` and drops it again; and, inside `outside(model)`, the
    weights outside the blocks (embeddings, final norm, lm_head), which a streamed run needs only to capture
    the first block's inputs and to write its outputs: the rest of the time memory holds one block."""

    def __init__(self, files: CheckpointFiles, model: nn.Module):
        self.files, self.spec = files, arch_spec(model)
        self.blocks = self.spec.blocks
        self.tied = tied_aliases(model, files.where)
        prefix = self.blocks + "."
        self.outside_keys = [n for n in model.state_dict() if not n.startswith(prefix) and n in files.where]
        self.rotation = None        # a smoothing.rotate.Rotation (rotate_streamed): applied to what is read

    def fingerprint(self) -> str:
        return self.files.fingerprint()

    def load(self, i: int, block: nn.Module) -> None:
        prefix = f"{self.blocks}.{i}."
        keys = [prefix + n for n in block.state_dict()]
        t = self.files.read(keys)
        check_finite_tensors(t.items())
        block.load_state_dict({k[len(prefix):]: v for k, v in t.items()}, strict=True, assign=True)
        if self.rotation is not None:
            self.rotation.rotate_block(i, block)

    @contextlib.contextmanager
    def loaded(self, i: int, block: nn.Module, device="cpu"):
        """Block i read and on `device` while inside, dropped after (release)."""
        self.load(i, block)
        block.to(device)
        try:
            yield block
        finally:
            self.release(block)

    @contextlib.contextmanager
    def outside(self, model: nn.Module, dtype: torch.dtype = torch.float32, without: str | None = None):
        """The weights outside the blocks in memory (checked finite) while inside, on the meta device after.
        `dtype`: theirs while inside (an export reads them straight into its dtype: a 70B vocabulary's embeddings
        and lm_head take 4.2 GB in fp16 instead of 8.4 GB in fp32 plus the fp16 copies).
        `without`: "head" leaves the output embeddings on the meta device (the capture pass runs only the
        module that owns the blocks), "embeddings" the input embeddings (a pass that stands something in for
        them: eval/streamed.py). Tied embeddings are one tensor and always load."""
        from .checkpoint_keys import tensor_dtypes

        skip, dtype_of = self._keys_of(model, without), tensor_dtypes(model, dtype)   # fp32: a router's score bias
        read_as = (lambda k: None) if self.rotation is not None else dtype_of     # rotated from the values stored
        t = {k: self.files.read([k], read_as(k))[k] for k in self.outside_keys if k not in skip}   # one at a time
        check_finite_tensors(t.items())
        t.update({n: t[stored] for n, stored in self.tied.items()})
        model.load_state_dict(t, strict=False, assign=True)
        if self.tied:
            model.tie_weights()
        empty = {k: torch.empty_like(v, device="meta") for k, v in t.items()}
        del t
        if self.rotation is not None:           # new rotated tables in `dtype`; then the rest, one at a time
            self.rotation.rotate_outside(model, dtype)
            for k in empty:
                v = model.state_dict()[k]
                if v.is_floating_point() and v.dtype != dtype_of(k):
                    model.load_state_dict({k: v.to(dtype_of(k))}, strict=False, assign=True)
                del v
        try:
            yield model
        finally:
            model.load_state_dict(empty, strict=False, assign=True)
            if self.tied:
                model.tie_weights()
            return_freed_memory()

    def _keys_of(self, model: nn.Module, part: str | None) -> set[str]:
        if part is None or self.tied:           # stored once: read for either
            return set()
        if part not in ("head", "embeddings"):
            raise ValueError(f"outside(without={part!r}): expected 'head' or 'embeddings'")
        module = model.get_output_embeddings() if part == "head" else model.get_input_embeddings()
        name = next((n for n, m in model.named_modules() if m is module), None)
        return set() if name is None else {f"{name}.{k}" for k in module.state_dict()}

    @staticmethod
    def release(block: nn.Module) -> None:
        """Parameters and persistent buffers back on the meta device (non-persistent buffers stay), and the
        freed memory handed back to the system."""
        block.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in block.state_dict().items()},
                              assign=True)
        return_freed_memory()

    @staticmethod
    def materialized(block: nn.Module) -> bool:
        return any(t.device.type != "meta" for t in block.state_dict().values())


class PackedBlockLoader(BlockLoader):
    """Block i of a packed checkpoint (models/packed.py's formats), dequantized: each packed linear's codes become
    the skeleton's own dense fp32 weight (what QuantLinear computes with on the CPU, without its repacking), and
    everything else loads in fp32. One dense block in memory, as a dense checkpoint streams. For evaluating a
    packed model larger than RAM."""

    def __init__(self, files: CheckpointFiles, model: nn.Module, where: Path):
        super().__init__(files, model)
        self.where, self.model = where, model
        self.fmt, self.qc, _ = packed_config(where)
        self.kv_names = set(kv_scale_names(self.fmt, self.qc, files.where))   # FP8 KV scales: read apart, not loaded
        self.outside_keys = [k for k in self.outside_keys if k not in self.kv_names]

    def kv_scales(self) -> dict[str, torch.Tensor]:
        """The checkpoint's FP8 KV cache scales under the model's names (packed.pop_kv_scales), {} without."""
        return pop_kv_scales(self.fmt, self.qc, self.files.read(sorted(self.kv_names), dtype=None), self.model,
                             self.where)

    def load(self, i: int, block: nn.Module) -> None:
        from .checkpoint_keys import to_model_keys

        prefix = f"{self.blocks}.{i}."
        state = self.files.read([k for k in self.files.where if k.startswith(prefix) and k not in self.kv_names],
                                dtype=None)
        dense = {}
        for name in quantized_names(self.fmt, state):
            module = submodule_or_none(block, name[len(prefix):])   # None: stored apart, fused by the model (experts)
            shape = tuple(module.weight.shape) if module is not None else None
            q, bias, _ = packed_layer(self.fmt, self.qc, name, state, shape, self.where)
            dense[f"{name}.weight"] = q.dequantize()                  # fp32
            if bias is not None:
                dense[f"{name}.bias"] = bias.float()
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        state.update(dense)
        rest = {k[len(prefix):]: v for k, v in to_model_keys(self.model, state, expert_gate_up(self.qc)).items()}
        check_finite_tensors(rest.items())
        missing, unexpected = block.load_state_dict(rest, strict=False, assign=True)
        if missing or unexpected:
            raise QForgeError(f"{self.where}: block {i}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")


class SavedBlocks:
    """The finished blocks of a streamed run, for export: from its saved output directory `output` (dense
    shards and layer shards), or, before it is saved, from its run state `store` (runstate.BlockStore); the
    weights outside the blocks from `loader`'s checkpoint (quantizing never changes them)."""

    def __init__(self, loader: BlockLoader, output: Path | None = None, store=None):
        if (output is None) == (store is None):
            raise QForgeError("SavedBlocks reads an output directory or a run state")
        self.loader, self.output, self.store = loader, output, store
        self.outside = loader.outside
        self.release = loader.release

    def load(self, i: int, block: nn.Module) -> dict:
        """Block i into `block` (from a run state, its quantized weights on the meta device); returns its layers by
        full name."""
        if self.store is not None:
            state, layers, *_ = self.store.read(i, rebuild=False)     # the packed layers replace those weights
            block.load_state_dict(state, strict=True, assign=True)
            return layers
        from ..checkpoint import read_layers

        self.loader.load(i, block)
        return read_layers(self.output, f"{self.loader.blocks}.{i}.")

    @contextlib.contextmanager
    def running(self, i: int, block: nn.Module, device="cpu"):
        """Block i with its quantized weights (from a run state, rebuilt from their codes) on `device` while inside,
        to run it; dropped after."""
        if self.store is not None:
            state, *_ = self.store.read(i)
            block.load_state_dict(state, strict=True, assign=True)
        else:
            self.loader.load(i, block)
        block.to(device)
        try:
            yield block
        finally:
            self.release(block)


def materialized_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """`model`'s state tensors whose names start with `prefix` and that are in memory (a streamed model's blocks,
    on the meta device, are left out); tied tensors once, under the first name (as save_pretrained writes them)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if not name.startswith(prefix) or t.device.type == "meta" or (t.data_ptr() in seen and t.numel()):
            continue
        seen.add(t.data_ptr())
        state[name] = t
    return state


def return_freed_memory() -> None:
    """glibc's malloc_trim: a block's tensors below malloc's mmap threshold (32 MB) live on the heap, and reading
    and dropping one block after another fragments it, resident memory growing by ~30 MB per block of a
    1B-parameter model; trimming after each block returns those pages. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
