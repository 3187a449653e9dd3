"""AWQ on one decoder block: for each table mapping prev -> linears (per expert where prev is a fused
gate/up parameter), search the scale exponent α on a grid by the mean squared error of the smallest
module that contains the linears and the mapping's balance modules (self_attn for q/k/v, mlp for
gate/up or for the experts and their router; a single linear's own output for o and down), fold the
best scales in, then search a clipping threshold per (output channel, group) for every linear except
q/k (whose error the output MSE does not see). All statistics come from one forward of the block
before any change.

Each candidate α is judged with the weights as they will be quantized: rounded (AWQ) or, for awq+gptq
(`gptq_opts`), solved by GPTQ on the scaled input's Hessian, with "no scaling" as one more candidate, so
the scales GPTQ then solves with are the ones that help GPTQ, not round-to-nearest.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..capture.blocks import BlockCall, _to
from ..capture.hessian import HessianAccumulator
from ..capture.linear_inputs import tap_inputs
from ..models.arch import ArchSpec, LinearRef, block_linears
from ..solvers import Grid
from ..solvers.awq import apply_clip, awq_scales, clip_search, scaled_fake_quant, scaled_gptq_quant, weight_magnitude
from .fold import FoldUnit, fold_scales, mapping_units

log = logging.getLogger(__name__)
NO_CLIP = ("q_proj", "k_proj", "query_key_value", "c_attn")  # attention-score inputs: clipping is not judged


@dataclass
class BlockAWQ:
    """Search results of one block, by names inside the block."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)   # unit key (prev[.expert]) -> s [in]
    alphas: dict[str, float] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)    # linear -> max_val [out, G]


