"""Finished blocks of a calibrated quantization run, saved as they finish, so an interrupted run resumes.

A directory (the CLI uses `OUT.partial/` beside the output, removed once the output is saved):
  state.json                 {"key": <what the run depends on>, "blocks_done": n}: blocks 0..n-1 are saved
  block_<i>.safetensors      block i after quantization, as it fed block i+1:
                               "state.<param>"          the block's state dict (the norms / linears AWQ folded
                                                        its scales into, biases, unquantized weights), less the
                                                        weights its quantized linears hold (see "rebuilt")
                               "layer.<name>.<field>"   codes, scales, zeros, g_idx of each quantized linear
                                                        (and input_scale with static input scales, global_scale
                                                        with NVFP4)
                               "awq.scale.<unit>", "awq.clip.<linear>"   the block's AWQ results
                               "smoothquant.<unit>"     the SmoothQuant scales folded into it (W8A8)
                             metadata "layers" (JSON {name: {grid, info}}), "alphas" (JSON {unit: α}) and
                             "rebuilt" (JSON {param: {shape, dtype, parts: [[layer, expert, transposed]]}}):
                             the weights left out, rebuilt on reading from their layers' dequantized codes,
                             which the pipeline wrote into them (checked bit for bit before leaving one out):
                             a 4-bit block is stored in ~1.1 bytes per weight instead of 5
Each file is written beside its final name and renamed into place before state.json counts it. A run
resumes only when its key (the quantization config, a hash of the calibration token ids, the model's
source, a fingerprint of its weights, its block count and the per-layer grids) equals the saved one: the restored blocks are then
exactly what this run would have computed, and the pipeline only re-runs them to rebuild the next
block's inputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import QForgeError
from .smoothing.awq_search import BlockAWQ
from .solvers import Grid, LayerQuant
from .utils.atomic import atomic_write_text

log = logging.getLogger(__name__)
STATE = "state.json"


def run_key(cfg_dict: dict, samples: list[torch.Tensor], source: str, n_blocks: int, grids: dict,
            weights: str = "") -> dict:
    """What a run's blocks depend on (JSON-comparable); `weights`: weights_fingerprint of the model."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return {"config": cfg_dict, "samples": h.hexdigest(), "n_samples": len(samples), "source": source,
            "weights": weights, "n_blocks": n_blocks,
            "grids": {n: [g.bits, g.group_size, g.sym] for n, g in sorted(grids.items())}}


