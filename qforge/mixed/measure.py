"""The measurement pass: for every quantizable linear and every candidate scheme, GPTQ on the layer's
Hessian and the error it leaves, with the scheme's exact storage cost.

Error proxy: the scheme's damage to the residual stream at the block's output, relative to that stream,
    err(s) = gain · tr(ΔW_s H ΔW_sᵀ) / E‖y‖²,   H = 2XᵀX / n,
where tr(ΔW H ΔWᵀ) is (twice) the mean squared error the scheme adds to the layer's own output and
`gain` carries it through the rest of the block: the block is run once per linear with that linear
alone quantized at a reference scheme, and gain = E‖y_q − y‖² / tr(ΔW_ref H ΔW_refᵀ) (first order: a
small output error reaches the block output through a fixed Jacobian, so its energy scales by a
constant). Unlike a layer's *relative* output error, these errors are in one unit for every layer,
so summing them is meaningful: a 1536-wide MLP projection that moves the residual stream counts for
more than a 192-row k_proj whose error attention mostly averages away (ExLlamaV2 likewise judges a
scheme by the error of the residual stream after the sub-layer). Known limitation: on SmolLM2-135M
the allocations this proxy makes are still worse than uniform GPTQ at the same size (BENCHMARKS.md,
"Mixed precision"); it does not yet track perplexity. Each option also keeps `rel_err`, the layer's
own relative output error.

Hessians come from the unquantized model (one pass per block; the next block reads the unquantized
block's output), so every scheme of a layer is judged on the same inputs.

The measurement file is JSON, rewritten atomically after every block; a run that finds a file for
the same model, calibration and candidate set continues after its last finished block.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..capture import capture_block_inputs, run_block
from ..capture.blocks import make_batches
from ..config import QuantizeConfig
from ..errors import QForgeError
from ..models.arch import arch_spec, block_linears, get_blocks
from ..pipeline import GPTQSolver, one_pass_stats  # the statistics the quantize pass collects
from ..solvers import Grid, gptq
from ..utils.progress import progress
from .schemes import candidate_grids, scheme_bits

log = logging.getLogger(__name__)
VERSION = 2


def grid_key(g: Grid) -> str:
    return f"{g.bits}b {'pc' if g.group_size == -1 else f'g{g.group_size}'} {'sym' if g.sym else 'asym'}"


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for W, Ŵ [out, in], H [in, in]."""
    return _trace_form(W - W_hat, H) / max(_trace_form(W, H), 1e-30)


def _trace_form(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ) for D [out, in], H [in, in]."""
    return float(((D @ H) * D).sum())


def reference_grid(grids: list[Grid]) -> Grid:
    """The scheme whose block-level error calibrates a layer's gain: per-channel asymmetric at the middle
    candidate bit width (every width has a per-channel scheme; a mid-size error is well above the float
    noise and still small enough for the first-order argument)."""
    bits = sorted({g.bits for g in grids})
    pc = [g for g in grids if g.group_size == -1 and g.bits == bits[(len(bits) - 1) // 2]]
    return next((g for g in pc if not g.sym), pc[0] if pc else grids[0])


def _mean_sq(ys: list[torch.Tensor], refs: list[torch.Tensor] | None = None) -> float:
    """Mean over tokens of ‖y‖² (or ‖y − ref‖²) for lists of [B, T, hidden] tensors."""
    total, n = 0.0, 0
    for k, y in enumerate(ys):
        d = y.float() - refs[k].float() if refs is not None else y.float()
        total += float(d.pow(2).sum())
        n += d[..., 0].numel()
    return total / max(n, 1)


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def measure_model(model, samples: list[torch.Tensor], out: str | Path, cfg: QuantizeConfig, fmt: str | None = "gptq",
                  bits: tuple[int, ...] | None = None, identity: dict | None = None, device: str = "cpu",
                  batch_size: int = 8, show_progress: bool = True) -> dict:
    """Measure every block linear of `model` (not modified) and write/return the measurement."""
    if not samples:
        raise QForgeError("measurement needs calibration samples")
    out = Path(out)
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    head = {"version": VERSION, "format": fmt, "bits": list(bits) if bits else None, "identity": identity or {},
            "damp": cfg.damp, "act_order": cfg.act_order,
            "proxy": "residual-stream error at the block output: gain * tr(dW H dW^T) / E|y|^2"}
    data = {**head, "n_blocks": len(blocks), "blocks_done": 0, "layers": {}}
    if out.is_file():
        old = json.loads(out.read_text())
        if {k: old.get(k) for k in head} == head and old.get("n_blocks") == len(blocks):
            data = old
            log.info("resuming measurement %s after block %d of %d", out, data["blocks_done"], len(blocks))
        else:
            raise QForgeError(f"{out} holds a measurement of other settings; remove it or choose another path")
    inputs = capture_block_inputs(model, spec, make_batches(samples, batch_size))
    hidden = inputs.hidden
    with torch.no_grad():
        for i, block in enumerate(progress(blocks, desc="measure blocks", enabled=show_progress)):
            block.to(device)
            calls = inputs.for_block(i)
            y = run_block(block, hidden, calls, device)
            if i >= data["blocks_done"]:
                data["layers"].update(_measure_block(block, spec, i, hidden, y, calls, cfg, fmt, bits, device))
                data["blocks_done"] = i + 1
                _write_atomic(out, data)
            hidden = y
            block.to("cpu")
    return data


def _measure_block(block, spec, i: int, hidden, y, calls, cfg: QuantizeConfig, fmt, bits, device) -> dict:
    """Every option of every linear of block `i`, whose inputs are `hidden` and fp outputs `y`."""
    groups = block_linears(block, spec)
    stats = one_pass_stats(GPTQSolver(device), block, groups, hidden, calls, device)
    y_energy = _mean_sq(y)
    layers = {}
    for g in groups:
        for ref in g:
            W, H = ref.weight.detach().float().to(device), stats[ref.name].H
            grids = candidate_grids(W.shape[1], fmt, bits)
            ref_grid, abs_err, options = reference_grid(grids), {}, []
            w_energy = max(_trace_form(W, H), 1e-30)                  # tr(W H Wᵀ), the rel_err denominator
            for grid in grids:
                W_hat = gptq(W, H, grid, damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
                             static_groups=cfg.static_groups).dequantize().to(W.device)
                abs_err[grid] = _trace_form(W - W_hat, H)
                if grid == ref_grid:
                    gain = _gain(block, ref, W_hat, abs_err[grid], hidden, y, calls, device)
                options.append({"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym,
                                "stored_bits": scheme_bits(tuple(W.shape), grid, fmt, cfg.act_order),
                                "rel_err": abs_err[grid] / w_energy})
            for o, grid in zip(options, grids):
                o["err"] = gain * abs_err[grid] / max(y_energy, 1e-30)
            layers[f"{spec.blocks}.{i}.{ref.name}"] = {"shape": list(W.shape), "gain": gain, "options": options}
    return layers


def _gain(block, ref, W_hat: torch.Tensor, layer_err: float, hidden, y, calls, device) -> float:
    """E‖y_q − y‖² / tr(ΔW H ΔWᵀ) with only `ref` set to W_hat (restored afterwards)."""
    if layer_err <= 1e-30:                 # nothing to carry (dead inputs or an exact grid): any gain will do
        return 1.0
    W = ref.weight.detach().clone()
    try:
        ref.set_weight(W_hat)
        y_q = run_block(block, hidden, calls, device)
    finally:
        ref.set_weight(W)
    return _mean_sq(y_q, y) / layer_err