@contextlib.contextmanager
def _record_calls(modules: dict[str, nn.Module], store: dict[str, list]):
    """Record (args, kwargs, output) of every call of each named module."""
    handles = []

    def hook(name):
        def f(mod, args, kwargs, out):
            y = out[0] if isinstance(out, tuple) else out
            store[name].append((args, kwargs, y.detach()))
        return f

    try:
        for name, m in modules.items():
            store[name] = []
            handles.append(m.register_forward_hook(hook(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _run(module: nn.Module, calls: list, device) -> list[torch.Tensor]:
    outs = []
    for args, kwargs, _ in calls:
        y = module(*_to(args, device), **_to(kwargs, device))
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _mse(outs: list[torch.Tensor], calls: list) -> float:
    return sum(float((o.float() - c[2].float()).pow(2).sum()) for o, c in zip(outs, calls)) / \
        sum(c[2].numel() for c in calls)


def _input_keys(groups: list[list[LinearRef]]) -> dict[str, str]:
    """Linear name -> the name its captured input is kept under (a plain group shares its first linear's)."""
    return {r.name: (g[0].name if r.expert is None else r.name) for g in groups for r in g}


def _units(block: nn.Module, spec: ArchSpec, refs: list[LinearRef]) -> list[FoldUnit]:
    units = []
    for m in spec.smooth:
        found, why = mapping_units(block, m, refs)
        if why:
            log.info("AWQ mapping %s -> %s skipped: %s", m.prev, ",".join(m.linears), why)
        units += found
    return units


def _capture(block, units, groups, keys, hidden, calls, device) -> tuple[dict, dict]:
    """One forward of the unchanged block: every linear's input (by input key) and the judging modules' calls."""
    parents = {u.parent: block.get_submodule(u.parent) for u in units if u.parent is not None}
    store: dict[str, list] = {}
    chunks: dict[str, list] = {k: [] for k in set(keys.values())}
    sinks = {k: chunks[k].append for k in chunks}
    with _record_calls(parents, store), tap_inputs([r for g in groups for r in g if r.name in sinks], sinks):
        for h, call in zip(hidden, calls):
            block(h.to(device), *_to(call.args, device), **_to(call.kwargs, device))
    X = {k: torch.cat(v).float() if v else torch.empty(0) for k, v in chunks.items()}
    return X, store


def _search(block, u: FoldUnit, X, keys, store, quant, n_grid, duo_scaling, grid, device,
            identity: bool = False) -> tuple[float, torch.Tensor] | None:
    """The best (α, s) of one unit by its judging output's MSE, each candidate's weights being
    quant(W, input key, s); None when no token reaches its linears. `identity`: s = 1 is a candidate
    too (returned as α = -1)."""
    x = torch.cat([X[k] for k in dict.fromkeys(keys[r.name] for r in u.lins)])
    if x.shape[0] == 0:
        return None
    x_mag = x.abs().mean(0)
    w_mag = weight_magnitude(torch.cat([r.weight.detach().float() for r in u.lins]), grid) if duo_scaling else None
    originals = [r.weight.detach().clone() for r in u.lins]
    if u.parent is None:                                 # one linear: its own output error, from its inputs
        xs, W = X[keys[u.lins[0].name]], originals[0].float()
        y = xs @ W.T
    candidates = [(i / n_grid, awq_scales(x_mag, w_mag, i / n_grid)) for i in range(n_grid)]
    best = (float("inf"), 0.0, torch.ones_like(x_mag))
    for alpha, s in candidates + ([(-1.0, torch.ones_like(x_mag))] if identity else []):
        if u.parent is None:
            loss = float((xs @ quant(W, keys[u.lins[0].name], s).T - y).pow(2).mean())
        else:
            for r, W0 in zip(u.lins, originals):
                r.set_weight(quant(W0.float(), keys[r.name], s))
            loss = _mse(_run(block.get_submodule(u.parent), store[u.parent], device), store[u.parent])
        if loss < best[0]:
            best = (loss, alpha, s)
    for r, W0 in zip(u.lins, originals):
        r.set_weight(W0)
    return best[1], best[2]


def _quantizer(X: dict, grid: Grid, gptq_opts: dict | None):
    """quant(W, input key, s) -> the weight the scaled layer uses after quantization, and a function that
    forgets a key's cached Hessian (its inputs changed)."""
    if gptq_opts is None:
        return (lambda W, key, s: scaled_fake_quant(W, s, grid)), (lambda key: None)
    H: dict[str, torch.Tensor] = {}

    def quant(W, key, s):
        if key not in H:
            acc = HessianAccumulator(X[key].shape[1], X[key].device)
            acc.add(X[key])
            H[key] = acc.H
        return scaled_gptq_quant(W, H[key], s, grid, **gptq_opts)

    return quant, (lambda key: H.pop(key, None))


@torch.no_grad()
def awq_block(block: nn.Module, spec: ArchSpec, hidden: list[torch.Tensor], calls: list[BlockCall], grid: Grid,
              n_grid: int = 20, duo_scaling: bool = True, clip: bool = True, clip_tokens: int = 512,
              device="cpu", given: BlockAWQ | None = None, gptq_opts: dict | None = None) -> BlockAWQ:
    """Search (or, with `given`, re-apply) AWQ scales and clips on `block` in place; returns them.
    gptq_opts: judge the scales with GPTQ (these keyword options of solvers.gptq) instead of rounding."""
    groups = block_linears(block, spec)
    refs = [r for g in groups for r in g]
    units = _units(block, spec, refs)
    result = BlockAWQ()
    if given is not None:
        for u in units:
            if u.key in given.scales:
                fold_scales(block, u, given.scales[u.key], spec.norm_plus_one)
                result.scales[u.key] = given.scales[u.key]
        for r in refs:
            if r.name in given.clips:
                r.set_weight(apply_clip(r.weight.detach().float(), given.clips[r.name], grid))
                result.clips[r.name] = given.clips[r.name]
        return result
    keys = _input_keys(groups)
    X, store = _capture(block, units, groups, keys, hidden, calls, device)
    quant, forget = _quantizer(X, grid, gptq_opts)
    for u in units:
        found = _search(block, u, X, keys, store, quant, n_grid, duo_scaling, grid, device,
                        identity=gptq_opts is not None)
        if found is None:
            log.info("AWQ %s: no calibration token reaches its linears; not scaled", u.key)
            continue
        result.alphas[u.key], s = found
        if result.alphas[u.key] < 0:
            log.info("AWQ %s: GPTQ does better without scales; not scaled", u.key)
            continue
        fold_scales(block, u, s, spec.norm_plus_one)
        result.scales[u.key] = s
        for k in dict.fromkeys(keys[r.name] for r in u.lins):
            X[k] = X[k] / s                               # the linears now read x / s
            forget(k)
    for r in refs:
        base = r.name if r.expert is None else r.name.rpartition(".")[0]
        Xs = X[keys[r.name]]
        if not clip or base.rsplit(".", 1)[-1] in NO_CLIP or Xs.shape[0] == 0:
            continue
        Xs = Xs[:: max(1, Xs.shape[0] // clip_tokens)][:clip_tokens]
        max_val = clip_search(r.weight.detach().float(), Xs, grid)
        r.set_weight(apply_clip(r.weight.detach().float(), max_val, grid))
        result.clips[r.name] = max_val
    return result
