"""Checking an allocation where the optimiser's assumption can fail, and repairing it.

The optimiser adds per-linear KLs, each measured with one linear quantized, on a few probe sequences.
Two things that sum cannot see: linears of one block failing *together* (errors that compound inside an
attention module), and failures on inputs the probes did not contain. Both happened on SmolLM2 at
3.0 bpw (BENCHMARKS.md, "Mixed precision"): block 0's q, k, v and o at 2 bits each broke one held-out
sequence in eight (4 nats/token) while their summed measured KL was a few thousandths.

`check_blocks` quantizes each block's linears *together* at their allocated schemes (GPTQ on the fp
model's Hessians, as the measurement solves them), runs the model from that block on over validation
sequences and records the KL of each sequence. A block is flagged when, on some sequence, it alone
costs more than `tolerance` x the whole allocation's predicted error (the summed KL over every
linear): no single block can do that and be what the optimiser believed. `verified_plan` then takes
the flagged block's lowest width out of the options of its linears at that width, re-plans under the
same budget, and checks the blocks whose schemes changed, for at most `rounds` repairs; a repair that no
longer fits the budget is not made (a warning says so, and the allocation stays within the budget).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..capture.blocks import make_batches, walk_fp_blocks
from ..config import QuantizeConfig
from ..errors import QForgeError
from ..models.arch import arch_spec, block_linears, get_blocks, linear_name
from ..pipeline import GPTQSolver, gptq_options, one_pass_stats
from ..solvers import gptq
from ..utils.progress import progress
from .measure import PROBE_MEMORY
from .plan import Allocation, plan, scheme_of
from .probe import TailProbe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockCheck:
    """One block quantized on its own at the allocation's schemes."""

    block: int
    schemes: tuple[tuple[str, tuple], ...]   # (layer, (bits, group_size, sym)) as checked
    predicted: float                         # the measurement's summed KL of those layers
    kl: tuple[float, ...]                    # joint KL of each validation sequence (nats/token)

    @property
    def worst(self) -> float:
        return max(self.kl)

    def to_json(self) -> dict:
        return {"predicted": self.predicted, "worst_kl": self.worst, "mean_kl": sum(self.kl) / len(self.kl)}


def _block_schemes(a: Allocation, prefix: str) -> tuple[tuple[str, tuple], ...]:
    return tuple((n, scheme_of(d)) for n, d in sorted(a.layers.items())
                 if n.startswith(prefix))


