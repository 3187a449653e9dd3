"""From a measurement to a per-layer allocation: the optimiser's input and output as files, a table and a plot.

allocation.json: {"target_bpw", "bpw" (exact, as the format stores it), "format", "total_err",
                  "layers": {name: {"bits", "group_size", "sym", "stored_bits", "err", "rel_err", "numel"}},
                  "verification": what mixed/verify.py checked and raised (absent when unchecked),
                  "search": what mixed/search.py tried and found (absent when not searched)}
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import QForgeError
from ..solvers import Grid
from .allocate import Option, allocate
from .measure import grid_key

log = logging.getLogger(__name__)
ALLOCATION_FILE = "allocation.json"     # beside a saved or exported mixed-precision run


@dataclass(frozen=True)
class Allocation:
    target_bpw: float
    format: str | None
    layers: dict[str, dict]
    verification: dict | None = None
    search: dict | None = None

    @property
    def grids(self) -> dict[str, Grid]:
        return {n: Grid(*scheme_of(d)) for n, d in self.layers.items()}

    @property
    def bpw(self) -> float:
        return sum(d["stored_bits"] for d in self.layers.values()) / sum(d["numel"] for d in self.layers.values())

    @property
    def total_err(self) -> float:
        return sum(d["err"] for d in self.layers.values())

    def to_json(self) -> dict:
        return {"target_bpw": self.target_bpw, "bpw": self.bpw, "format": self.format, "total_err": self.total_err,
                "layers": self.layers, **({"verification": self.verification} if self.verification else {}),
                **({"search": self.search} if self.search else {})}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def write_beside(self, directory: str | Path) -> None:
        """allocation.json and its plot, allocation.png, in an output directory (saved or exported)."""
        self.save(Path(directory) / ALLOCATION_FILE)
        plot_allocation(self, Path(directory) / "allocation.png")

    @classmethod
    def load(cls, path: str | Path) -> "Allocation":
        try:
            d = json.loads(Path(path).read_text())
            a = cls(float(d["target_bpw"]), d.get("format"), d["layers"], d.get("verification"), d.get("search"))
            bad = [n for n, g in a.grids.items() if not _valid(g)]
            if bad or a.bpw <= 0:
                raise ValueError(f"no valid scheme for {bad[0] if bad else 'its layers'}")
            return a
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError) as e:
            raise QForgeError(f"{path} is not a qforge allocation: {e}") from e


def _valid(g: Grid) -> bool:
    return (type(g.bits) is int and 2 <= g.bits <= 8 and type(g.group_size) is int
            and (g.group_size == -1 or g.group_size > 0) and type(g.sym) is bool)


def load_measurement(path: str | Path) -> dict:
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise QForgeError(f"cannot read measurement {path}: {e}") from e
    from .measure import VERSION

    if m.get("version") != VERSION:
        raise QForgeError(f"{path} was measured by an older qforge (version {m.get('version')}, whose error proxy "
                          f"is withdrawn); run `qforge measure` again")
    if "layers" not in m or m.get("blocks_done") != m.get("n_blocks"):
        raise QForgeError(f"{path} is an unfinished measurement ({m.get('blocks_done')} of {m.get('n_blocks')} "
                          f"blocks); run `qforge measure` again to finish it")
    return m


def restate_costs(measurement: dict, fmt: str | None) -> dict:
    """`measurement` with every option's stored bits counted as `fmt` stores them, and the widths `fmt` cannot
    store dropped: a layer's error does not depend on the format, its cost does (gptq keeps g_idx and zeros
    that compressed-tensors does not), so one measurement serves every export format."""
    from .schemes import FORMAT_BITS, scheme_bits

    if measurement.get("format") == fmt:
        return measurement
    if fmt not in FORMAT_BITS:
        raise QForgeError(f"no mixed-precision costs for format {fmt!r}; choose one of gptq, compressed-tensors")
    layers = {}
    for n, d in measurement["layers"].items():
        shape = tuple(d["shape"])
        rows = tuple(d["stored_rows"]) if "stored_rows" in d and fmt is not None else None
        options = [{**o, "stored_bits": scheme_bits(shape, Grid(*scheme_of(o)), fmt,
                                                    bool(measurement.get("act_order")), rows)}
                   for o in d["options"] if o["bits"] in FORMAT_BITS[fmt]]
        if not options:
            raise QForgeError(f"{n}: none of its measured widths can be stored as {fmt}")
        layers[n] = {**d, "options": options}
    log.info("measurement taken for %s storage, costs restated as %s stores them", measurement.get("format"), fmt)
    return {**measurement, "format": fmt, "layers": layers}


def only_widths(measurement: dict, bits: tuple[int, ...]) -> dict:
    """`measurement` with every linear's options cut to the widths in `bits` (what the allocation may use)."""
    layers = {}
    for n, d in measurement["layers"].items():
        layers[n] = {**d, "options": [o for o in d["options"] if o["bits"] in bits]}
        if not layers[n]["options"]:
            measured = sorted({o["bits"] for o in d["options"]})
            raise QForgeError(f"{n} was measured at {', '.join(map(str, measured))} bits, none of the allowed "
                              f"{', '.join(map(str, bits))}: measure again with those widths")
    return {**measurement, "layers": layers}


