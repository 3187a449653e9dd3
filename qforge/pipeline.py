"""The layer-wise quantization driver: one decoder block at a time.

Methods that need no data (RTN) quantize each linear's weight directly. Methods that do:
  1. capture the inputs of every block once from the calibration batches (capture.blocks);
  2. AWQ methods first search per-channel scales and clips on block i and fold them in (smoothing/),
     SmoothQuant (W8A8) folds its scales from block i's input maxima; GPTAQ runs the (transformed, unrounded)
     block on the fp model's activations, for its linears' fp inputs and block i+1's fp activations;
     then for each linear group in execution order (true-sequential: a group's inputs pass
     through the already quantized earlier groups): run the block with the group's input fed to the
     solver's statistics (capture.linear_inputs), solve each linear, write it back;
  3. run the quantized block to produce block i+1's inputs (static input scales: observing every linear's input).
Only the current block is moved to the compute device. Solvers plug in through SOLVERS.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Callable, Protocol

import torch
from torch import nn

from .capture import HessianAccumulator, capture_block_inputs, collect_group_inputs, run_block
from .capture.hessian import AsymmetricAccumulator, FpBatches
from .capture.blocks import (call_on, carried_copies, cast_call, fits_on_device, make_batches, with_carried,
                             with_own_carried)
from .capture.input_range import InputRange
from .capture.linear_inputs import feed_block, tap_inputs
from .capture.replay import FrozenOutputs, recordings_fit
from .config import QuantizeConfig
from .errors import QForgeError
from .kernels.gptq_loop import column_loop_for
from .models.arch import ArchSpec, LinearRef, arch_spec, block_linears, get_blocks, linear_name, named_block_linears
from .utils.tensors import all_finite
from .smoothing import BlockAWQ, awq_block
from .smoothing.smoothquant import smooth_block
from .smoothing.store import load_awq
from .solvers import Grid, LayerQuant, gptq, rtn
from .utils.device import available_bytes
from .utils.progress import progress

log = logging.getLogger(__name__)


class Solver(Protocol):
    needs_inputs: bool

    def new_stats(self, in_features: int) -> object: ...
    def add(self, stats: object, x: torch.Tensor) -> None: ...
    def solve(self, W: torch.Tensor, stats: object, grid: Grid, cfg: QuantizeConfig,
              shared: dict | None = None) -> LayerQuant: ...   # shared: kept across one statistic's grids


class RTNSolver:
    needs_inputs = False

    def __init__(self, device: str = "cpu", product_dtype: torch.dtype = torch.float32):
        self.device = device

    def solve(self, W, stats, grid, cfg, shared=None):
        return rtn(W, grid)


class GPTQSolver:
    needs_inputs = True

    def __init__(self, device: str = "cpu", product_dtype: torch.dtype = torch.float32):
        self.device, self.product_dtype = device, product_dtype

    def new_stats(self, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features, self.device, self.product_dtype)

    def add(self, stats: HessianAccumulator, x: torch.Tensor) -> None:
        stats.add(x)

    def solve(self, W, stats: HessianAccumulator, grid, cfg, shared=None):
        device = stats.H.device
        # solved once (no shared factors): H is handed over in a list gptq empties, so it is freed once factored
        return gptq(W.to(device), stats.H if shared is not None else [stats.take()], grid,
                    **gptq_options(cfg, device), factors=shared)


class GPTAQSolver(GPTQSolver):
    """GPTQ on GPTAQ's statistics (solvers/gptq.py): a statistic made with its linears' fp inputs is asymmetric; one
    made without (a fused expert's: routing sends it other tokens in the fp model) is plain GPTQ's."""

    def __init__(self, device: str = "cpu", product_dtype: torch.dtype = torch.float32, alpha: float = 0.25):
        super().__init__(device, product_dtype)
        self.alpha = alpha

    def new_stats(self, in_features: int, fp_inputs: FpBatches | None = None) -> HessianAccumulator:
        if fp_inputs is None:
            return super().new_stats(in_features)
        return AsymmetricAccumulator(in_features, fp_inputs, self.device, self.product_dtype)

    def solve(self, W, stats, grid, cfg, shared=None):
        if not isinstance(stats, AsymmetricAccumulator):
            return super().solve(W, stats, grid, cfg, shared)
        device = stats.H.device
        dXXT = stats.dXXT if shared is not None else stats.take_dXXT()
        return gptq(W.to(device), stats.H if shared is not None else [stats.take()], grid,
                    **gptq_options(cfg, device), factors=shared, dXXT=dXXT, alpha=self.alpha)


def gptq_options(cfg: QuantizeConfig, device="cpu") -> dict:
    """The config's keyword options of solvers.gptq (the solve, AWQ's GPTQ-judged search, the measurement),
    with the column loop for tensors on `device` (one Triton kernel per block on CUDA: kernels/gptq_loop.py, GPTAQ's
    extra term included; FP8's, NVFP4's and MX's rounding run in the reference loop)."""
    return dict(damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups,
                group_aware=cfg.act_group_aware, scale_search=cfg.scale_search,
                loop=column_loop_for(device, cfg.fp8 or cfg.grid.fp4))


# AWQ methods transform each block first (smoothing/), then quantize with the named solver
SOLVERS: dict[str, Callable[..., Solver]] = {"rtn": RTNSolver, "gptq": GPTQSolver, "awq": RTNSolver,
                                             "awq+gptq": GPTQSolver}


@dataclass
class QuantizeResult:
    """Per-layer results keyed by full module name (experts: `<param path>.<expert>`)."""

    layers: dict[str, LayerQuant] = field(default_factory=dict)
    seconds: float = 0.0
    awq: dict[int, BlockAWQ] = field(default_factory=dict)   # block index -> AWQ scales/clips applied
    allocation: object | None = None                         # mixed precision: the mixed.plan.Allocation used
    smoothquant: dict[str, torch.Tensor] = field(default_factory=dict)   # "<block>.<prev>" -> SmoothQuant scales
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)     # FP8 KV: "<attention>.k_scale" -> fp32 [1]
    rotation: dict | None = None                             # what smoothing/rotate.rotate_model did (run record)

    def summary(self) -> list[dict]:
        return [{"name": n, "shape": list(q.shape), **q.info} for n, q in self.layers.items()]

    @property
    def ragged_layers(self) -> list[str]:
        return [n for n, q in self.layers.items() if q.grid.ragged(q.shape[1])]


