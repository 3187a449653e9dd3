"""Skip recomputing the parts of a block that quantization has finished with.

In the true-sequential schedule a block runs once per linear group and once more for its output.
Once every quantized linear inside a sub-module (the attention module, once q/k/v and o are solved)
has its final weights, that sub-module computes the same output on every later pass: its inputs come
from the unchanged block input through finished linears only, because groups run in execution order.
`FrozenOutputs` records such a sub-module's output the first time it runs with final weights, and
replays the recording on the later passes instead of running it. Early exit (linear_inputs.py) stops
a collection pass as soon as the group's input is taken; together they remove most of the repeated
attention work from GPTQ's schedule.

Tails: when a sub-module's last group is a single linear that is its direct child (o_proj in the
attention module, down_proj in the MLP), the collection pass of that group already computes
everything the sub-module does before that linear. Its inputs are kept, and once the linear is
solved the sub-module's output is that linear applied to them: the attention is not run again for
the gate/up pass, nor gate/up for the block's output pass. Whether the sub-module's output really is
its last linear's output is checked on the first call of each such pass (the real module runs and
must match bit for bit, with any other outputs None); on a mismatch the module simply runs as before.
Tail inputs are kept only up to `tail_ratio` (TAIL_RATIO) times the hidden width (MLP inputs are 2.7–3.5x).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from ..models.arch import LinearRef
from .blocks import ModuleSwaps, StandIn, _to, fits_on_device

log = logging.getLogger(__name__)

TAIL_RATIO = 4.0      # tail inputs are kept up to this many times the hidden width


def recordings_fit(nbytes: int, device, free_bytes: int | None = None) -> bool:
    """Whether FrozenOutputs' recordings may stay on `device` beside resident activations of `nbytes` (one
    hidden-width copy of them): the attention output, the attention tail's input (about 1x each) and the
    MLP tail's input (up to TAIL_RATIO x), with as much again free for the passes' own work."""
    return fits_on_device(nbytes, device, free_bytes, times=2 * (2 + TAIL_RATIO))


class _Replay(StandIn):
    """Returns the recorded outputs of the module it stands in for, one per call, in order."""

    def __init__(self, module: nn.Module, outputs: list, device):
        super().__init__(module)
        self.outputs, self.device, self.calls = outputs, device, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return _to(out, self.device)


class _TailReplay(StandIn):
    """Stands in for a finished sub-module whose output is its last linear applied to recorded inputs."""

    def __init__(self, module: nn.Module, linear: nn.Module, inputs: list, device, outputs: list | None,
                 keep_on="cpu"):
        super().__init__(module)
        self.linear, self.inputs, self.device, self.outputs, self.keep_on = linear, inputs, device, outputs, keep_on
        self.calls, self.n_rest = 0, None          # n_rest: the real output's extra (None) entries; None = unchecked

    def forward(self, *args, **kwargs):
        x = self.inputs[self.calls]
        self.calls += 1
        if self.n_rest is None:                   # first call: the real module, which the shortcut must reproduce
            out = self.block(*args, **kwargs)
            self.n_rest = _rest_if_linear_output(out, self.linear(x.to(self.device)))
            if self.n_rest < 0:
                log.debug("%s: output is not its last linear's; it runs on every call", type(self.block).__name__)
        elif self.n_rest < 0:                     # not a tail after all: run the module
            out = self.block(*args, **kwargs)
        else:
            y = self.linear(x.to(self.device))
            out = (y,) + (None,) * self.n_rest if self.n_rest else y
        if self.outputs is not None:
            self.outputs.append(_detach_to(out, self.keep_on))
        return out


def _rest_if_linear_output(out, y: torch.Tensor) -> int:
    """How many None entries follow y in `out` when out is y (0) or (y, None, ...); -1 when it is not."""
    if isinstance(out, torch.Tensor):
        return 0 if torch.equal(out, y) else -1
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(o is None for o in out[1:]):
        return len(out) - 1 if torch.equal(out[0], y) and len(out) > 1 else -1
    return -1


def _detach_to(out, device):
    if isinstance(out, torch.Tensor):
        return out.detach().to(device, copy=True)   # a copy: the block may add into its sub-modules' outputs
    if isinstance(out, tuple):
        return tuple(_detach_to(o, device) for o in out)
    return out


class FrozenOutputs:
    """Per block: which sub-modules are finished after groups [0, k) are solved, and their recordings.

    `groups[i]` are the block's linear groups in execution order; `n_calls` is how many times the
    block is called per pass (calibration batches). Only outputs no wider than `width` (the block's
    hidden size) are kept, so the recordings never cost more memory than the block's own inputs
    (attention outputs qualify; gate/up projections do not). Recordings are kept on `keep_on`: the CPU, or
    the device when the activations stay there and the recordings fit beside them (recordings_fit); a host
    round trip of every recording costs more than the passes it saves on a GPU (seen: 16 s per 8B block)."""

    def __init__(self, block: nn.Module, groups: list[list[LinearRef]], n_calls: int, width: int, device,
                 tail_ratio: float = TAIL_RATIO, keep_on="cpu"):
        self.block, self.n_calls, self.width, self.device, self.keep_on = block, n_calls, width, device, keep_on
        path_of = {id(m): p for p, m in block.named_modules()}
        ref_at = [(path_of[id(r.module)], k, r) for k, g in enumerate(groups) for r in g]
        self.last_group: dict[str, int] = {}     # sub-module path -> last group it contains
        self.tails: dict[str, str] = {}          # sub-module path -> its last linear, when that is a tail
        for path, _ in block.named_modules():
            inside = [(p, k, r) for p, k, r in ref_at if path and (p == path or p.startswith(path + "."))]
            if inside:
                self.last_group[path] = last = max(k for _, k, _ in inside)
                tail = [(p, r) for p, k, r in inside if k == last]
                if (len(tail) == 1 and tail[0][1].expert is None and tail[0][0].rpartition(".")[0] == path
                        and tail[0][1].shape[0] <= width and tail[0][1].shape[1] <= tail_ratio * width):
                    self.tails[path] = tail[0][0]
        self.recorded: dict[str, list] = {}
        self.tail_inputs: dict[str, list] = {}   # sub-module path -> its tail linear's input per call
        self.too_wide: set[str] = set()

    @staticmethod
    def _outermost(paths: list[str]) -> list[str]:
        return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]

    def finished(self, done: int) -> list[str]:
        """Outermost sub-modules whose linears are all in groups < done."""
        return self._outermost([p for p, k in self.last_group.items() if k < done])

    def _record(self, path: str, store: list):
        def hook(module, args, out):
            first = out[0] if isinstance(out, tuple) else out
            if not isinstance(first, torch.Tensor) or first.shape[-1] > self.width:
                self.too_wide.add(path)
            elif path not in self.too_wide:
                store.append(_detach_to(out, self.keep_on))
        return hook

    @contextlib.contextmanager
    def pass_after(self, done: int, record: bool = True) -> Iterator[None]:
        """One pass of the block with groups [0, done) final: replay the outermost recorded finished
        sub-modules and (with `record`) record the outermost finished ones not recorded yet."""
        done_paths = [p for p, k in self.last_group.items() if k < done]
        tails = [p for p in done_paths if p not in self.recorded and len(self.tail_inputs.get(p, ())) == self.n_calls]
        replay = self._outermost([p for p in done_paths if p in self.recorded or p in tails])
        todo = [p for p in self.finished(done) if p not in self.recorded and p not in self.too_wide
                and p not in replay] if record else []
        swaps, handles, fresh, taken = ModuleSwaps(self.block), [], {}, {}
        try:
            for path in todo:
                fresh[path] = []
                handles.append(self.block.get_submodule(path).register_forward_hook(self._record(path, fresh[path])))
            for path, linear in self.tails.items():    # this pass collects the tail's group: keep its inputs
                if record and self.last_group[path] == done and path not in self.tail_inputs:
                    taken[path] = []
                    handles.append(self.block.get_submodule(linear).register_forward_pre_hook(
                        lambda m, args, store=taken[path]: store.append(_detach_to(args[0], self.keep_on))))
            for path in replay:
                module = self.block.get_submodule(path)
                if path in self.recorded:
                    swaps.swap(path, _Replay(module, self.recorded[path], self.device))
                else:
                    fresh[path] = [] if record else None
                    swaps.swap(path, _TailReplay(module, self.block.get_submodule(self.tails[path]),
                                                 self.tail_inputs[path], self.device, fresh[path], self.keep_on))
            yield
        finally:
            for h in handles:
                h.remove()
            swaps.undo()
        for path, outs in fresh.items():          # only complete recordings (early exit may stop before it)
            if outs is not None and len(outs) == self.n_calls and path not in self.too_wide:
                self.recorded[path] = outs
                self.tail_inputs.pop(path, None)
        self.tail_inputs.update({p: v for p, v in taken.items() if len(v) == self.n_calls})
