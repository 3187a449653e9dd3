"""Searching allocations with the whole model as the judge (EvoPress: Sieberling et al. 2024, "EvoPress:
Towards Optimal Dynamic Model Compression via Evolutionary Search").

The optimiser (allocate.py) minimises a *sum* of per-linear KLs, each measured with one linear quantized.
On SmolLM2 at 3.0 bpw that sum ranks allocations poorly: its picks tie uniform W3 g64 on long evaluation
sets, and the joint KL of the early blocks is 2.5x the sum of their linears' (BENCHMARKS.md, "Mixed
precision"). The search starts from the optimiser's allocation and keeps a change only when the KL of the
whole model, measured on calibration sequences, goes down.

Levels: a linear's measured options that no cheaper option beats on measured error, cheapest first,
at most `span` levels either side of the optimiser's pick. Database: every level's weight, solved by GPTQ
on the fp model's Hessian (as the measurement solves it), held in memory in the search dtype (up to
2 * span + 1 copies of the quantized linears).
Mutation (level switch): one to three random linears go one level up, then random others one level
down until the allocation fits the budget again. Selection (multi-step, elitist): `offspring` mutants
are scored on the first batch of the fitness sequences, the best `survivors` on all of them, and the
best survivor replaces the parent only if its KL is lower. A mutant runs the model only from the first
block it changed: the parent's block inputs are cached.
Record: the allocation's `search` holds one entry per run (generations, seed, span, fitness sequences and
the KL after each generation); a saved searched allocation continues as a new run, possibly on other
fitness sequences or another span, whose KLs are not comparable with an earlier run's.
"""
from __future__ import annotations

import copy
import logging
import random
from typing import Protocol

import torch

from ..capture.blocks import capture_block_inputs, make_batches, run_block, walk_fp_blocks
from ..config import QuantizeConfig
from ..errors import QForgeError
from ..models.arch import arch_spec, block_linears, get_blocks, linear_name, named_block_linears
from ..pipeline import GPTQSolver, gptq_options, one_pass_stats
from ..solvers import Grid, gptq
from ..utils.progress import progress
from .plan import Allocation, restrict_units, scheme_of, unit_options
from .probe import TailProbe

log = logging.getLogger(__name__)


def pareto_levels(options: list[dict]) -> list[int]:
    """Indices of the options no cheaper-or-equal option beats on error, cheapest first."""
    order = sorted(range(len(options)), key=lambda j: (options[j]["stored_bits"], options[j]["err"]))
    out, best = [], float("inf")
    for j in order:
        if options[j]["err"] < best:
            out.append(j)
            best = options[j]["err"]
    return out


def mutate(costs: dict[str, list[int]], assign: dict[str, int], budget: float, rng: random.Random,
           max_up: int = 3) -> dict[str, int] | None:
    """A level switch: {linear: new level} raising 1..max_up linears one level and lowering others until the
    total cost is <= budget; None when no such change exists."""
    names = sorted(costs)
    total = sum(costs[n][assign[n]] for n in names)
    up = [n for n in names if assign[n] + 1 < len(costs[n])]
    if not up:
        return None
    changes = {}
    for n in rng.sample(up, min(len(up), rng.randint(1, max_up))):
        changes[n] = assign[n] + 1
        total += costs[n][assign[n] + 1] - costs[n][assign[n]]
    down = [n for n in names if n not in changes and assign[n] > 0]
    rng.shuffle(down)
    while total > budget and down:
        n = down.pop()
        changes[n] = assign[n] - 1
        total -= costs[n][assign[n]] - costs[n][assign[n] - 1]
    return changes if total <= budget else None


class Judge(Protocol):
    def score(self, changes: dict[str, int], full: bool) -> float: ...   # KL of parent + changes
    def accept(self, changes: dict[str, int]) -> None: ...               # parent := parent + changes


