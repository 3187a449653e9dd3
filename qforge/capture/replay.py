"""Skip recomputing the parts of a block that quantization has finished with.

In the true-sequential schedule a block runs once per linear group and once more for its output.
Once every quantized linear inside a sub-module (the attention module, once q/k/v and o are solved)
has its final weights, that sub-module computes the same output on every later pass: its inputs come
from the unchanged block input through finished linears only, because groups run in execution order.
`FrozenOutputs` records such a sub-module's output the first time it runs with final weights, and
replays the recording on the later passes instead of running it. Early exit (linear_inputs.py) stops
a collection pass as soon as the group's input is taken; together they remove most of the repeated
attention work from GPTQ's schedule.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..models.arch import LinearRef
from .blocks import ModuleSwaps, StandIn, _to


class _Replay(StandIn):
    """Returns the recorded outputs of the module it stands in for, one per call, in order."""

    def __init__(self, module: nn.Module, outputs: list, device):
        super().__init__(module)
        self.outputs, self.device, self.calls = outputs, device, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return _to(out, self.device)


def _detach_cpu(out):
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", copy=True)   # a copy: the block may add into its sub-modules' outputs
    if isinstance(out, tuple):
        return tuple(_detach_cpu(o) for o in out)
    return out


class FrozenOutputs:
    """Per block: which sub-modules are finished after groups [0, k) are solved, and their recordings.

    `groups[i]` are the block's linear groups in execution order; `n_calls` is how many times the
    block is called per pass (calibration batches). Only outputs no wider than `width` (the block's
    hidden size) are kept, so the recordings never cost more memory than the block's own inputs
    (attention outputs qualify; gate/up projections do not)."""

    def __init__(self, block: nn.Module, groups: list[list[LinearRef]], n_calls: int, width: int, device):
        self.block, self.n_calls, self.width, self.device = block, n_calls, width, device
        path_of = {id(m): p for p, m in block.named_modules()}
        ref_at = [(path_of[id(r.module)], k) for k, g in enumerate(groups) for r in g]
        self.last_group: dict[str, int] = {}     # sub-module path -> last group it contains
        for path, _ in block.named_modules():
            inside = [k for p, k in ref_at if path and (p == path or p.startswith(path + "."))]
            if inside:
                self.last_group[path] = max(inside)
        self.recorded: dict[str, list] = {}
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
                store.append(_detach_cpu(out))
        return hook

    @contextlib.contextmanager
    def pass_after(self, done: int, record: bool = True) -> Iterator[None]:
        """One pass of the block with groups [0, done) final: replay the outermost recorded finished
        sub-modules and (with `record`) record the outermost finished ones not recorded yet."""
        done_paths = [p for p, k in self.last_group.items() if k < done]
        replay = self._outermost([p for p in done_paths if p in self.recorded])
        todo = [p for p in self.finished(done) if p not in self.recorded and p not in self.too_wide] if record else []
        swaps, handles, fresh = ModuleSwaps(self.block), [], {}
        try:
            for path in todo:
                fresh[path] = []
                handles.append(self.block.get_submodule(path).register_forward_hook(self._record(path, fresh[path])))
            for path in replay:
                swaps.swap(path, _Replay(self.block.get_submodule(path), self.recorded[path], self.device))
            yield
        finally:
            for h in handles:
                h.remove()
            swaps.undo()
        for path, outs in fresh.items():          # only complete recordings (early exit may stop before it)
            if len(outs) == self.n_calls and path not in self.too_wide:
                self.recorded[path] = outs
