"""The measurement pass: for every quantizable linear and every candidate scheme, GPTQ on the layer's
Hessian, the error it leaves, and the scheme's exact storage cost.

Error: the mean KL divergence of the model's next-token distribution from the fp model's when that
linear alone is quantized with the scheme, in nats per token (what perplexity and llama.cpp's KLD see).
It is measured end to end, not guessed from the layer: for each linear, GPTQ at a few *probe*
schemes (the finest group of every candidate width up to 4 bits), and for each probe one run of the
model from that block on (mixed/probe.py). Every other scheme's KL is read off the probes by its
layer-level error e(s) = tr(ΔW_s H ΔW_sᵀ) (H = 2XᵀX/n): log KL is interpolated piecewise-linearly
in log e between the probes (for small errors KL ∝ e, both quadratic in ΔW; 2-bit errors need not
stay in that regime, which is why every width gets its own probe). Summing per-layer KLs assumes their effects
add; whether the summed estimate ranks real quantized models well is still to be shown (BENCHMARKS.md,
"Mixed precision").

Earlier proxies (withdrawn: their allocations lost to uniform quantization): a layer's relative output
error (version 1), and a first-order residual-stream error at the block output (version 2).

Hessians come from the unquantized model (one pass per block; the next block reads the unquantized
block's output), so every scheme of a layer is judged on the same inputs. The probes run the
remaining blocks, so this pass needs the whole model resident; mixed/streamed.py measures a model larger than
RAM to the same numbers. The probes use the first `probe_samples` calibration samples.

The measurement file is JSON, rewritten atomically after every block; a run that finds a file for
the same model, calibration and candidate set continues after its last finished block.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..capture.blocks import make_batches, walk_fp_blocks
from ..config import QuantizeConfig
from ..errors import QForgeError
from ..utils.atomic import atomic_write_text
from ..models.arch import arch_spec, block_linears, get_blocks, linear_name, named_block_linears
from ..pipeline import GPTQSolver, gptq_options, one_pass_stats  # the statistics and solve the quantize pass uses
from ..solvers import Grid, gptq
from ..utils.progress import progress
from .probe import TailProbe, interpolate_loglog, mean_kl
from .schemes import candidate_grids, scheme_bits

log = logging.getLogger(__name__)
VERSION = 3
PROBE_MEMORY = 4 << 30       # streamed: bytes of probe activations kept at once (mixed/streamed.py)


def grid_key(g: Grid) -> str:
    return f"{g.bits}b {'pc' if g.group_size == -1 else f'g{g.group_size}'} {'sym' if g.sym else 'asym'}"


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for W, Ŵ [out, in], H [in, in]."""
    return _trace_form(W - W_hat, H) / max(_trace_form(W, H), 1e-30)


