"""FP8 KV-cache scales (QuantizeConfig.kv_cache "fp8"): the largest |key| and |value| each attention layer writes into
its cache over the calibration set, as the quantized model runs once its weights are final (keys after the rotary
embedding and any key norm: what the cache stores). vLLM's fp8 cache stores fp8(k / k_scale) and reads it back
times k_scale, so

    k_scale = max|k| / 448,   v_scale = max|v| / 448       (448: E4M3's largest number; nothing saturates)

llm-compressor's kv_cache_scheme (float, 8 bits, strategy "tensor", static) stores the same tensors (its observer
averages batch maxima: smaller scales). Without scales vLLM casts with 1: keys beyond 448 saturate, and values below
E4M3's smallest normal, 2^-6, lose precision; between those, E4M3's relative step is the same whatever the scale
(SmolLM2's keys and values stay there: its ppl barely depends on the scales, BENCHMARKS.md "FP8 KV cache").

Observed through the model's own cache interface: a DynamicCache whose update() records the states before caching
them, passed as past_key_values to a forward over each calibration batch. The writer of each update is the innermost
running module with a `layer_idx` (the attention module calling update(k, v, self.layer_idx)); the scales are named
after it, as checkpoints name them: "<attention module>.k_scale" / ".v_scale" (model.layers.3.self_attn.k_scale).
Blocks without attention (a hybrid model's Mamba or linear-attention layers) write nothing and get no scales.
A streamed run (models larger than RAM) observes the same way, block by block: each batch's cache is handed to the
blocks through their captured calls (capture/blocks.py), each quantized block read from the run state in turn, and
the cache keeps nothing (one forward without a past reads only the states it is given).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from transformers import DynamicCache

from ..errors import QForgeError
from ..models.arch import arch_spec, get_blocks
from ..solvers.grid import FP8_MAX
from .blocks import capture_block_inputs, run_block

log = logging.getLogger(__name__)


class KVRange(DynamicCache):
    """A DynamicCache that first records the largest |key| and |value| written, per writing module (into `absmax`:
    {module name: [max|k|, max|v|] fp32}, shared by every batch's cache; `running`: the names of the modules with a
    layer_idx now running, innermost last). `keep` False: nothing is cached, update() hands back what it is given."""

    def __init__(self, config, absmax: dict[str, torch.Tensor], running: list[str], keep: bool = True):
        super().__init__(config=config)
        self.absmax, self.running, self.keep = absmax, running, keep

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.running:
            raise QForgeError(f"cache layer {layer_idx} was written outside any module with a layer_idx: its "
                              f"attention module is unknown")
        name = self.running[-1]
        m = torch.stack([key_states.detach().abs().amax(), value_states.detach().abs().amax()]).float().cpu()
        self.absmax[name] = torch.maximum(self.absmax.get(name, torch.zeros(2)), m)
        if not self.keep:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def check_calibratable(model: torch.nn.Module) -> None:
    """Refuse a model family whose layers hand keys and values to later ones (ArchSpec.carried: Gemma 4's kv-shared
    layers read an earlier layer's cache, with that layer's scales, which this calibration does not pair up)."""
    spec = arch_spec(model)
    if spec.carried:
        raise QForgeError(f"an FP8 KV cache needs every attention layer's own keys and values; this model family's "
                          f"layers hand them on through {spec.carried!r}, which qforge does not calibrate")


@contextlib.contextmanager
def _writers(model: torch.nn.Module):
    """Inside: a list holding the names of `model`'s modules with a layer_idx now running, innermost last."""
    running: list[str] = []

    def leave(mod, args, out) -> None:
        running.pop()

    hooks = []
    for name, module in model.named_modules():
        if hasattr(module, "layer_idx"):
            hooks.append(module.register_forward_pre_hook(lambda mod, args, name=name: running.append(name)))
            hooks.append(module.register_forward_hook(leave))
    try:
        yield running
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def observe_kv(model: torch.nn.Module, batches: list[torch.Tensor], device="cpu",
               streamed=None) -> dict[str, torch.Tensor]:
    """{attention module name: [max|k|, max|v|]} over `batches` (token ids [batch, seq]) run through `model` as it
    is (its quantized weights, and its inputs' quantization when the caller holds that context).

    `streamed` (a skeleton whose blocks are on the meta device): (outside, load), the context managers that hold
    the weights outside the blocks (models.streaming.BlockLoader.outside) and quantized block i (load(i, block,
    device)) in memory: the first block's inputs are captured on the CPU, then each block runs on `device` in turn."""
    check_calibratable(model)
    absmax: dict[str, torch.Tensor] = {}
    with _writers(model) as running:
        if streamed is None:
            for ids in batches:
                model(input_ids=ids.to(device), past_key_values=KVRange(model.config, absmax, running),
                      use_cache=True)
        else:
            outside, load = streamed
            spec = arch_spec(model)
            caches = [KVRange(model.config, absmax, running, keep=False) for _ in batches]
            with outside(model, without="head"):
                inputs = capture_block_inputs(model, spec, batches, caches)
            hidden = inputs.hidden
            for i, block in enumerate(get_blocks(model, spec)):
                with load(i, block, device):
                    hidden = run_block(block, hidden, inputs.for_block(i), device)
    if not absmax:
        raise QForgeError("the model wrote no keys or values into its cache: no attention layer to calibrate")
    return absmax


def kv_scales(absmax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"<attention module>.k_scale" / ".v_scale": fp32 [1]} from observe_kv's maxima (a module that wrote only zeros
    gets 1, with a warning: any scale reproduces zeros; a non-finite maximum is refused)."""
    out = {}
    for name, both in absmax.items():
        if not torch.isfinite(both).all():
            raise QForgeError(f"{name} wrote non-finite keys or values in calibration: no FP8 KV scale for it")
        for kind, m in zip(("k_scale", "v_scale"), both):
            if not m > 0:
                log.warning("%s wrote only zeros in calibration: its %s is 1", name, kind)
            out[f"{name}.{kind}"] = (m / FP8_MAX if m > 0 else torch.tensor(1.0)).reshape(1).float()
    return out
