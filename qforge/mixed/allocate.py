"""Choose one scheme per linear: minimise the summed measured error subject to an average
bits-per-weight budget (a multiple-choice knapsack), solved exactly on a cost grid by dynamic programming.

Costs are rounded *up* to the grid's unit, so a solution that fits the rounded budget always fits
the true one; with `resolution` units over the budget the loss from rounding is below one unit per
layer. Ties are broken by the order of the candidates, so the result is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QForgeError


@dataclass(frozen=True)
class Option:
    key: str          # scheme id, e.g. "4b g64 sym"
    bits: int         # exact stored bits of the layer with this scheme
    err: float        # measured error (lower is better)


def allocate(layers: dict[str, list[Option]], n_weights: dict[str, int], target_bpw: float,
             resolution: int = 20000) -> dict[str, Option]:
    """{layer: options}, {layer: out*in} and a target average bpw -> {layer: chosen option}."""
    if not layers:
        raise QForgeError("nothing to allocate: the measurement has no layers")
    names = sorted(layers)
    budget = target_bpw * sum(n_weights[n] for n in names)          # bits
    cheapest = sum(min(o.bits for o in layers[n]) for n in names)
    if cheapest > budget:
        raise QForgeError(f"target {target_bpw} bpw is below the cheapest scheme of every layer "
                          f"({cheapest / sum(n_weights[n] for n in names):.3f} bpw)")
    unit = budget / resolution
    units = {n: [int(np.ceil(o.bits / unit - 1e-9)) for o in layers[n]] for n in names}
    f = np.full(resolution + 1, np.inf)                              # f[c]: min error using exactly c units
    f[0] = 0.0
    choice = np.full((len(names), resolution + 1), -1, dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(resolution + 1, np.inf)
        for j, (o, c) in enumerate(zip(layers[n], units[n])):
            if c > resolution:
                continue
            cand = np.full(resolution + 1, np.inf)
            cand[c:] = f[: resolution + 1 - c] + o.err
            better = cand < new                                       # strict: the first candidate wins ties
            new[better] = cand[better]
            choice[i, better] = j
        f = new
    c = int(np.argmin(f))
    if not np.isfinite(f[c]):
        raise QForgeError(f"no allocation fits {target_bpw} bpw at this resolution; raise the target")
    chosen = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(choice[i, c])
        chosen[names[i]] = layers[names[i]][j]
        c -= units[names[i]][j]
    return {n: chosen[n] for n in names}