def _saved_awq(cfg: QuantizeConfig, spec) -> dict:
    """The AWQ results cfg.awq_from names, refused when they were searched on another rotation of the model."""
    saved, meta = load_awq(cfg.awq_from, spec.blocks)
    if meta.get("rotation") != cfg.rotation_key:
        raise QForgeError(f"{cfg.awq_from}: its AWQ scales were searched on the model rotated as "
                          f"{meta.get('rotation') or 'not at all'}, this run rotates it as "
                          f"{cfg.rotation_key or 'not at all'}")
    return saved


def _solve_into(ref: LinearRef, full_name: str, solver: Solver, stats, grid: Grid, cfg: QuantizeConfig,
                result: QuantizeResult) -> None:
    W = ref.weight.detach().float()
    _write_back(ref, full_name, W, solver.solve(W, stats, grid, cfg), result)


def _solve_stacked(refs: list[LinearRef], names: list[str], solver: Solver, stats, grid: Grid, cfg: QuantizeConfig,
                   result: QuantizeResult, shared: dict | None = None) -> None:
    """Linears that read one input (one statistic) on one grid solved as one matrix, their rows stacked:
    GPTQ's rows are independent given H, so q/k/v (or gate/up) cost one factorisation and one column
    loop instead of three (or two). Each part is then checked and recorded on its own. `shared`: the solver's
    dict for this statistic's other grids (mixed precision), or None. FP8 blocks that a stacked part would start
    mid-block keep their layers apart."""
    Ws = [r.weight.detach().float() for r in refs]
    if len(refs) == 1 or (grid.block_rows and any(W.shape[0] % grid.block_rows for W in Ws[:-1])):
        shared = {} if shared is None and len(refs) > 1 else shared    # one statistic, solved more than once
        for ref, name, W in zip(refs, names, Ws):
            _write_back(ref, name, W, solver.solve(W, stats, grid, cfg, shared), result)
        return
    q = solver.solve(torch.cat(Ws), stats, grid, cfg, shared)
    r0 = 0
    for ref, name, W in zip(refs, names, Ws):
        part = q.rows(r0, r0 + W.shape[0])
        part.info["stacked_with"] = [n for n in names if n != name]
        _write_back(ref, name, W, part, result)
        r0 += W.shape[0]


