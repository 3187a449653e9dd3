"""The measurement pass: for every quantizable linear and every candidate scheme, GPTQ on the layer's
Hessian and the error it leaves, with the scheme's exact storage cost.

Error proxy: the relative output error on the calibration inputs,
    err = ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),   H = 2XᵀX / n,
computed from H alone. Hessians come from the unquantized model (one pass per block; the next block
reads the unquantized block's output), so every scheme of a layer is judged on the same inputs.

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
from ..capture.linear_inputs import tap_inputs
from ..config import QuantizeConfig
from ..errors import QForgeError
from ..models.arch import arch_spec, block_linears, get_blocks
from ..pipeline import GPTQSolver, _group_stats  # the statistics the quantize pass collects
from ..solvers import Grid, gptq
from ..utils.progress import progress
from .schemes import candidate_grids, scheme_bits

log = logging.getLogger(__name__)
VERSION = 1


def grid_key(g: Grid) -> str:
    return f"{g.bits}b {'pc' if g.group_size == -1 else f'g{g.group_size}'} {'sym' if g.sym else 'asym'}"


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for W, Ŵ [out, in], H [in, in]."""
    D = W - W_hat
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-30))


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
            "proxy": "relative output error tr(dW H dW^T) / tr(W H W^T) on the calibration inputs"}
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
            if i >= data["blocks_done"]:
                data["layers"].update(_measure_block(block, spec, i, hidden, calls, cfg, fmt, bits, device))
                data["blocks_done"] = i + 1
                _write_atomic(out, data)
            hidden = run_block(block, hidden, calls, device)
            block.to("cpu")
    return data


def _measure_block(block, spec, i: int, hidden, calls, cfg: QuantizeConfig, fmt, bits, device) -> dict:
    solver = GPTQSolver(device)
    groups = block_linears(block, spec)
    stats, sinks = {}, {}
    for g in groups:
        st, sk = _group_stats(solver, g)
        stats.update(st)
        sinks.update(sk)
    with tap_inputs([r for g in groups for r in g], sinks):
        run_block(block, hidden, calls, device)
    layers = {}
    for g in groups:
        for ref in g:
            W, H = ref.weight.detach().float().to(device), stats[ref.name].H
            options = []
            for grid in candidate_grids(W.shape[1], fmt, bits):
                q = gptq(W, H, grid, damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order,
                         static_groups=cfg.static_groups)
                options.append({"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym,
                                "stored_bits": scheme_bits(tuple(W.shape), grid, fmt, cfg.act_order),
                                "err": output_error(W, q.dequantize().to(W.device), H)})
            layers[f"{spec.blocks}.{i}.{ref.name}"] = {"shape": list(W.shape), "options": options}
    return layers
