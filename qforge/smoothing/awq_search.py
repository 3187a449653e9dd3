"""AWQ on one decoder block: for each table mapping prev -> linears, search the scale exponent α on a
grid by the mean squared error of the smallest module that contains the linears (self_attn for
q/k/v, mlp for gate/up, the linear itself for o and down), fold the best scales in, then search a
clipping threshold per (output channel, group) for every linear except q/k (whose error the output
MSE does not see). All statistics come from one forward of the block before any change.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..capture.blocks import BlockCall, _to
from ..models.arch import ArchSpec, LinearRef, block_linears
from ..solvers import Grid
from ..solvers.awq import apply_clip, awq_scales, clip_search, scaled_fake_quant, weight_magnitude
from .fold import can_fold, fold_scales

log = logging.getLogger(__name__)
NO_CLIP = ("q_proj", "k_proj", "query_key_value", "c_attn")  # attention-score inputs: clipping is not judged


@dataclass
class BlockAWQ:
    """Search results of one block, by names inside the block."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)   # mapping prev -> s [in]
    alphas: dict[str, float] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)    # linear -> max_val [out, G]


def _parent_path(names: tuple[str, ...]) -> str:
    """The smallest module holding every linear of a mapping ("" is the block itself)."""
    if len(names) == 1:
        return names[0]
    return ".".join(os.path.commonprefix([n.split(".") for n in names]))


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


@torch.no_grad()
def awq_block(block: nn.Module, spec: ArchSpec, hidden: list[torch.Tensor], calls: list[BlockCall], grid: Grid,
              n_grid: int = 20, duo_scaling: bool = True, clip: bool = True, clip_tokens: int = 512,
              device="cpu", given: BlockAWQ | None = None) -> BlockAWQ:
    """Search (or, with `given`, re-apply) AWQ scales and clips on `block` in place; returns them."""
    groups = block_linears(block, spec)
    refs = {r.name: r for g in groups for r in g}
    first = {r.name: g[0].name for g in groups for r in g}        # a group's linears share one input
    fits = {}
    for m in spec.smooth:
        why = can_fold(block, m, [refs[n] for n in m.linears if n in refs])
        if why:
            log.info("AWQ mapping %s -> %s skipped: %s", m.prev, ",".join(m.linears), why)
        else:
            fits[m.prev] = m
    result = BlockAWQ()
    if given is None:
        parents = {p: block.get_submodule(p) for p in {_parent_path(m.linears) for m in fits.values()}}
        store: dict[str, list] = {}
        lin_store: dict[str, list] = {}
        heads = {g[0].name: g[0].module for g in groups if g[0].expert is None}
        with _record_calls(parents, store), _record_calls(heads, lin_store):
            for h, call in zip(hidden, calls):
                block(h.to(device), *_to(call.args, device), **_to(call.kwargs, device))
        X = {n: torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a, _, _ in lin_store[n]]).float() for n in lin_store}
        del lin_store
    for prev, m in fits.items():
        lins = [refs[n] for n in m.linears]
        if given is not None:
            s = given.scales.get(prev)
            if s is None:
                continue
        else:
            parent, pcalls = block.get_submodule(_parent_path(m.linears)), store[_parent_path(m.linears)]
            x_mag = X[first[m.linears[0]]].abs().mean(0)
            W_all = torch.cat([r.weight.detach().float() for r in lins])
            w_mag = weight_magnitude(W_all, grid) if duo_scaling else None
            originals = [r.weight.detach().clone() for r in lins]
            best = (float("inf"), None, None)
            for i in range(n_grid):
                alpha = i / n_grid
                s = awq_scales(x_mag, w_mag, alpha)
                for r, W in zip(lins, originals):
                    r.set_weight(scaled_fake_quant(W.float(), s, grid))
                loss = _mse(_run(parent, pcalls, device), pcalls)
                if loss < best[0]:
                    best = (loss, alpha, s)
            for r, W in zip(lins, originals):
                r.set_weight(W)
            _, alpha, s = best
            result.alphas[prev] = alpha
            X[first[m.linears[0]]] = X[first[m.linears[0]]] / s     # the linears now read x / s
        fold_scales(block, m, lins, s, spec.norm_plus_one)
        result.scales[prev] = s
    for name, r in refs.items():
        if given is not None:
            if name in given.clips:
                r.set_weight(apply_clip(r.weight.detach().float(), given.clips[name], grid))
                result.clips[name] = given.clips[name]
            continue
        if not clip or name.rsplit(".", 1)[-1] in NO_CLIP or first.get(name) not in X:
            continue
        Xs = X[first[name]]
        Xs = Xs[:: max(1, Xs.shape[0] // clip_tokens)][:clip_tokens]
        max_val = clip_search(r.weight.detach().float(), Xs, grid)
        r.set_weight(apply_clip(r.weight.detach().float(), max_val, grid))
        result.clips[name] = max_val
    return result