def weights_fingerprint(model: torch.nn.Module, per_tensor: int = 4096) -> str:
    """sha256 of every tensor's name, shape and dtype and of up to `per_tensor` evenly spaced values of it: a
    different checkpoint at the same path is noticed without reading every byte (a change confined to the
    unsampled values is not)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // per_tensor)][:per_tensor]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
    return h.hexdigest()


class BlockStore:
    """The saved blocks of one run in directory `path` (created on the first save)."""

    def __init__(self, path: str | Path, key: dict):
        self.path, self.key = Path(path), json.loads(json.dumps(key))   # key as it reads back from JSON
        self.blocks_done = 0
        state = self.path / STATE
        if state.is_file():
            try:
                saved = json.loads(state.read_text())
                done = int(saved["blocks_done"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise QForgeError(f"{state} is corrupt ({e}); remove {self.path} to start the run again") from e
            if saved.get("key") != self.key:
                differ = sorted(k for k in self.key if saved.get("key", {}).get(k) != self.key[k])
                raise QForgeError(f"{self.path} holds the finished blocks of another run ({', '.join(differ)} "
                                  f"differ); remove it, or run with the settings it was made with")
            self.blocks_done = done
            log.info("resuming after block %d of %d (saved in %s)", done, self.key["n_blocks"], self.path)
        elif self.path.exists() and any(self.path.iterdir()):
            raise QForgeError(f"{self.path} exists and is not a qforge run state; remove it or choose another --out")

    def save(self, i: int, block: torch.nn.Module, layers: dict[str, LayerQuant], awq: BlockAWQ | None,
             prefix: str, layout=None, smoothquant: dict[str, torch.Tensor] | None = None) -> None:
        """`layers`: the block's quantized linears by full name, `prefix` + their name in `block`; `layout`: the
        family's ExpertLayout (how its fused experts are stored); `smoothquant`: {unit: s} folded into it."""
        if i != self.blocks_done:
            raise QForgeError(f"run state: block {i} saved after {self.blocks_done} blocks")
        self.path.mkdir(parents=True, exist_ok=True)
        rebuilt = rebuildable_weights(block, layers, prefix, layout)
        t = {f"state.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items() if k not in rebuilt}
        for n, q in layers.items():
            for f in ("codes", "scales", "zeros", "g_idx") + tuple(
                    f for f in ("input_scale", "global_scale") if getattr(q, f) is not None):
                t[f"layer.{n}.{f}"] = getattr(q, f).cpu().contiguous()
        awq = awq or BlockAWQ()
        t.update({f"awq.scale.{u}": s.cpu().contiguous() for u, s in awq.scales.items()})
        t.update({f"awq.clip.{n}": c.cpu().contiguous() for n, c in awq.clips.items()})
        t.update({f"smoothquant.{u}": s.cpu().contiguous() for u, s in (smoothquant or {}).items()})
        grids = {n: [q.grid.bits, q.grid.group_size, q.grid.sym, q.grid.fp8, q.grid.block_rows, q.grid.fp4,
                     q.grid.mx]
                 for n, q in layers.items()}
        meta = {"layers": json.dumps({n: {"grid": grids[n], "info": q.info} for n, q in layers.items()}),
                "alphas": json.dumps(awq.alphas),
                "rebuilt": json.dumps(rebuilt)}
        final = self.path / f"block_{i}.safetensors"
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(t, str(tmp), metadata=meta)
        os.replace(tmp, final)
        self.blocks_done = i + 1
        atomic_write_text(self.path / STATE, json.dumps({"key": self.key, "blocks_done": self.blocks_done}) + "\n")

    def restore(self, i: int, block: torch.nn.Module) -> tuple[dict[str, LayerQuant], BlockAWQ, dict]:
        """Load saved block i into `block`; returns its layers, AWQ results and SmoothQuant scales."""
        state, layers, awq, smoothquant = self.read(i)
        try:
            block.load_state_dict(state)
        except Exception as e:  # a shape mismatch, a missing key
            raise QForgeError(f"block {i} in {self.path} does not fit the model ({type(e).__name__}: {e}); remove "
                              f"{self.path} to start the run again") from e
        return layers, awq, smoothquant

    def read(self, i: int, rebuild: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, LayerQuant], BlockAWQ,
                                                          dict[str, torch.Tensor]]:
        """Saved block i: its state dict (names relative to the block), its layers, AWQ results and SmoothQuant
        scales. Without `rebuild`, the weights its layers hold come back on the meta device (what packing needs
        of them)."""
        path = self.path / f"block_{i}.safetensors"
        try:
            with safe_open(str(path), "pt") as f:
                meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            state = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
            layers = {n: LayerQuant(Grid(*d["grid"]), t[f"layer.{n}.codes"], t[f"layer.{n}.scales"],
                                    t[f"layer.{n}.zeros"], t[f"layer.{n}.g_idx"], d["info"],
                                    input_scale=t.get(f"layer.{n}.input_scale"),
                                    global_scale=t.get(f"layer.{n}.global_scale"))
                      for n, d in json.loads(meta["layers"]).items()}
            rebuilt = json.loads(meta.get("rebuilt", "{}"))
            state.update(rebuild_weights(rebuilt, layers) if rebuild else
                         {p: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
                          for p, e in rebuilt.items()})
            awq = BlockAWQ({k[len("awq.scale."):]: v for k, v in t.items() if k.startswith("awq.scale.")},
                           json.loads(meta["alphas"]),
                           {k[len("awq.clip."):]: v for k, v in t.items() if k.startswith("awq.clip.")})
            smoothquant = {k[len("smoothquant."):]: v for k, v in t.items() if k.startswith("smoothquant.")}
        except Exception as e:  # a missing or damaged file: SafetensorError, KeyError, a shape mismatch ...
            raise QForgeError(f"{path} cannot be restored ({type(e).__name__}: {e}); remove {self.path} to start "
                              f"the run again") from e
        return state, layers, awq, smoothquant

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def rebuildable_weights(block: torch.nn.Module, layers: dict[str, LayerQuant], prefix: str,
                        layout=None) -> dict[str, dict]:
    """The parameters of `block` (by state-dict name) that its quantized `layers` reproduce exactly: every
    linear they hold dequantizes bit for bit to what it stores (a fused expert parameter: every expert), so
    the codes alone can rebuild them. {param: {shape, dtype, parts: [[layer, expert or None, transposed]]}}."""
    from .models.arch import linear_ref

    found: dict[str, dict] = {}
    for name, q in layers.items():
        ref = linear_ref(block, name[len(prefix):], layout)
        param = f"{ref.name}.{ref.param}" if ref.expert is None else ref.name.rpartition(".")[0]
        t = getattr(ref.module, ref.param)
        e = found.setdefault(param, {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                     "parts": [], "exact": True})
        e["parts"].append([name, ref.expert, ref.transposed])
        e["exact"] &= bool(torch.equal(ref.weight, q.dequantize().to(ref.weight.device, ref.weight.dtype)))
    return {p: e for p, e in found.items() if e.pop("exact")
            and (len(e["parts"]) == 1 if e["parts"][0][1] is None else len(e["parts"]) == e["shape"][0])}


def rebuild_weights(rebuilt: dict[str, dict], layers: dict[str, LayerQuant]) -> dict[str, torch.Tensor]:
    """The parameters rebuildable_weights left out, from their layers' codes."""
    out = {}
    for param, e in rebuilt.items():
        t = torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]))
        for name, expert, transposed in e["parts"]:
            W = layers[name].dequantize()
            (t if expert is None else t[expert]).copy_(W.t() if transposed else W)
        out[param] = t
    return out