def check_blocks(model, allocation: Allocation, calib: list[torch.Tensor], valid: list[torch.Tensor],
                 cfg: QuantizeConfig, only: set[int] | None = None, device: str = "cpu", batch_size: int = 8,
                 show_progress: bool = False, weights=None, probe_memory: int = PROBE_MEMORY) -> dict[int, BlockCheck]:
    """BlockCheck of every block (or of those in `only`) holding allocated layers; `model` is left as it was.
    Hessians come from `calib`, the KL from `valid` (sequences of any lengths). `weights` (a skeleton's
    models.streaming.BlockLoader): streamed, one block in memory at a time (mixed/streamed.py)."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    todo = [i for i in range(len(blocks)) if (only is None or i in only)
            and _block_schemes(allocation, f"{spec.blocks}.{i}.")]
    if not todo:
        return {}
    batches, vbatches = make_batches(calib, batch_size), make_batches(valid, batch_size)
    out = {}
    if weights is not None:
        from .streamed import sweep_probes

        def span_done(records: dict, kls: list[list[float]]) -> None:
            out.update({i: BlockCheck(i, schemes, predicted, tuple(kls[h])) for i, (schemes, predicted, h)
                        in records.items()})

        sweep_probes(model, weights, batches, vbatches, todo, lambda i: 1,
                     lambda i, block, hidden, calls, probe: _check_block(block, i, spec, allocation, hidden, calls,
                                                                         cfg, device, probe),
                     span_done, device, probe_memory, show_progress, desc="check blocks")
        return out
    home = next(model.parameters()).device
    model.to(device)                                          # the probes run every block after the checked one
    try:
        probe = TailProbe(model, spec, vbatches)
        walk = walk_fp_blocks(model, spec, [batches, vbatches], todo[-1], device)
        with torch.no_grad():
            for i, block, ((hidden, calls), (vhidden, _)) in progress(walk, total=todo[-1] + 1, desc="check blocks",
                                                                      enabled=show_progress):
                if i in todo:
                    schemes, predicted, kl = _check_block(block, i, spec, allocation, hidden, calls, cfg, device,
                                                          lambda: probe.kl_per_sequence(i, vhidden))
                    out[i] = BlockCheck(i, schemes, predicted, tuple(kl))
    finally:
        model.to(home)
    return out


def _check_block(block, i: int, spec, a: Allocation, hidden, calls, cfg, device, probe) -> tuple:
    """(schemes, predicted KL, probe()'s result) of block i quantized alone at the allocation's schemes;
    probe() runs with the block so quantized, which is then put back."""
    groups = block_linears(block, spec)
    refs = {linear_name(spec, i, r.name): r for g in groups for r in g}
    mine = {n: r for n, r in refs.items() if n in a.layers}
    stats = one_pass_stats(GPTQSolver(device), block, groups, hidden, calls, device)
    originals = {n: r.weight.detach().clone() for n, r in mine.items()}
    grids = a.grids
    try:
        factors = {}                                  # one factorization per statistic (q/k/v share one)
        for n, r in mine.items():
            W, f = originals[n].float().to(device), factors.setdefault(id(stats[r.name]), {})
            r.set_weight(gptq(W, stats[r.name].H, grids[n], **gptq_options(cfg, device), factors=f).dequantize()
                         .to(W.device))
        probed = probe()
    finally:
        for n, r in mine.items():
            r.set_weight(originals[n])
    return _block_schemes(a, f"{spec.blocks}.{i}."), sum(a.layers[n]["err"] for n in mine), probed


def without_widths(measurement: dict, raised: dict[str, int]) -> dict:
    """`measurement` with each named layer's options of at most `raised[layer]` bits removed."""
    layers = dict(measurement["layers"])
    for n, width in raised.items():
        layers[n] = {**layers[n], "options": [o for o in layers[n]["options"] if o["bits"] > width]}
    return {**measurement, "layers": layers}


def _raise(checks: list[BlockCheck], measurement: dict, raised: dict[str, int]) -> list[str]:
    """For each flagged block, its layers at the block's lowest width (when a wider option exists) go into
    `raised`; returns the names raised this time."""
    new = []
    for c in checks:
        low = min(s[0] for _, s in c.schemes)
        for n, s in c.schemes:
            if s[0] == low and any(o["bits"] > low for o in measurement["layers"][n]["options"]):
                raised[n] = max(raised.get(n, 0), low)
                new.append(n)
    return new


def verified_plan(model, measurement: dict, target_bpw: float, calib: list[torch.Tensor],
                  valid: list[torch.Tensor], cfg: QuantizeConfig, skip: tuple[str, ...] = (), err_power: float = 1.0,
                  tolerance: float = 1.0, rounds: int = 3, device: str = "cpu", batch_size: int = 8,
                  show_progress: bool = False, weights=None, probe_memory: int = PROBE_MEMORY,
                  units: dict[str, tuple[str, ...]] | None = None) -> Allocation:
    """plan() (over `units`), then check_blocks() and repair as the module says; the allocation records what was
    checked. A raised linear's unit is raised with it: they share the scheme that was raised."""
    a = plan(measurement, target_bpw, skip, err_power, units=units)
    spec = arch_spec(model)
    checks: dict[int, BlockCheck] = {}
    raised: dict[str, int] = {}
    for r in range(rounds + 1):
        stale = {i for i in range(len(get_blocks(model, spec)))
                 if i not in checks or checks[i].schemes != _block_schemes(a, f"{spec.blocks}.{i}.")}
        checks.update(check_blocks(model, a, calib, valid, cfg, stale, device, batch_size, show_progress, weights,
                                   probe_memory))
        limit = tolerance * a.total_err
        flagged = [c for c in checks.values() if c.worst > limit]
        for c in flagged:
            log.warning("mixed precision: block %d alone costs %.3g nats/token on a validation sequence, more than "
                        "the whole allocation's predicted %.3g (its layers' summed KL: %.3g)", c.block, c.worst,
                        a.total_err, c.predicted)
        trial = dict(raised)                          # raised only if the re-plan fits the budget
        new = _raise(flagged, measurement, trial) if flagged and r < rounds else []
        if new:
            try:
                replanned = plan(without_widths(measurement, trial), target_bpw, skip, err_power, units=units)
            except QForgeError as e:
                log.warning("mixed precision: raising %d layer(s) of the flagged block(s) does not fit %.3g bpw "
                            "(%s): keeping the allocation as it is", len(new), target_bpw, e)
                new = []
        if not new:
            if flagged:
                log.warning("mixed precision: %d block(s) still above the limit; check this allocation on your own "
                            "held-out text", len(flagged))
            break
        log.info("mixed precision: raised %d layer(s) above their block's lowest width and planned again", len(new))
        raised, a = trial, replanned
    report = {"tolerance": tolerance, "limit": tolerance * a.total_err, "sequences": len(valid), "raised": raised,
              "blocks": {str(i): c.to_json() for i, c in sorted(checks.items())}}
    return Allocation(a.target_bpw, a.format, a.layers, report)
