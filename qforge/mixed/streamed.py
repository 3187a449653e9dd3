"""The measurement of a model larger than RAM (a skeleton from models/streaming.py): measure.py's numbers, with
one decoder block in memory at a time.

A probe of a linear in block i is the model run from block i on, with that linear alone quantized. Streamed,
the probes of a *span* of blocks share sweeps over the model: a sweep reads each block from the span's first
to the model's last once. A block of the span is measured as in memory (Hessians from its fp calibration
inputs, GPTQ at every scheme) and, for every probe scheme of every linear, its output on the probe samples
with that linear quantized is kept: a *variant*. Every block read after the one that made a variant runs it
on; the head (eval/streamed.head_pass) turns the last block's variants into KL against the fp model's
next-token distribution. A span is as many blocks as `probe_memory` holds variants of (each: probe tokens x
hidden x 4 bytes): a model of n blocks is read about n/2 x (number of spans) times, the compute is the
in-memory pass's. The measurement is written after each span; a resumed run first walks the fp model to the
first block still to measure.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..capture.blocks import capture_block_inputs, make_batches, run_block
from ..models.arch import block_linears, get_blocks
from ..eval.streamed import head_pass
from ..utils.progress import progress
from .measure import finish_layer, measure_block, probe_grids
from .probe import kept_positions, mean_kl, sequence_kls
from .schemes import candidate_grids

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _loaded(weights, i: int, block, device):
    weights.load(i, block)
    block.to(device)
    try:
        yield block
    finally:
        weights.release(block)


def span_end(variants_per_block: list[int], start: int, variant_bytes: int, probe_memory: int) -> int:
    """The end (exclusive) of the span from `start`: as many blocks as `probe_memory` holds variants of (1 or more)."""
    end, held = start + 1, variants_per_block[start] * variant_bytes
    while end < len(variants_per_block) and held + variants_per_block[end] * variant_bytes <= probe_memory:
        held += variants_per_block[end] * variant_bytes
        end += 1
    return end


@torch.no_grad()
def measure_streamed(model, weights, spec, samples, data: dict, write, cfg, fmt, bits, device, batch_size: int,
                     show_progress: bool, probe_samples: int, probe_memory: int) -> None:
    """Measure the blocks from data["blocks_done"] on into `data`, calling write(data) after each span."""
    blocks = get_blocks(model, spec)
    n, start = len(blocks), data["blocks_done"]
    batches = make_batches(samples, batch_size)
    probe_batches = make_batches(samples[:max(1, probe_samples)], batch_size)
    with weights.outside(model, without="head"):
        calib, probe_in = (capture_block_inputs(model, spec, b) for b in (batches, probe_batches))
    hidden, probe_hidden = calib.hidden, probe_in.hidden
    variants_per_block = [sum(len(probe_grids(candidate_grids(ref.shape[1], fmt, bits))) for g in block_linears(b, spec)
                              for ref in g) for b in blocks]
    variant_bytes = sum(h.numel() * h.element_size() for h in probe_hidden)
    for i in progress(range(start), desc="fp blocks (resume)", enabled=show_progress and start > 0):
        with _loaded(weights, i, blocks[i], device) as block:     # the fp inputs of the first block still to measure
            hidden = run_block(block, hidden, calib.for_block(i), device)
            probe_hidden = run_block(block, probe_hidden, probe_in.for_block(i), device)
    keep, ref = kept_positions(probe_batches), None      # ref: the fp model's log-probs, from the first sweep
    bar = progress(range(start, n), desc="measure blocks", enabled=show_progress)
    ticks = iter(bar)
    while start < n:
        end = span_end(variants_per_block, start, variant_bytes, probe_memory)
        log.info("measuring blocks %d-%d: %d probe variants, %.2f GB; the sweep reads blocks %d-%d", start, end - 1,
                 sum(variants_per_block[start:end]), sum(variants_per_block[start:end]) * variant_bytes / 1e9, start,
                 n - 1)
        variants: list[list[torch.Tensor]] = []
        records: dict = {}
        for j in range(start, n):
            with _loaded(weights, j, blocks[j], device) as block:
                calls = probe_in.for_block(j)
                for k, v in enumerate(variants):                  # the earlier blocks' variants, one at a time
                    variants[k] = run_block(block, v, calls, device)
                if j < end:
                    def probe(block=block, calls=calls, x=probe_hidden) -> int:
                        variants.append(run_block(block, x, calls, device))
                        return len(variants) - 1
                    records.update(measure_block(block, spec, j, hidden, calib.for_block(j), cfg, fmt, bits, device,
                                                 probe))
                    next(ticks, None)
                    probe_hidden = run_block(block, probe_hidden, calls, device)
                    if j + 1 < n:
                        hidden = run_block(block, hidden, calib.for_block(j), device)
                    fp_out = probe_hidden
                elif ref is None:
                    fp_out = run_block(block, fp_out, calls, device)
        with head_pass(model, weights, keep) as logits_of:
            def logp(ids, h):
                return torch.log_softmax(logits_of(ids, h.cpu()).float(), -1)
            if ref is None:
                ref = [logp(ids, h) for ids, h in zip(probe_batches, fp_out)]
            kls = [mean_kl([k for ids, r, h in zip(probe_batches, ref, v) for k in sequence_kls(r, logp(ids, h))])
                   for v in variants]
        del variants
        data["layers"].update({name: finish_layer(r, kls.__getitem__) for name, r in records.items()})
        data["blocks_done"] = end
        write(data)
        start = end
