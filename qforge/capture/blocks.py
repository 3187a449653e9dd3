"""Capture what every decoder block receives, without running any block.

The block list is swapped for recorders for the duration of one pass of the calibration batches
through the module that owns it (embeddings, rotary tables, masks, no lm_head). Each recorder keeps
the (hidden_states, kwargs) its block would get and passes hidden_states through unchanged. Kwargs are
kept per block because some models give blocks different masks or rotary tables (Gemma 2/3 sliding
vs global layers); tensors shared between blocks are stored once, by reference.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.arch import ArchSpec, blocks_owner, get_blocks


@dataclass
class BlockCall:
    """Everything but the hidden states that one block is called with (positional and keyword)."""

    args: tuple
    kwargs: dict


class StandIn(nn.Module):
    """Takes a block's place in the block list; the block stays registered, so attribute look-ups the
    model makes on its layers (attention_type, layer_idx) still resolve. `tuple_output` (set by swapped_blocks
    from the table's `tuple_blocks`): the model reads its blocks' outputs as tuples (Bloom, GPT-J: outputs[0];
    Bamba unpacks two), so the hidden states a stand-in returns go back as (hidden, None), no attention weights."""

    tuple_output = False

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        return (out, None) if self.tuple_output and isinstance(out, torch.Tensor) else out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class ModuleSwaps:
    """Replaces sub-modules of `root` by path; undo() puts the originals back, last swapped first."""

    def __init__(self, root: nn.Module):
        self.root, self.done = root, []

    def swap(self, path: str, replacement: nn.Module) -> None:
        parent_path, _, leaf = path.rpartition(".")
        parent = self.root.get_submodule(parent_path) if parent_path else self.root
        self.done.append((parent, leaf, getattr(parent, leaf)))
        setattr(parent, leaf, replacement)

    def undo(self) -> None:
        for parent, leaf, original in reversed(self.done):
            setattr(parent, leaf, original)
        self.done.clear()


class _Recorder(StandIn):
    def __init__(self, block: nn.Module, sink: list, keep_cache: bool = False):
        super().__init__(block)
        self.sink, self.keep_cache = sink, keep_cache

    def forward(self, hidden_states, *args, **kwargs):
        if not self.keep_cache:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        self.sink.append(BlockCall(args, kwargs))
        return hidden_states


@dataclass
class BlockInputs:
    """Calibration activations entering one block: one [B, T, hidden] tensor per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]  # calls[batch][block]

    def for_block(self, i: int) -> list[BlockCall]:
        return [per_block[i] for per_block in self.calls]


def make_batches(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Group samples of equal length into [B, T] batches (no padding ever enters a batch)."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for s in samples:
        by_len.setdefault(len(s), []).append(s)
    batches = []
    for _, group in sorted(by_len.items()):
        for k in range(0, len(group), batch_size):
            batches.append(torch.stack(group[k: k + batch_size]))
    return batches


@contextmanager
def swapped_blocks(model: nn.Module, spec: ArchSpec, stand_ins: list[nn.Module]):
    """The model runs `stand_ins` in place of its decoder blocks inside the block; restored on exit."""
    owner, attr = blocks_owner(model, spec)
    blocks = getattr(owner, attr)
    for s in stand_ins:
        if isinstance(s, StandIn):
            s.tuple_output = spec.tuple_blocks
    setattr(owner, attr, nn.ModuleList(stand_ins))
    try:
        yield
    finally:
        setattr(owner, attr, blocks)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor],
                         caches: list | None = None) -> BlockInputs:
    """`caches` (one per batch): each batch's forward gets its cache as past_key_values, which the blocks' recorded
    calls then hand their attention (a cache that observes or quantizes keys and values, block by block); without,
    the calls carry no cache."""
    owner, _ = blocks_owner(model, spec)
    blocks = get_blocks(model, spec)
    hidden: list[torch.Tensor] = []
    sinks: list[list[BlockCall]] = [[] for _ in blocks]
    first = _FirstInput()
    recorders = [_Recorder(b, sink, keep_cache=caches is not None) for b, sink in zip(blocks, sinks)]
    handle = recorders[0].register_forward_pre_hook(first, with_kwargs=True)
    try:
        with swapped_blocks(model, spec, recorders):
            for k, ids in enumerate(batches):
                owner(input_ids=ids, **(dict(past_key_values=caches[k], use_cache=True) if caches else
                                        dict(use_cache=False)))
                hidden.append(first.value)
    finally:
        handle.remove()
    calls = [[sinks[i][b] for i in range(len(blocks))] for b in range(len(batches))]
    return BlockInputs(hidden, calls)