def _write_back(ref: LinearRef, full_name: str, W: torch.Tensor, q: LayerQuant, result: QuantizeResult) -> None:
    W_hat = q.dequantize()
    if not all_finite(W_hat):
        raise QForgeError(f"{full_name}: the solver produced non-finite weights")  # never written back
    if q.w_hat is not None and not torch.equal(W_hat, q.w_hat):
        raise QForgeError(f"{full_name}: codes/scales/g_idx do not reproduce the solver's weights")
    q.w_hat = q.row_loss = None
    q.codes, q.scales, q.zeros, q.g_idx = (t.cpu() for t in (q.codes, q.scales, q.zeros, q.g_idx))
    q.info["rel_weight_err"] = float((W - W_hat.to(W.device)).norm() / W.norm().clamp_min(1e-12))
    ref.set_weight(W_hat)
    result.layers[full_name] = q
    log.debug("%s: %s", full_name, {k: v for k, v in q.info.items() if k != "method"})


def _stackable(refs: list[LinearRef], names: list[str], stats: dict, grids: dict, grid: Grid) -> list[list[int]]:
    """Indices of `refs` in runs to solve together: one statistic object and one grid (in first-seen order); without
    statistics (RTN) each alone, but NVFP4's together (linears of one input share a global scale)."""
    runs: dict[tuple, list[int]] = {}
    for j, (ref, name) in enumerate(zip(refs, names)):
        st, g = stats.get(ref.name), grids.get(name, grid)
        runs.setdefault((j,) if st is None and not g.nvfp4 else (id(st), g), []).append(j)
    return list(runs.values())


def _skipped(name: str, cfg: QuantizeConfig) -> bool:
    return any(fnmatch(name, pat) for pat in cfg.skip)


def quantized_linears(model: nn.Module, cfg: QuantizeConfig) -> dict[str, LinearRef]:
    """The linears quantize_model will quantize under `cfg`, by full name."""
    return {n: r for n, (_, r) in named_block_linears(model, arch_spec(model)).items() if not _skipped(n, cfg)}


def _kept(groups: list[list[LinearRef]], prefix: str, cfg: QuantizeConfig) -> list[list[LinearRef]]:
    return [[r for r in g if not _skipped(f"{prefix}.{r.name}", cfg)] for g in groups]