def evolve(costs: dict[str, list[int]], start: dict[str, int], budget: float, judge: Judge, generations: int,
           offspring: int = 8, survivors: int = 2, seed: int = 0,
           show_progress: bool = False) -> tuple[dict[str, int], list[float]]:
    """(best assignment, full score of the parent after each generation, the start first)."""
    rng = random.Random(seed)
    assign, history = dict(start), [judge.score({}, True)]
    for _ in progress(range(generations), "search", show_progress):
        mutants = [c for c in (mutate(costs, assign, budget, rng) for _ in range(offspring)) if c]
        ranked = sorted(mutants, key=lambda c: judge.score(c, False))[:survivors]
        scored = [(judge.score(c, True), k, c) for k, c in enumerate(ranked)]
        if scored:
            best, _, changes = min(scored)
            if best < history[-1]:
                judge.accept(changes)
                assign.update(changes)
                history.append(best)
                continue
        history.append(history[-1])
    return assign, history


class ModelJudge:
    """KL(P_fp || P) of a copy of the model whose linears hold database weights, on fitness batches. Levels are
    per unit ({unit: its linears}, all of one block): a unit's linears switch together."""

    def __init__(self, model, spec, db: dict[str, list[torch.Tensor]], assign: dict[str, int],
                 batches: list[torch.Tensor], dtype: torch.dtype, device: str = "cpu",
                 units: dict[str, tuple[str, ...]] | None = None):
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.spec, self.db, self.assign, self.device = spec, db, dict(assign), device
        self.units = units or {n: (n,) for n in assign}
        blocks = get_blocks(self.model, spec)
        named = named_block_linears(self.model, spec)
        self.refs = {n: r for n, (_, r) in named.items()}
        self.block_of = {u: named[members[0]][0] for u, members in self.units.items()}
        self.probe = TailProbe(self.model, spec, batches)        # the reference: the fp weights, in `dtype`
        self._set(self.assign)
        inputs = capture_block_inputs(self.model, spec, batches)
        self.calls = [inputs.for_block(i) for i in range(len(blocks))]
        self.hidden = [inputs.hidden]
        self._rerun(0)

    def _rerun(self, first: int) -> None:
        """Block inputs of the parent from block `first` + 1 on (block `first`'s input is unchanged)."""
        blocks = get_blocks(self.model, self.spec)
        del self.hidden[first + 1:]
        for i in range(first, len(blocks) - 1):
            self.hidden.append(run_block(blocks[i], self.hidden[i], self.calls[i], self.device))

    def _set(self, changes: dict[str, int]) -> None:
        for u, level in changes.items():
            for n in self.units[u]:
                self.refs[n].set_weight(self.db[n][level])

    def score(self, changes: dict[str, int], full: bool) -> float:
        first = min((self.block_of[n] for n in changes), default=0)
        self._set(changes)
        try:
            kl = self.probe.kl_per_sequence(first, self.hidden[first], None if full else 1)
        finally:
            self._set({n: self.assign[n] for n in changes})
        return sum(kl) / len(kl)

    def accept(self, changes: dict[str, int]) -> None:
        self._set(changes)
        self.assign.update(changes)
        self._rerun(min(self.block_of[n] for n in changes))


def build_database(model, levels: dict[str, list[Grid]], calib: list[torch.Tensor], cfg: QuantizeConfig,
                   dtype: torch.dtype, device: str = "cpu", batch_size: int = 8,
                   show_progress: bool = False) -> dict[str, list[torch.Tensor]]:
    """{linear: [GPTQ-dequantized weight at each grid]} on the fp model's Hessians from `calib`."""
    spec = arch_spec(model)
    last = max(i for n, (i, _) in named_block_linears(model, spec).items() if n in levels)
    db = {}
    walk = walk_fp_blocks(model, spec, [make_batches(calib, batch_size)], last, device)
    with torch.no_grad():
        for i, block, ((hidden, calls),) in progress(walk, total=last + 1, desc="search database",
                                                     enabled=show_progress):
            groups = block_linears(block, spec)
            mine = {linear_name(spec, i, r.name): r for g in groups for r in g}
            mine = {n: r for n, r in mine.items() if n in levels}
            if not mine:
                continue
            stats = one_pass_stats(GPTQSolver(device), block, groups, hidden, calls, device)
            factors = {}                              # one factorization per statistic (q/k/v share one)
            for n, r in mine.items():
                W, f = r.weight.detach().float().to(device), factors.setdefault(id(stats[r.name]), {})
                db[n] = [gptq(W, stats[r.name].H, g, **gptq_options(cfg, device), factors=f).dequantize()
                         .to("cpu", dtype) for g in levels[n]]
    return db