class _FirstInput:
    """Pre-hook keeping the hidden states that enter the first block."""

    value: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        self.value = (args[0] if args else kwargs["hidden_states"]).detach()


@torch.no_grad()
def walk_fp_blocks(model: nn.Module, spec: ArchSpec, batch_sets: list[list[torch.Tensor]], last: int,
                   device: torch.device | str = "cpu"):
    """Yields (i, block, per set: (hidden, calls)) for blocks 0..last, each set's hidden states being what
    the unquantized block i receives; block i is run on them after its turn (so a caller may change it
    during its turn, as long as it puts it back)."""
    blocks = get_blocks(model, spec)
    inputs = [capture_block_inputs(model, spec, batches) for batches in batch_sets]
    hidden = [x.hidden for x in inputs]
    for i in range(last + 1):
        yield i, blocks[i], [(h, x.for_block(i)) for h, x in zip(hidden, inputs)]
        if i < last:
            hidden = [run_block(blocks[i], h, x.for_block(i), device) for h, x in zip(hidden, inputs)]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def call_on(call: BlockCall, device) -> BlockCall:
    """The call with its tensors on `device`."""
    return BlockCall(_to(call.args, device), _to(call.kwargs, device))


def fits_on_device(nbytes: int, device, free_bytes: int | None = None, times: float = 4) -> bool:
    """Whether calibration activations of `nbytes` may stay on `device` between passes instead of the CPU:
    a CUDA device with `times` x that free (4: inputs, outputs and an fp32 copy at once). Keeping them there
    saves a host round trip of every pass (2 GB each way per pass for 128 x 2048 tokens of a 4096-wide model)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return times * nbytes <= free_bytes


def cast_call(call: BlockCall, dtype: torch.dtype) -> BlockCall:
    """The call with its floating tensors (rotary tables, additive masks) in `dtype`; itself when fp32 already."""
    if dtype == torch.float32:
        return call
    return BlockCall(_cast(call.args, dtype), _cast(call.kwargs, dtype))


def carried_copies(calls: list[BlockCall], carried: str | None) -> list | None:
    """A copy of the mapping `carried` (ArchSpec.carried: Gemma 4's shared_kv_states, which blocks fill for later ones
    and the calls share by reference) per batch, for runs whose writes must stay their own (with_carried); None when
    there is no carried state."""
    return [copy.copy(c.kwargs[carried]) for c in calls] if carried else None


def with_carried(calls: list[BlockCall], carried: str | None, states: list | None) -> list[BlockCall]:
    """The calls with the mapping `carried` replaced by `states` (carried_copies'), one per batch; the calls themselves
    when there is no carried state."""
    if not carried:
        return calls
    return [BlockCall(c.args, {**c.kwargs, carried: m}) for c, m in zip(calls, states)]


def with_own_carried(calls: list[BlockCall], carried: str | None, dtype: torch.dtype) -> list[BlockCall]:
    """The calls with a copy of the carried state holding its tensors in `dtype`: for a block run in another dtype
    than the passes that filled it (AWQ's and SmoothQuant's fp32 searches beside bf16 passes), whose own writes (of
    the block before its weights are rounded) must not reach the later blocks either."""
    states = carried_copies(calls, carried)
    for state in states or []:
        state.update({k: _cast(v, dtype) for k, v in state.items()})
    return with_carried(calls, carried, states)


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall],
              device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The block's outputs for every batch, kept where its inputs are (the CPU, unless the caller keeps
    them on the device: fits_on_device)."""
    outs = []
    for h, call in zip(hidden, calls):
        y = block(h.to(device), *_to(call.args, device), **_to(call.kwargs, device))
        y = y[0] if isinstance(y, tuple) else y
        outs.append(y.to(h.device))
    return outs
