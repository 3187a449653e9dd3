"""Tensor statistics that explain quantization difficulty (arXiv 2402.18158, §5):

- AbsMax: max |x|, the dynamic range a grid must cover;
- Std: the population standard deviation σ;
- kurtosis: E[(x − μ)⁴] / σ⁴ (Pearson's, not excess): a normal distribution gives 3, heavier tails
  (outliers) give more, and a grid stretched to the outliers wastes its levels on the bulk.

Taken for every quantizable weight, the input activations of every linear (on calibration data) and
the keys and values of every attention layer as they enter the KV cache (keys after rotary
embedding). Activations stream through `Moments` (fp64 power sums about a shift, so nothing is held);
per-layer values summarise a decoder layer's tensors of one kind: the largest AbsMax, the RMS of the
Stds, the largest kurtosis.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from transformers import DynamicCache

from ..capture.blocks import make_batches
from ..errors import QForgeError
from ..models.arch import arch_spec, block_linears, get_blocks, linear_modules, linear_name

log = logging.getLogger(__name__)
KINDS = ("weights", "activations", "keys", "values")


class Moments:
    """Streaming AbsMax, Std and kurtosis of every value passed to `update`."""

    def __init__(self) -> None:
        self.n, self.shift, self.absmax = 0, None, 0.0
        self.s = torch.zeros(4, dtype=torch.float64)     # Σ d^k for k = 1..4, d = x − shift

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return
        if self.shift is None:
            self.shift = float(x.mean())                 # a shift near the mean keeps the power sums well conditioned
        d = x - self.shift
        d2 = d * d
        self.s += torch.stack([d.sum(), d2.sum(), (d2 * d).sum(), (d2 * d2).sum()]).cpu()
        self.n += x.numel()
        self.absmax = max(self.absmax, float(x.abs().max()))

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise QForgeError("no values were recorded")
        m1, m2, m3, m4 = (float(v) / self.n for v in self.s)
        var = m2 - m1 * m1                                # central moments from the shifted raw ones
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        kurt = c4 / (var * var) if var > 0 else float("nan")
        return {"absmax": self.absmax, "std": max(var, 0.0) ** 0.5, "kurtosis": kurt, "mean": m1 + (self.shift or 0.0),
                "count": self.n}


def tensor_stats(x: torch.Tensor) -> dict[str, float]:
    m = Moments()
    m.update(x)
    return m.result()


class RecordingKVCache(DynamicCache):
    """A DynamicCache that feeds every key and value it is given into per-layer Moments."""

    def __init__(self, config, keys: dict[int, Moments], values: dict[int, Moments]):
        super().__init__(config=config)
        self.rec_keys, self.rec_values = keys, values

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.rec_keys.setdefault(layer_idx, Moments()).update(key_states)
        self.rec_values.setdefault(layer_idx, Moments()).update(value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def collect_stats(model: nn.Module, samples: list[torch.Tensor], batch_size: int = 4) -> dict:
    """{"tensors": {kind: {name: stats}}, "layers": {kind: [per-layer summary]}, "heaviest_tails": [...]}."""
    if not samples:
        raise QForgeError("statistics of activations need calibration samples")
    spec = arch_spec(model)
    tensors: dict[str, dict[str, dict]] = {k: {} for k in KINDS}
    for i, block in enumerate(get_blocks(model, spec)):
        for ref in (r for g in block_linears(block, spec) for r in g):
            tensors["weights"][linear_name(spec, i, ref.name)] = tensor_stats(ref.weight)
    # a table group's linears read one input tensor: its moments are taken once, at the group's first linear
    mods = linear_modules(model)
    readers = [[n for n in (linear_name(spec, i, name) for name in group) if n in mods]
               for i in range(len(get_blocks(model, spec))) for group in spec.groups]
    readers = [r for r in readers if r]
    acts: dict[str, Moments] = {r[0]: Moments() for r in readers}
    handles = [mods[r[0]].register_forward_pre_hook(lambda _m, args, m=acts[r[0]]: m.update(args[0])) for r in readers]
    keys: dict[int, Moments] = {}
    values: dict[int, Moments] = {}
    device = next(model.parameters()).device
    try:
        for ids in make_batches(samples, batch_size):
            model(input_ids=ids.to(device), past_key_values=RecordingKVCache(model.config, keys, values), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    for r in readers:                       # every linear of the group gets its shared input's statistics
        st = acts[r[0]].result()
        tensors["activations"].update({n: st for n in r})
    tensors["keys"] = {f"{spec.blocks}.{i}.keys": keys[i].result() for i in sorted(keys)}
    tensors["values"] = {f"{spec.blocks}.{i}.values": values[i].result() for i in sorted(values)}
    if not keys:
        log.warning("the model wrote nothing into its KV cache: no key/value statistics")
    return {"kurtosis_definition": "E[(x-mu)^4]/sigma^4 (Pearson); a normal distribution gives 3",
            "tensors": tensors, "layers": {k: per_layer(tensors[k], spec.blocks) for k in KINDS},
            "heaviest_tails": heaviest_tails(tensors)}


def layer_of(name: str, blocks: str) -> int:
    return int(name[len(blocks) + 1:].split(".", 1)[0])


def per_layer(stats: dict[str, dict], blocks: str) -> list[dict]:
    """One summary per decoder layer: max AbsMax, RMS of the Stds, max kurtosis (and which tensor has it)."""
    by_layer: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for n, st in stats.items():
        by_layer[layer_of(n, blocks)].append((n, st))
    out = []
    for i in sorted(by_layer):
        items = by_layer[i]
        worst = max(items, key=lambda t: t[1]["kurtosis"] if t[1]["kurtosis"] == t[1]["kurtosis"] else -1)
        out.append({"layer": i, "absmax": max(st["absmax"] for _, st in items),
                    "std": (sum(st["std"] ** 2 for _, st in items) / len(items)) ** 0.5,
                    "kurtosis": worst[1]["kurtosis"], "kurtosis_tensor": worst[0]})
    return out


def heaviest_tails(tensors: dict[str, dict[str, dict]], k: int = 10) -> list[dict]:
    """The k tensors of largest kurtosis; linears that read one input (q/k/v) count once, named together."""
    rows: dict[tuple, dict] = {}
    for kind, d in tensors.items():
        for n, st in d.items():
            if st["kurtosis"] != st["kurtosis"]:
                continue
            key = (kind, st["kurtosis"], st["absmax"], st["count"]) if kind == "activations" else (kind, n)
            if key in rows:
                rows[key]["tensor"] += "," + n.rsplit(".", 1)[-1]
            else:
                rows[key] = {"kind": kind, "tensor": n, **st}
    return sorted(rows.values(), key=lambda r: -r["kurtosis"])[:k]