def quantize_model(model: nn.Module, cfg: QuantizeConfig, samples: list[torch.Tensor] | None = None,
                   device: str = "cpu", batch_size: int = 8, show_progress: bool = True,
                   grids: dict[str, Grid] | None = None, store=None, weights=None) -> QuantizeResult:
    """Quantize `model` in place (its weights become the dequantized grid values) and return the codes.

    `grids` (mixed precision) gives some layers, by full name, their own grid instead of the config's.
    `store` (a runstate.BlockStore) saves each calibrated block as it finishes and restores the blocks an
    interrupted run had finished. `weights` (a models.streaming.BlockLoader; needs `store`) streams a model
    whose parameters are on the meta device: each block is read before its turn and dropped once saved, the
    weights outside the blocks only for the capture pass (`weights.outside`), and the result keeps its layers'
    shapes only (LayerQuant.on_meta), their values being in the store."""
    spec = arch_spec(model)
    cfg = cfg.for_device(device)
    if cfg.method not in SOLVERS:
        raise QForgeError(f"method {cfg.method!r} is not available in this version of qforge")
    # bf16 passes: bf16 Hessian products unless hessian_dtype float32 (capture/hessian.py); fp16 would overflow
    bf16_products = cfg.compute_dtype == "bfloat16" and cfg.hessian_dtype == "bfloat16"
    products = torch.bfloat16 if bf16_products else torch.float32
    solver = SOLVERS[cfg.method](device, products) if cfg.gptaq is None else GPTAQSolver(device, products, cfg.gptaq)
    grid = cfg.grid
    blocks = get_blocks(model, spec)
    result = QuantizeResult()
    grids = grids or {}
    saved = _saved_awq(cfg, spec) if cfg.awq_from else None
    t0 = time.perf_counter()
    if weights is not None and store is None:
        raise QForgeError("a streamed model needs a run state (store) to hold its finished blocks")
    if not solver.needs_inputs and not (cfg.uses_awq and saved is None) and cfg.smoothquant is None \
            and not cfg.act_static:
        for i, block in enumerate(progress(blocks, desc=f"{cfg.method} blocks", enabled=show_progress)):
            if weights is not None:
                weights.load(i, block)
            if store is not None and i < store.blocks_done:
                _restore(i, block, store, cfg, result)
                _block_done(i, block, spec, result, None, weights)
                continue
            if saved is not None:
                result.awq[i] = awq_block(block, spec, [], [], grid, given=saved.get(i, BlockAWQ()))
            for group in block_linears(block, spec):
                kept = [(ref, linear_name(spec, i, ref.name)) for ref in group]
                kept = [(ref, name) for ref, name in kept if not _skipped(name, cfg)]
                if grid.nvfp4 and kept:   # NVFP4: linears of one input (fused by engines) share a global scale
                    _solve_stacked(*map(list, zip(*kept)), solver, None, grid, cfg, result)
                    continue
                for ref, name in kept:
                    _solve_into(ref, name, solver, None, grids.get(name, grid), cfg, result)
            _block_done(i, block, spec, result, store, weights)
    else:
        if not samples:
            raise QForgeError(f"method {cfg.method!r} needs calibration samples")
        _quantize_calibrated(model, spec, blocks, solver, grid, cfg, samples, device, batch_size, result, show_progress,
                             saved, grids, store=store, weights=weights)
    result.seconds = time.perf_counter() - t0
    return result