def search_runs(record: dict | None) -> list[dict]:
    """The runs of a saved search record, oldest first. Each run's KLs are on its own fitness sequences, so
    they compare within a run, not across runs. (A record from before runs were kept is one run.)"""
    if not record:
        return []
    return record["runs"] if "runs" in record else [record]


def searched_allocation(model, measurement: dict, start: Allocation, calib: list[torch.Tensor],
                        fitness: list[torch.Tensor], cfg: QuantizeConfig, generations: int, offspring: int = 8,
                        survivors: int = 2, span: int = 2, seed: int | None = None, device: str = "cpu",
                        batch_size: int = 8, show_progress: bool = False,
                        units: dict[str, tuple[str, ...]] | None = None) -> Allocation:
    """`start` improved by evolve() on the KL over `fitness` sequences; Hessians from `calib`. The seed
    defaults to the number of runs in `start`'s record, so a continued search draws new mutations. `units`
    ({name: linears}, as plan() takes them): a unit's linears move between levels together (a unit's levels:
    the schemes all its linears were measured at, on their summed costs and errors); None: each on its own."""
    if seed is None:
        seed = len(search_runs(start.search))
    units = restrict_units(units, start.layers)
    opts, levels, assign = {}, {}, {}
    for u, members in sorted(units.items()):
        options = unit_options(u, [measurement["layers"][n]["options"] for n in members])
        picks = {scheme_of(start.layers[n]) for n in members}
        if len(picks) > 1:
            raise QForgeError(f"the allocation gives the linears of {u} {len(picks)} schemes; a search over fused "
                              f"sets starts from an allocation that ties them (plan it so, or search per linear)")
        (picked,) = picks
        pick = next(j for j, o in enumerate(options) if scheme_of(o) == picked)
        front = pareto_levels(options)
        if pick not in front:                          # the optimiser's pick stays reachable
            front = sorted(front + [pick], key=lambda j: (options[j]["stored_bits"], options[j]["err"]))
        k = front.index(pick)
        front = front[max(0, k - span): k + span + 1]
        opts[u], assign[u] = [options[j] for j in front], front.index(pick)
        levels[u] = [Grid(*scheme_of(o)) for o in opts[u]]
    costs = {u: [o["stored_bits"] for o in opts[u]] for u in units}
    budget = start.target_bpw * sum(d["numel"] for d in start.layers.values())
    dtype = getattr(torch, cfg.for_device(device).compute_dtype)
    db = build_database(model, {n: levels[u] for u, members in units.items() for n in members}, calib, cfg, dtype,
                        device, batch_size, show_progress)
    judge = ModelJudge(model, arch_spec(model), db, assign, make_batches(fitness, batch_size), dtype, device, units)
    best, history = evolve(costs, assign, budget, judge, generations, offspring, survivors, seed, show_progress)
    del judge, db
    layers = {}
    for u, members in units.items():
        scheme = scheme_of(opts[u][best[u]])
        for n in members:
            o = next(o for o in measurement["layers"][n]["options"] if scheme_of(o) == scheme)
            layers[n] = {**{k: o[k] for k in ("bits", "group_size", "sym", "stored_bits", "err")},
                         "rel_err": o.get("rel_err"), "numel": start.layers[n]["numel"]}
    layers = {n: layers[n] for n in sorted(layers)}
    accepted = sum(b < a for a, b in zip(history, history[1:]))
    run = {"generations": generations, "seed": seed, "offspring": offspring, "survivors": survivors, "span": span,
           "sequences": len(fitness), "kl_start": history[0], "kl_end": history[-1], "accepted": accepted,
           "history": history}
    runs = search_runs(start.search) + [run]           # a searched start: this run continues its record
    report = {"generations": sum(r["generations"] for r in runs), "runs": runs}
    log.info("search: fitness KL %.4f -> %.4f on %d sequences in %d generations (%d accepted; %d in all)",
             history[0], history[-1], len(fitness), generations, accepted, report["generations"])
    return Allocation(start.target_bpw, start.format, layers, start.verification, report)