def _trace_form(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ) for D [out, in], H [in, in]."""
    return float(((D @ H) * D).sum())


def solver_settings(cfg: QuantizeConfig) -> dict:
    """The GPTQ settings a measurement's errors depend on, as its file records them (flags absent when off,
    so files from before a flag existed still match and resume)."""
    return {"damp": cfg.damp, "act_order": cfg.act_order,
            **({"act_group_aware": True} if cfg.act_group_aware else {}),
            **({"scale_search": True} if cfg.scale_search else {}),
            **({"rotation": cfg.rotation_key} if cfg.rotation else {})}


def settings_mismatch(measurement: dict, cfg: QuantizeConfig) -> list[str]:
    """Names of the solver settings in which `measurement` differs from `cfg`."""
    want = solver_settings(cfg)
    return [k for k in ("damp", "act_order", "act_group_aware", "scale_search", "rotation")
            if measurement.get(k, False) != want.get(k, False)]


def probe_grids(grids: list[Grid]) -> list[Grid]:
    """The schemes measured end to end: for every candidate width up to 4 bits (the lowest width if none),
    its finest asymmetric group — the range where layers differ; wider schemes are extrapolated."""
    widths = sorted({g.bits for g in grids})
    widths = [b for b in widths if b <= 4] or widths[:1]
    out = []
    for b in widths:
        same = [g for g in grids if g.bits == b]
        finest = min(same, key=lambda g: (g.group_size if g.group_size > 0 else 1 << 30, g.sym))
        out.append(finest)
    return out


def _write_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def measure_model(model, samples: list[torch.Tensor], out: str | Path, cfg: QuantizeConfig, fmt: str | None = "gptq",
                  bits: tuple[int, ...] | None = None, identity: dict | None = None, device: str = "cpu",
                  batch_size: int = 8, show_progress: bool = True, probe_samples: int = 4, weights=None,
                  probe_memory: int = PROBE_MEMORY) -> dict:
    """Measure every block linear of `model` (left as it was) and write/return the measurement.
    `weights` (a models.streaming.BlockLoader of a skeleton model) streams it: one block in memory at a time,
    the probes' perturbed activations up to `probe_memory` bytes (mixed/streamed.py); the numbers are the
    in-memory pass's, and either pass resumes the other's file."""
    if not samples:
        raise QForgeError("measurement needs calibration samples")
    out = Path(out)
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    head = {"version": VERSION, "format": fmt, "bits": list(bits) if bits else None, "identity": identity or {},
            **solver_settings(cfg), "probe_samples": probe_samples,
            "error": "mean KL(P_fp || P) per token with the linear alone quantized (nats), probes at the finest "
                     "group per width <= 4 bits, other schemes interpolated in log-log over tr(dW H dW^T)"}
    data = {**head, "n_blocks": len(blocks), "blocks_done": 0, "layers": {}}
    if out.is_file():
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            raise QForgeError(f"cannot read measurement {out} to resume it ({e}); remove it or choose another "
                              f"path") from e
        if not isinstance(old, dict):
            raise QForgeError(f"{out} is not a qforge measurement; remove it or choose another path")
        if {k: old.get(k) for k in head} == head and old.get("n_blocks") == len(blocks):
            data = old
            log.info("resuming measurement %s after block %d of %d", out, data["blocks_done"], len(blocks))
        else:
            raise QForgeError(f"{out} holds a measurement of other settings; remove it or choose another path")
    if data["blocks_done"] == len(blocks):
        return data
    splits = stored_splits(model, spec, fmt)
    if weights is not None:
        _measure_streamed(model, weights, spec, samples, data, out, cfg, fmt, bits, device, batch_size, show_progress,
                          probe_samples, probe_memory, splits)
        return data
    home = next(model.parameters()).device
    model.to(device)                        # the probes run every block after the measured one
    try:
        _measure_blocks(model, spec, blocks, samples, data, out, cfg, fmt, bits, device, batch_size, show_progress,
                        probe_samples, splits)
    finally:
        model.to(home)
    return data


def stored_splits(model, spec, fmt: str | None) -> dict[str, tuple[int, ...]]:
    """{linear: row counts} of the linears a packed `fmt` export stores as several modules (a fused expert's gate/up
    as its checkpoints' gate and up); none for qforge's own storage (fmt None), which keeps them whole."""
    if fmt is None:
        return {}
    from ..models.checkpoint_keys import row_splits

    return row_splits(model, list(named_block_linears(model, spec)))


def _measure_blocks(model, spec, blocks, samples, data: dict, out: Path, cfg: QuantizeConfig, fmt, bits, device,
                    batch_size: int, show_progress: bool, probe_samples: int, splits: dict) -> None:
    """Measure the blocks from data["blocks_done"] on, writing `out` after each."""
    batches = make_batches(samples, batch_size)
    probe_batches = make_batches(samples[:max(1, probe_samples)], batch_size)
    probe = TailProbe(model, spec, probe_batches)
    walk = walk_fp_blocks(model, spec, [batches, probe_batches], len(blocks) - 1, device)
    with torch.no_grad():
        for i, block, ((hidden, calls), (probe_hidden, _)) in progress(walk, total=len(blocks), desc="measure blocks",
                                                                       enabled=show_progress):
            if i >= data["blocks_done"]:
                records = measure_block(block, spec, i, hidden, calls, cfg, fmt, bits, device,
                                        lambda: probe.kl(i, probe_hidden), splits)
                data["layers"].update({name: finish_layer(r) for name, r in records.items()})
                data["blocks_done"] = i + 1
                _write_atomic(out, data)


def _measure_streamed(model, weights, spec, samples, data: dict, out: Path, cfg: QuantizeConfig, fmt, bits, device,
                      batch_size: int, show_progress: bool, probe_samples: int, probe_memory: int,
                      splits: dict) -> None:
    """_measure_blocks for a skeleton model: mixed/streamed.py's sweeps, the file written after each span."""
    from .streamed import sweep_probes

    blocks = get_blocks(model, spec)
    probes = [sum(len(probe_grids(candidate_grids(r.shape[1], fmt, bits))) for g in block_linears(b, spec) for r in g)
              for b in blocks]

    def visit(i, block, hidden, calls, probe):
        return measure_block(block, spec, i, hidden, calls, cfg, fmt, bits, device, probe, splits)

    def span_done(records: dict, kls: list[list[float]]) -> None:
        for recs in records.values():
            data["layers"].update({name: finish_layer(r, lambda h: mean_kl(kls[h])) for name, r in recs.items()})
        data["blocks_done"] = max(records) + 1
        _write_atomic(out, data)

    sweep_probes(model, weights, make_batches(samples, batch_size), make_batches(samples[:max(1, probe_samples)],
                 batch_size), list(range(data["blocks_done"], len(blocks))), probes.__getitem__, visit, span_done,
                 device, probe_memory, show_progress, desc="measure blocks")


def measure_block(block, spec, i: int, hidden, calls, cfg: QuantizeConfig, fmt, bits, device, probe,
                  splits: dict | None = None) -> dict:
    """Every option of every linear of block `i`, whose inputs are `hidden`, as records for `finish_layer`:
    probe() is called with each probe scheme's Ŵ in the linear (the block otherwise unquantized) and returns
    the KL, or a handle that finish_layer's `kl_of` turns into it once known (streamed: mixed/streamed.py).
    `splits`: {linear: row counts} of the linears `fmt` stores as several modules (stored_splits)."""
    groups = block_linears(block, spec)
    stats = one_pass_stats(GPTQSolver(device), block, groups, hidden, calls, device)
    records = {}
    factors_of: dict[int, dict] = {}          # one factorization per H: a group's shared one, or an expert's own
    for g in groups:
        for ref in g:
            factors = factors_of.setdefault(id(stats[ref.name]), {})
            original = ref.weight.detach().clone()                    # a copy: probes write into the weight
            W, H = original.float().to(device), stats[ref.name].H
            grids = candidate_grids(W.shape[1], fmt, bits)
            probes, abs_err, probed = probe_grids(grids), {}, {}
            for grid in grids:
                W_hat = gptq(W, H, grid, **gptq_options(cfg, device), factors=factors).dequantize().to(W.device)
                abs_err[grid] = _trace_form(W - W_hat, H)
                if grid in probes:
                    try:
                        ref.set_weight(W_hat)
                        probed[grid] = probe()
                    finally:
                        ref.set_weight(original)
            name = linear_name(spec, i, ref.name)
            rows = (splits or {}).get(name)
            records[name] = {
                "shape": list(W.shape), "w_energy": max(_trace_form(W, H), 1e-30),   # tr(W H Wᵀ), rel_err's base
                "abs_err": abs_err, "probed": probed, **({"stored_rows": list(rows)} if rows else {}),
                "stored_bits": {grid: scheme_bits(tuple(W.shape), grid, fmt, cfg.act_order, rows) for grid in grids}}
    return records


def finish_layer(record: dict, kl_of=float) -> dict:
    """A linear's entry in the measurement from measure_block's record; `kl_of` maps a probe's result to its KL."""
    kl = {grid: kl_of(h) for grid, h in record["probed"].items()}
    points = [(record["abs_err"][p], kl[p]) for p in kl]
    return {"shape": record["shape"], **{k: record[k] for k in ("stored_rows",) if k in record},
            "options": [{"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym,
                         "stored_bits": record["stored_bits"][grid], "rel_err": e / record["w_energy"],
                         "err": kl[grid] if grid in kl else interpolate_loglog(e, points), "probed": grid in kl}
                        for grid, e in record["abs_err"].items()]}