def _quantize_calibrated(model, spec: ArchSpec, blocks, solver: Solver, grid: Grid, cfg: QuantizeConfig,
                         samples, device, batch_size, result: QuantizeResult, show_progress: bool,
                         saved: dict[int, BlockAWQ] | None = None, grids: dict[str, Grid] | None = None,
                         reuse_passes: bool = True, store=None, weights=None) -> None:
    """`reuse_passes=False` runs every pass in full (no early exit, no replay): the reference the tests
    compare the fast schedule with."""
    grids = grids or {}
    dtype = getattr(torch, cfg.for_device(device).compute_dtype)
    with weights.outside(model, without="head") if weights is not None else contextlib.nullcontext():   # streamed
        inputs = capture_block_inputs(model, spec, make_batches(samples, batch_size))
    hidden = [h.to(dtype) for h in inputs.hidden]
    nbytes = sum(h.numel() * h.element_size() for h in hidden)
    resident = fits_on_device(nbytes, device)
    if resident:                                       # activations stay on the device between passes
        hidden = [h.to(device) for h in hidden]
        log.info("calibration activations kept on %s (%.2f GB)", device, nbytes / 1e9)
    recordings_on = device if resident and recordings_fit(nbytes, device) else "cpu"   # the replays' too
    if recordings_on != "cpu":
        log.info("sub-module recordings for replay kept on %s", device)
    fp_hidden = hidden if cfg.gptaq is not None else None   # GPTAQ: the fp model's activations, block by block,
    fp_state = carried_copies(inputs.for_block(0), spec.carried)  # and what its blocks leave for later ones
    for i, block in enumerate(progress(blocks, desc=f"{cfg.method} blocks", enabled=show_progress)):
        t_block = time.perf_counter()
        if weights is not None:
            weights.load(i, block)
        block.to(device)
        calls = [cast_call(call_on(c, device) if resident else c, dtype) for c in inputs.for_block(i)]
        fp_calls = with_carried(calls, spec.carried, fp_state)
        if store is not None and i < store.blocks_done:      # finished by an interrupted run: restore, re-run
            if fp_hidden is not None:                         # its fp weights first (restoring replaces them)
                fp_hidden = run_block(_compute_copy(block, dtype), fp_hidden, fp_calls, device)
            _restore(i, block, store, cfg, result)
            hidden = run_block(_compute_copy(block, dtype), hidden, calls, device)
            block.to("cpu")
            _block_done(i, block, spec, result, None, weights)
            continue
        fp32_calls = with_own_carried(inputs.for_block(i), spec.carried, torch.float32)   # the searches' own state
        if cfg.uses_awq:  # AWQ searches and folds on the fp32 block
            given = None if saved is None else saved.get(i, BlockAWQ())
            result.awq[i] = awq_block(block, spec, [h.float() for h in hidden], fp32_calls, grid,
                                      cfg.awq_grid, cfg.awq_duo_scaling, cfg.awq_clip, device=device, given=given,
                                      gptq_opts=gptq_options(cfg, device) if cfg.awq_gptq_aware else None)
        if cfg.smoothquant is not None:   # W8A8: SmoothQuant folds its scales in first, on the fp32 block
            sq = smooth_block(block, spec, [h.float() for h in hidden], fp32_calls, cfg.smoothquant, device)
            result.smoothquant.update({f"{i}.{k}": s for k, s in sq.items()})
        # the passes run `fwd`, a copy of the block in the compute dtype (the block itself when fp32); the
        # solvers read the fp32 block's weights, and each solved weight is written to both
        fwd = _compute_copy(block, dtype)
        groups, fwd_groups = (_kept(block_linears(b, spec), f"{spec.blocks}.{i}", cfg) for b in (block, fwd))
        fp_inputs, fp_block = {}, None
        if fp_hidden is not None:                            # GPTAQ: before any weight of the block is rounded
            fp_inputs, fp_block, fp_out = fp_group_inputs(fwd, fwd_groups, fp_hidden, fp_calls, device)
            fp_hidden = fp_out if fp_out is not None else fp_hidden
        stats: dict = {}
        if solver.needs_inputs and not cfg.true_sequential:  # one pass over the unquantized block: every group
            stats = one_pass_stats(solver, fwd, fwd_groups, hidden, calls, device, fp_inputs)
        # sub-modules whose linears are all solved are recorded once and replayed (capture/replay.py)
        sequential = solver.needs_inputs and cfg.true_sequential
        width = hidden[0].shape[-1]
        frozen = FrozenOutputs(fwd, fwd_groups, len(calls), width, device,
                               keep_on=recordings_on) if reuse_passes and sequential else None
        for k, (todo, fwd_todo) in enumerate(zip(groups, fwd_groups)):
            if not todo:
                continue
            if sequential:
                stats, sinks = _group_stats(solver, fwd_todo, fp_inputs.get(k))
                later = [r for g in block_linears(fwd, spec)[k + 1:] for r in g]
                with collect_group_inputs(fwd, fwd_todo, sinks, later, stop_early=reuse_passes), \
                        frozen.pass_after(k) if frozen else contextlib.nullcontext():
                    feed_block(fwd, hidden, calls, device)
            names = [linear_name(spec, i, ref.name) for ref in todo]
            runs = _stackable(todo, names, stats, grids, grid)
            grids_of = Counter(id(stats.get(todo[run[0]].name)) for run in runs)
            shared: dict[int, dict] = {}              # one statistic on several grids: one GPTQ factorization
            for run in runs:
                st = stats.get(todo[run[0]].name)
                _solve_stacked([todo[j] for j in run], [names[j] for j in run], solver, st,
                               grids.get(names[run[0]], grid), cfg, result,
                               shared.setdefault(id(st), {}) if st is not None and grids_of[id(st)] > 1 else None)
            del shared
            if fwd is not block:
                for ref, fwd_ref in zip(todo, fwd_todo):
                    fwd_ref.set_weight(ref.weight)
        # the quantized block feeds the next one (static input scales: run in full, every linear's input observed)
        kept = [r for g in fwd_groups for r in g]
        observed = InputRange(fwd_groups, grid.fp8, cfg.act_observer, cfg.nvfp4) if cfg.act_static else None
        null = contextlib.nullcontext()
        with frozen.pass_after(len(groups), record=False) if frozen and observed is None else null, \
                tap_inputs(kept, observed.sinks) if observed is not None else null:
            next_hidden = run_block(fwd, hidden, calls, device)
        if observed is not None:
            if cfg.act_observer == "mse":                   # each clip ratio's error, now that the maxima are known
                with tap_inputs(kept, observed.error_sinks):
                    run_block(fwd, hidden, calls, device)
            for name, s in observed.scales().items():
                result.layers[linear_name(spec, i, name)].input_scale = s
        hidden = next_hidden
        if fp_block is not None:                             # GPTAQ per batch: the next block's fp activations
            fp_hidden = run_block(fp_block, fp_hidden, fp_calls, device)
        block.to("cpu")
        fwd = frozen = stats = sinks = fp_inputs = fp_block = None   # the copies, recordings, statistics: freed
        if not all(torch.isfinite(h).all() for h in hidden):
            raise QForgeError(f"block {i} produced non-finite activations after quantization; nothing was saved")
        _block_done(i, block, spec, result, store, weights)
        (log.debug if show_progress else log.info)("block %d/%d quantized in %.2f s", i + 1, len(blocks),
                                                   time.perf_counter() - t_block)      # a bar shows it already


