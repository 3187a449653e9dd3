"""The layer-wise quantization driver: one decoder block at a time.

Methods that need no data (RTN) quantize each linear's weight directly. Methods that do:
  1. capture the inputs of every block once from the calibration batches (capture.blocks);
  2. for block i, for each linear group in execution order (true-sequential): run the block with
     hooks feeding the group's inputs to the solver's statistics, solve each linear, write it back;
  3. run the quantized block to produce block i+1's inputs.
Only the current block is moved to the compute device. Solvers plug in through SOLVERS.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .capture import capture_block_inputs, collect_linear_inputs, run_block
from .capture.blocks import make_batches
from .config import QuantizeConfig
from .errors import QForgeError
from .models.arch import ArchSpec, LinearRef, arch_spec, block_linears, get_blocks
from .solvers import Grid, LayerQuant, rtn
from .utils.progress import progress

log = logging.getLogger(__name__)


class Solver(Protocol):
    needs_inputs: bool

    def new_stats(self, in_features: int) -> object: ...
    def add(self, stats: object, x: torch.Tensor) -> None: ...
    def solve(self, W: torch.Tensor, stats: object, grid: Grid, cfg: QuantizeConfig) -> LayerQuant: ...


class RTNSolver:
    needs_inputs = False

    def solve(self, W, stats, grid, cfg):
        return rtn(W, grid)


SOLVERS: dict[str, Callable[[], Solver]] = {"rtn": RTNSolver}


@dataclass
class QuantizeResult:
    """Per-layer results keyed by full module name (experts: `<param path>.<expert>`)."""

    layers: dict[str, LayerQuant] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> list[dict]:
        return [{"name": n, "shape": list(q.shape), **q.info} for n, q in self.layers.items()]

    @property
    def ragged_layers(self) -> list[str]:
        return [n for n, q in self.layers.items() if q.grid.ragged(q.shape[1])]


def _solve_into(ref: LinearRef, full_name: str, solver: Solver, stats, grid: Grid, cfg: QuantizeConfig,
                result: QuantizeResult) -> None:
    W = ref.weight.detach().float()
    q = solver.solve(W, stats, grid, cfg)
    W_hat = q.dequantize()
    if not torch.isfinite(W_hat).all():
        raise QForgeError(f"{full_name}: the solver produced non-finite weights")  # never written back
    q.info["rel_weight_err"] = float((W - W_hat).norm() / W.norm().clamp_min(1e-12))
    ref.set_weight(W_hat)
    result.layers[full_name] = q


def _skipped(name: str, cfg: QuantizeConfig) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pat) for pat in cfg.skip)


def quantize_model(model: nn.Module, cfg: QuantizeConfig, samples: list[torch.Tensor] | None = None,
                   device: str = "cpu", batch_size: int = 8, show_progress: bool = True) -> QuantizeResult:
    """Quantize `model` in place (its weights become the dequantized grid values) and return the codes."""
    spec = arch_spec(model)
    solver = SOLVERS[cfg.method]() if cfg.method in SOLVERS else None
    if solver is None:
        raise QForgeError(f"method {cfg.method!r} is not available in this version of qforge")
    grid = Grid(cfg.bits, cfg.group_size, cfg.sym)
    blocks = get_blocks(model, spec)
    result = QuantizeResult()
    t0 = time.perf_counter()
    if not solver.needs_inputs:
        for i, block in enumerate(progress(blocks, desc=f"{cfg.method} blocks", enabled=show_progress)):
            for group in block_linears(block, spec):
                for ref in group:
                    name = f"{spec.blocks}.{i}.{ref.name}"
                    if not _skipped(name, cfg):
                        _solve_into(ref, name, solver, None, grid, cfg, result)
    else:
        if not samples:
            raise QForgeError(f"method {cfg.method!r} needs calibration samples")
        _quantize_calibrated(model, spec, blocks, solver, grid, cfg, samples, device, batch_size, result, show_progress)
    result.seconds = time.perf_counter() - t0
    return result


def _quantize_calibrated(model, spec: ArchSpec, blocks, solver: Solver, grid: Grid, cfg: QuantizeConfig,
                         samples, device, batch_size, result: QuantizeResult, show_progress: bool) -> None:
    batches = make_batches(samples, batch_size)
    inputs = capture_block_inputs(model, spec, batches)
    hidden = inputs.hidden
    for i, block in enumerate(progress(blocks, desc=f"{cfg.method} blocks", enabled=show_progress)):
        block.to(device)
        kwargs = inputs.for_block(i)
        groups = block_linears(block, spec)
        if not cfg.true_sequential:
            groups = [[ref for g in groups for ref in g]]
        for group in groups:
            todo = [r for r in group if not _skipped(f"{spec.blocks}.{i}.{r.name}", cfg)]
            if not todo:
                continue
            stats = {r.name: solver.new_stats(r.shape[1]) for r in todo}
            with collect_linear_inputs(todo, lambda ref, x: solver.add(stats[ref.name], x)):
                run_block(block, hidden, kwargs, device)
            for ref in todo:
                _solve_into(ref, f"{spec.blocks}.{i}.{ref.name}", solver, stats[ref.name], grid, cfg, result)
        hidden = run_block(block, hidden, kwargs, device)
        block.to("cpu")