# Below this width a per-channel scheme is taken only when the budget cannot be met without it: on SmolLM2
# at 3.0 bpw the allocation that gave block 0's attention projections 2 bits per channel broke one held-out
# sequence in 64 (4 nats/token), which the per-linear measurement cannot see (BENCHMARKS.md, "Mixed precision").
PC_MIN_BITS = 3


def plan(measurement: dict, target_bpw: float, skip: tuple[str, ...] = (), err_power: float = 1.0,
         pc_min_bits: int = PC_MIN_BITS, units: dict[str, tuple[str, ...]] | None = None) -> Allocation:
    """The allocation that minimises the summed error at <= target_bpw (over the measured layers); with
    err_power p > 1 it minimises the sum of err^p instead, which spreads error over more layers. Per-channel
    schemes below `pc_min_bits` are left out unless the target needs them. `units` ({name: linears}, e.g.
    models.fused.fused_sets): the linears of a unit get one scheme, chosen on their summed cost and error
    (a scheme is a unit's option when every linear in it was measured at it); None: every linear on its own."""
    from fnmatch import fnmatch

    layers = {n: d for n, d in measurement["layers"].items() if not any(fnmatch(n, p) for p in skip)}
    numel = {n: d["shape"][0] * d["shape"][1] for n, d in layers.items()}
    units = restrict_units(units, layers)
    keep = {n: [o for o in d["options"] if o["group_size"] != -1 or o["bits"] >= pc_min_bits] or d["options"]
            for n, d in layers.items()}
    combined = {u: unit_options(u, [keep[n] for n in members], err_power) for u, members in units.items()}
    if sum(min(o["stored_bits"] for o in combined[u]) for u in units) > target_bpw * sum(numel.values()):
        log.warning("%.2f bpw needs per-channel schemes below %d bits: allowing them (they can break inputs the "
                    "measurement did not see; check the result on your own text)", target_bpw, pc_min_bits)
        keep = {n: d["options"] for n, d in layers.items()}
        combined = {u: unit_options(u, [keep[n] for n in members], err_power) for u, members in units.items()}
    options = {u: [Option(grid_key(Grid(*scheme_of(o))), o["stored_bits"], o["err"]) for o in combined[u]]
               for u in units}
    chosen = allocate(options, {u: sum(numel[n] for n in members) for u, members in units.items()}, target_bpw)
    out = {}
    for u, opt in chosen.items():
        scheme = scheme_of(combined[u][options[u].index(opt)])
        for n in units[u]:
            o = next(o for o in keep[n] if scheme_of(o) == scheme)
            out[n] = {"bits": o["bits"], "group_size": o["group_size"], "sym": o["sym"],
                      "stored_bits": o["stored_bits"], "err": o["err"], "rel_err": o.get("rel_err"), "numel": numel[n]}
    a = Allocation(target_bpw, measurement.get("format"), {n: out[n] for n in layers})
    log.info("allocation for %.2f bpw: %.4f bpw, total error %.4g (%d linears in %d units)", target_bpw, a.bpw,
             a.total_err, len(layers), len(units))
    return a


def scheme_of(option: dict) -> tuple:
    """(bits, group_size, sym) of a measured option or an allocated layer."""
    return option["bits"], option["group_size"], option["sym"]


def unit_options(unit: str, per_linear: list[list[dict]], err_power: float = 1.0) -> list[dict]:
    """The options of a unit whose linears take one scheme: the schemes every linear has among its options
    (`per_linear`, one list per linear), in the first linear's order, with their stored bits and err^err_power
    summed over the linears."""
    shared = set.intersection(*({scheme_of(o) for o in options} for options in per_linear))
    if not shared:
        raise QForgeError(f"the linears of {unit} share no measured scheme, so they cannot take one; measure them "
                          f"with the same candidates (or allocate per linear)")
    by_scheme = [{scheme_of(o): o for o in options} for options in per_linear]
    return [{"bits": s[0], "group_size": s[1], "sym": s[2],
             "stored_bits": sum(b[s]["stored_bits"] for b in by_scheme),
             "err": sum(b[s]["err"] ** err_power for b in by_scheme)}
            for s in (scheme_of(o) for o in per_linear[0]) if s in shared]


def restrict_units(units: dict[str, tuple[str, ...]] | None, layers) -> dict[str, tuple[str, ...]]:
    """`units` restricted to `layers` (the linears being allocated; units left empty dropped), or one unit per
    layer when None; a layer in no unit is refused."""
    if units is None:
        return {n: (n,) for n in layers}
    out = {u: tuple(n for n in members if n in layers) for u, members in units.items()}
    out = {u: m for u, m in out.items() if m}
    missing = sorted(set(layers) - {n for m in out.values() for n in m})
    if missing:
        raise QForgeError(f"{missing[0]} (and {len(missing) - 1} more) is allocated but in no allocation unit")
    return out


def allocation_rows(a: Allocation) -> list[list]:
    return [[n, grid_key(Grid(*scheme_of(d))), d["stored_bits"] / d["numel"], d["err"],
             d.get("rel_err")]
            for n, d in a.layers.items()]


def plot_allocation(a: Allocation, path: str | Path) -> None:
    """Bits per weight of every layer in model order, coloured by the linear's role."""
    from ..analysis.plots import plot_by_role

    plot_by_role({n: d["stored_bits"] / d["numel"] for n, d in a.layers.items()}, path, "stored bits per weight",
                 f"mixed precision at {a.target_bpw} bpw ({a.format or 'qforge'} storage)", average=a.bpw)
