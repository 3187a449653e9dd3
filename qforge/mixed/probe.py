"""End-to-end probes for the measurement: how far the model's next-token distribution moves when one
linear is changed, as the mean KL divergence KL(P_fp ‖ P) over a few calibration sequences.

A probe at block i does not re-run blocks 0..i−1: the model is called as usual (so embeddings, masks,
rotary tables, the final norm, the head and any logit soft-capping are the model's own), but its block
list is swapped for one whose first i entries hand over the cached fp input of block i. The head sees
only every `stride`-th position (a pre-hook on the output embeddings), which cuts the cost of a
vocabulary-wide head without biasing the mean.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..capture.blocks import StandIn, swapped_blocks
from ..eval.compare import kl_divergence
from ..models.arch import ArchSpec, get_blocks


class _Handover(StandIn):
    """Stands in for the blocks before the probed one: the first returns the cached input (and puts back the state
    the skipped blocks leave for later ones: ArchSpec.carried), the rest pass it on."""

    def __init__(self, block: nn.Module, source: dict | None, carried: str | None = None):
        super().__init__(block)
        self.source, self.carried = source, carried

    def forward(self, hidden_states, *args, **kwargs):
        if self.source is None:
            return hidden_states
        if self.carried:
            kwargs[self.carried].update(self.source["state"])
        return self.source["hidden"]


class TailProbe:
    """Mean KL(P_fp ‖ P) of `model` on `batches` ([B, T] ids), running only the blocks from `start` on."""

    def __init__(self, model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], stride: int = 4):
        self.model, self.spec, self.batches = model, spec, batches
        self.keep = kept_positions(batches, stride)
        self.states: list[dict] = []          # per batch: the state the fp blocks carry forward (ArchSpec.carried)
        self.ref = [torch.log_softmax(self._logits(ids, 0, None, keep_state=True), -1) for ids in batches]   # [B, K, V]

    def kl(self, start: int, hidden: list[torch.Tensor]) -> float:
        """Mean KL per kept position; `hidden[b]` is the fp input of block `start` for batch b."""
        return mean_kl(self.kl_per_sequence(start, hidden))

    @torch.no_grad()
    def kl_per_sequence(self, start: int, hidden: list[torch.Tensor], n_batches: int | None = None) -> list[float]:
        """Mean KL per kept position of each sequence, in batch order (of the first `n_batches` batches)."""
        out = []
        for b, ids in enumerate(self.batches[:n_batches]):
            logp = torch.log_softmax(self._logits(ids, start, hidden[b], b), -1)
            out += sequence_kls(self.ref[b], logp)
        return out

    @torch.no_grad()          # also in __init__: a reference kept with its autograd graph holds every activation
    def _logits(self, ids: torch.Tensor, start: int, hidden: torch.Tensor | None, batch: int = 0,
                keep_state: bool = False) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        hooks = [head.register_forward_pre_hook(lambda mod, args: (args[0][:, self.keep],) + args[1:])]
        carried = {}
        if keep_state and self.spec.carried:          # the reference run: keep the mapping the blocks fill
            hooks.append(get_blocks(self.model, self.spec)[0].register_forward_pre_hook(
                lambda mod, args, kwargs: carried.update(state=kwargs[self.spec.carried]), with_kwargs=True))
        try:
            with self._blocks_from(start, hidden, batch):
                out = self.model(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if "state" in carried:
            self.states.append(dict(carried["state"]))
        return out.logits.float()

    def _blocks_from(self, start: int, hidden: torch.Tensor | None, batch: int):
        if start == 0:
            return nullcontext()
        blocks = get_blocks(self.model, self.spec)
        source = {"hidden": hidden, "state": self.states[batch] if self.spec.carried else None}
        return swapped_blocks(self.model, self.spec, [_Handover(b, source if k == 0 else None, self.spec.carried)
                                                      if k < start else b for k, b in enumerate(blocks)])


def kept_positions(batches: list[torch.Tensor], stride: int = 4) -> torch.Tensor:
    """The positions the head reads: every `stride`-th of the shortest batch's."""
    T = min(b.shape[1] for b in batches)
    return torch.arange(stride - 1, T, stride)


def sequence_kls(ref_logp: torch.Tensor, logp: torch.Tensor) -> list[float]:
    """Mean KL(P_ref ‖ P) over the kept positions of each sequence, from log-probabilities [B, K, vocab]."""
    return kl_divergence(ref_logp, logp).mean(-1).tolist()


def mean_kl(per_sequence: list[float]) -> float:
    return sum(per_sequence) / max(len(per_sequence), 1)          # every sequence has the same kept positions


def interpolate_loglog(x: float, points: list[tuple[float, float]], min_slope: float = 0.5,
                       max_slope: float = 3.0) -> float:
    """y at x from (x, y) probe points by piecewise-linear interpolation in log-log space, extended past
    the ends with the end segments' slopes (clamped to [min_slope, max_slope]; 1 with a single point:
    KL and tr(ΔW H ΔWᵀ) are both quadratic in a small ΔW, so y ∝ x there)."""
    import math

    pts = sorted((max(px, 1e-30), max(py, 1e-30)) for px, py in points)
    lx = math.log(max(x, 1e-30))
    L = [(math.log(px), math.log(py)) for px, py in pts]
    if len(L) == 1:
        return math.exp(L[0][1] + (lx - L[0][0]))
    for (x0, y0), (x1, y1) in zip(L, L[1:]):
        if lx <= x1 or (x1, y1) == L[-1]:
            slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 1.0
            if lx < x0 or lx > x1:                              # beyond the probed range: a clamped slope
                slope = min(max(slope, min_slope), max_slope)
            anchor = (x0, y0) if lx <= x1 else (x1, y1)
            return math.exp(anchor[1] + slope * (lx - anchor[0]))
    raise AssertionError("unreachable")
