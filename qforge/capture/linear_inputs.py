"""Feed the inputs of one linear group to statistics while a block runs, cheaply.

A table group is a set of linears that read the same input tensor (q/k/v, gate/up, ...), so one
statistic serves the whole group. While group k is collected, its linears and every linear of later
groups are swapped for stand-ins that return zeros (group k's stand-in hands its input to the sink
first): nothing after group k can change group k's inputs, so their real compute is skipped.
Fused experts cannot be swapped out; their per-expert inputs are rebuilt from the experts module's
call (tokens routed to each expert; for down_proj, act(gate) * up, or act(up) without a gate, under the current
weights), as the family's ExpertLayout says.
Once every sink has its input the rest of the block is not needed: the pass stops there
(GroupCollected, caught by feed_block).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models.arch import LinearRef
from .blocks import ModuleSwaps, _to

Sink = Callable[[torch.Tensor], None]  # receives x [tokens, in]


class GroupCollected(Exception):
    """Raised inside a block's forward once every sink of the collected group has this call's input."""


def _stopping(sinks: dict[str, Sink]) -> dict[str, Sink]:
    """The same sinks, raising GroupCollected when the last of them has been fed in this call."""
    pending = set(sinks)

    def wrap(name: str, sink: Sink) -> Sink:
        def f(x: torch.Tensor) -> None:
            sink(x)
            pending.discard(name)
            if not pending:
                pending.update(sinks)
                raise GroupCollected
        return f

    return {name: wrap(name, s) for name, s in sinks.items()}


@torch.no_grad()
def feed_block(block: nn.Module, hidden: list[torch.Tensor], calls: list, device="cpu") -> None:
    """Run the block on every batch for its sinks only (inside collect_group_inputs): outputs are dropped."""
    for h, call in zip(hidden, calls):
        try:
            block(h.to(device), *_to(call.args, device), **_to(call.kwargs, device))
        except GroupCollected:
            pass


class _ZeroLinear(nn.Module):
    def __init__(self, out_features: int, sink: Sink | None = None):
        super().__init__()
        self.out_features, self.sink = out_features, sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sink is not None:
            self.sink(x.reshape(-1, x.shape[-1]))
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _routed(ref: LinearRef, args: tuple) -> torch.Tensor:
    """The tokens expert `ref.expert` reads in this call of its experts module: [tokens routed to it, in]."""
    if ref.layout.routing == "scaled":                             # x [experts·tokens, in], scaled by router scores
        x = args[0]
        x = x.reshape(getattr(ref.module, ref.param).shape[0], -1, x.shape[-1])[ref.expert]
        return x[x.ne(0).any(dim=-1)]                              # tokens not routed to e arrive multiplied by 0
    hidden, top_k_index = args[0], args[1]
    return hidden[(top_k_index == ref.expert).any(dim=-1)]


def _expert_inputs(module: nn.Module, ref: LinearRef, args: tuple) -> torch.Tensor:
    x = _routed(ref, args)                                         # [tokens routed to e, hidden]
    if ref.param == ref.layout.input_param:
        return x
    gate_up = LinearRef(ref.name, module, ref.layout.input_param, ref.expert, ref.layout)
    h = F.linear(x, gate_up.weight, gate_up.bias)                  # [tokens, 2·I], or [tokens, I] without a gate
    if ref.layout.gate_up == "none":
        return module.act_fn(h)
    if ref.layout.glu == "module":
        return module._apply_gate(h)
    gate, up = ref.layout.gate_up_rows(h.shape[-1])
    return module.act_fn(h[:, gate]) * h[:, up]                    # down_proj's input


def _expert_hooks(refs: list[LinearRef], sinks: dict[str, Sink]) -> list:
    experts = [r for r in refs if r.expert is not None and r.name in sinks]

    def hook(module, args):
        for r in experts:
            if r.module is module:
                sinks[r.name](_expert_inputs(module, r, args))

    return [m.register_forward_pre_hook(hook) for m in {id(r.module): r.module for r in experts}.values()]


@contextlib.contextmanager
def tap_inputs(refs: list[LinearRef], sinks: dict[str, Sink]) -> Iterator[None]:
    """While active, running the block hands a ref's input to sinks[ref.name]; nothing is swapped, so
    the block computes as usual (one pass serves every group, all reading the unquantized block)."""
    handles = []
    try:
        for ref in refs:
            if ref.expert is None and ref.name in sinks:
                handles.append(ref.module.register_forward_pre_hook(
                    lambda m, args, s=sinks[ref.name]: s(args[0].reshape(-1, args[0].shape[-1]))))
        handles += _expert_hooks(refs, sinks)
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def collect_group_inputs(block: nn.Module, group: list[LinearRef], sinks: dict[str, Sink],
                         later: list[LinearRef], stop_early: bool = False) -> Iterator[None]:
    """While active, running `block` hands a ref's input to sinks[ref.name] for every ref named in
    `sinks`; other refs of the group (which read the same input) and all `later` refs return zeros.
    stop_early: the block's forward raises GroupCollected once every sink is fed (run it with feed_block)."""
    swaps, handles = ModuleSwaps(block), []
    if stop_early:
        sinks = _stopping(sinks)
    try:
        for ref in group:
            if ref.expert is None:
                swaps.swap(ref.name, _ZeroLinear(ref.shape[0], sinks.get(ref.name)))
        for ref in later:
            if ref.expert is None:
                swaps.swap(ref.name, _ZeroLinear(ref.shape[0]))
        handles += _expert_hooks(group, sinks)
        yield
    finally:
        for h in handles:
            h.remove()
        swaps.undo()