def _restore(i: int, block: nn.Module, store, cfg: QuantizeConfig, result: QuantizeResult) -> None:
    layers, awq, smoothquant = store.restore(i, block)
    result.layers.update(layers)
    if cfg.uses_awq:
        result.awq[i] = awq
    result.smoothquant.update({f"{i}.{k}": s for k, s in smoothquant.items()})


def _block_done(i: int, block: nn.Module, spec: ArchSpec, result: QuantizeResult, store, weights) -> None:
    """Block i is final: saved to `store` (when given), then, streaming, dropped with its layers' values."""
    prefix = f"{spec.blocks}.{i}."
    if store is not None:
        store.save(i, block, {n: q for n, q in result.layers.items() if n.startswith(prefix)}, result.awq.get(i),
                   prefix, spec.experts, {k.split(".", 1)[1]: s for k, s in result.smoothquant.items()
                                          if k.split(".", 1)[0] == str(i)})
    if weights is not None:
        weights.release(block)
        result.layers.update({n: q.on_meta() for n, q in result.layers.items() if n.startswith(prefix)})


def _compute_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The block the passes run: the block itself when its floating parameters are in the compute dtype already
    (an fp32 model's with float32 passes), else a copy in that dtype (an fp16 model's with float32 passes too)."""
    same = all(p.dtype == dtype for p in block.parameters() if p.is_floating_point())
    return block if same else copy.deepcopy(block).to(dtype)


def one_pass_stats(solver: Solver, block: nn.Module, groups: list[list[LinearRef]], hidden, calls, device,
                   fp_inputs: dict | None = None) -> dict:
    """Every group's statistics from one run of the (unquantized) block (`fp_inputs`: fp_group_inputs')."""
    stats, sinks = {}, {}
    for k, refs in enumerate(groups):
        st, sk = _group_stats(solver, refs, (fp_inputs or {}).get(k))
        stats.update(st)
        sinks.update(sk)
    with tap_inputs([r for g in groups for r in g], sinks):
        run_block(block, hidden, calls, device)
    return stats


HOLD_FP_INPUTS = 0.25   # GPTAQ holds a block's fp inputs when they take at most this share of the memory available


class FpGroupInputs:
    """GPTAQ: a group's inputs in the fp model, one [tokens, in] tensor per batch, made as its statistic takes them
    (AsymmetricAccumulator pops them in batch order): the unrounded copy of the block run on the fp model's
    activations of that batch up to the group's first linear, where the run stops. So one batch's are held at a
    time, not a whole block's (for a Llama-8B block over 128 x 2048 tokens, 14 GB in bf16), for a partial run of
    the block per group and batch (BENCHMARKS.md "GPTAQ's fp inputs made per batch": 1.1x the time with wide
    linears, 1.5x on SmolLM2, whose passes cost more than its solves; the same codes)."""

    def __init__(self, block: nn.Module, ref: LinearRef, hidden: list[torch.Tensor], calls, device):
        self.block, self.ref, self.hidden, self.calls, self.device = block, ref, hidden, calls, device
        self.taken = 0

    def __len__(self) -> int:                       # batches not taken yet
        return len(self.hidden) - self.taken

    def pop(self, index: int = 0) -> torch.Tensor:
        if index != 0 or not len(self):
            raise IndexError("fp inputs are taken in batch order, each once")
        b, got = self.taken, []
        self.taken += 1
        with collect_group_inputs(self.block, [self.ref], {self.ref.name: got.append}, [], stop_early=True):
            feed_block(self.block, self.hidden[b:b + 1], self.calls[b:b + 1], self.device)
        return got[0].detach()


def fp_group_inputs(block: nn.Module, groups: list[list[LinearRef]], hidden, calls, device
                    ) -> tuple[dict[int, FpBatches], nn.Module | None, list[torch.Tensor] | None]:
    """GPTAQ: each group's inputs in the fp model, from the unrounded `block` on the fp model's activations `hidden`
    ({group index: one [tokens, in] tensor per batch}; none for fused experts, whose routing differs between the two
    models). Held (one run of the block now, which also gives the next block's fp activations) when they take at
    most HOLD_FP_INPUTS of the memory available where `hidden` is; else made per batch as they are taken
    (FpGroupInputs, on a copy of the block that the caller runs once the block is done for the next block's).
    Returns (inputs, that copy or None, the next block's fp activations or None)."""
    firsts = {k: r for k, g in enumerate(groups) if (r := next((r for r in g if r.expert is None), None))}
    keep = hidden[0].device
    tokens = sum(h[..., 0].numel() for h in hidden)
    nbytes = tokens * sum(r.shape[1] for r in firsts.values()) * hidden[0].element_size()
    if nbytes > HOLD_FP_INPUTS * available_bytes(keep):
        log.info("GPTAQ: the block's fp inputs (%.2f GB) are made batch by batch as they are taken", nbytes / 1e9)
        fp_block = copy.deepcopy(block)
        return ({k: FpGroupInputs(fp_block, LinearRef(r.name, fp_block.get_submodule(r.name)), hidden, calls, device)
                 for k, r in firsts.items()}, fp_block, None)
    inputs: dict[int, list[torch.Tensor]] = {k: [] for k in firsts}
    sinks = {r.name: (lambda x, k=k: inputs[k].append(x.detach().to(keep))) for k, r in firsts.items()}
    with tap_inputs(list(firsts.values()), sinks):
        out = run_block(block, hidden, calls, device)
    return inputs, None, out


def _group_stats(solver: Solver, refs: list[LinearRef], fp_inputs: FpBatches | None = None
                 ) -> tuple[dict, dict]:
    """One statistic for the group's shared input (plain linears; GPTAQ's with `fp_inputs`, the group's inputs in the
    fp model), one per expert (fused experts)."""
    stats, sinks = {}, {}
    shared = None
    for ref in refs:
        if ref.expert is None:
            if shared is None:
                shared = solver.new_stats(ref.shape[1]) if fp_inputs is None else solver.new_stats(ref.shape[1],
                                                                                                     fp_inputs)
                sinks[ref.name] = lambda x, s=shared: solver.add(s, x)
            stats[ref.name] = shared
        else:
            stats[ref.name] = solver.new_stats(ref.shape[1])
            sinks[ref.name] = lambda x, s=stats[ref.name]: solver.add(s, x)
    return stats, sinks
