"""End-to-end probes of a model larger than RAM (a skeleton from models/streaming.py): the measurement's and
the verification's numbers, with one decoder block in memory at a time.

A probe of block i changes something in it (one linear quantized: measure.py; all of them: verify.py) and runs
the model from block i on. Streamed, the probes of a *span* of blocks share one sweep over the model, which
reads each block from the span's first to the model's last once. Each block of the span is visited as in
memory (its fp calibration inputs give the Hessians), and each probe keeps the changed block's output on the
probe samples: a *variant*. Every block read after the one that made a variant runs it on; the head
(eval/streamed.head_pass) turns the last block's variants into per-sequence KLs against the fp model's
next-token distribution. A span is as many blocks as `probe_memory` holds variants of (probe tokens x hidden x
4 bytes each), so a model of n blocks is read about n/2 times per span; the compute is the in-memory pass's.
Results are handed over after each span (measure.py writes its file then); the sweeps start with a walk of
the fp model to the first block to visit (a resumed measurement's, or the first block a verification checks).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..capture.blocks import capture_block_inputs, carried_copies, run_block, with_carried
from ..eval.streamed import head_pass
from ..models.arch import arch_spec, get_blocks
from ..utils.progress import progress
from .probe import kept_positions, sequence_kls

log = logging.getLogger(__name__)


def span_end(variants_per_block: list[int], start: int, variant_bytes: int, probe_memory: int) -> int:
    """The end (exclusive) of the span from `start`: as many blocks as `probe_memory` holds variants of (1 or more)."""
    end, held = start + 1, variants_per_block[start] * variant_bytes
    while end < len(variants_per_block) and held + variants_per_block[end] * variant_bytes <= probe_memory:
        held += variants_per_block[end] * variant_bytes
        end += 1
    return end


@torch.no_grad()
def sweep_probes(model, weights, batches: list[torch.Tensor], probe_batches: list[torch.Tensor], todo: list[int],
                 variants_of: Callable[[int], int], visit, span_done, device, probe_memory: int,
                 show_progress: bool = False, desc: str = "probe blocks") -> None:
    """Visit the blocks in `todo` (ascending) as the module says. visit(i, block, hidden, calls, probe) gets block i
    loaded, the fp inputs of the calibration `batches` and their call arguments, and probe(), which runs the block
    as it is at that moment on the fp inputs of `probe_batches` and returns the variant's handle; it returns a
    record and must leave the block as it found it. visit calls probe() at most variants_of(i) times.
    span_done(records, kls) is called after each span with {i: record} and each handle's KL per probe sequence."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    n = len(blocks)
    with weights.outside(model, without="head"):
        calib, probe_in = (capture_block_inputs(model, spec, b) for b in (batches, probe_batches))
    hidden, probe_hidden = calib.hidden, probe_in.hidden
    variant_bytes = sum(h.numel() * h.element_size() for h in probe_hidden)
    for i in progress(range(todo[0]), desc="fp blocks", enabled=show_progress and todo[0] > 0):
        with weights.loaded(i, blocks[i], device) as block:        # to the first block to visit
            hidden = run_block(block, hidden, calib.for_block(i), device)
            probe_hidden = run_block(block, probe_hidden, probe_in.for_block(i), device)
    keep, ref = kept_positions(probe_batches), None       # ref: the fp model's log-probs, from the first sweep
    ticks = iter(progress(todo, desc=desc, enabled=show_progress))
    counts = [variants_of(i) for i in todo]
    s = 0
    while s < len(todo):
        e = span_end(counts, s, variant_bytes, probe_memory)
        span, following = set(todo[s:e]), todo[e] if e < len(todo) else n     # the next span's first block
        calib_until = following if e < len(todo) else todo[e - 1]     # calibration inputs: to the last block visited
        log.info("probing blocks %d-%d: %d variants, %.2f GB; the sweep reads blocks %d-%d", todo[s], todo[e - 1],
                 sum(counts[s:e]), sum(counts[s:e]) * variant_bytes / 1e9, todo[s], n - 1)
        variants: list[list[torch.Tensor]] = []
        states: list[list | None] = []              # per variant: its own carried mappings, one per probe batch
        records = {}
        for j in range(todo[s], n):
            with weights.loaded(j, blocks[j], device) as block:
                calls = probe_in.for_block(j)
                for k, v in enumerate(variants):                  # the earlier blocks' variants, one at a time
                    variants[k] = run_block(block, v, with_carried(calls, spec.carried, states[k]), device)
                if j in span:
                    def probe(block=block, calls=calls, x=probe_hidden) -> int:
                        # a copy of the fp state the blocks before this one left
                        state = carried_copies(calls, spec.carried)
                        variants.append(run_block(block, x, with_carried(calls, spec.carried, state), device))
                        states.append(state)
                        return len(variants) - 1
                    records[j] = visit(j, block, hidden, calib.for_block(j), probe)
                    next(ticks, None)
                if j < following:                # the fp probe inputs, to the next span (or, last, the output)
                    probe_hidden = fp_out = run_block(block, probe_hidden, calls, device)
                elif ref is None:
                    fp_out = run_block(block, fp_out, calls, device)
                if j < calib_until:
                    hidden = run_block(block, hidden, calib.for_block(j), device)
        with head_pass(model, weights, keep) as logits_of:
            def logp(ids, h):
                return torch.log_softmax(logits_of(ids, h.cpu()).float(), -1)
            if ref is None:
                ref = [logp(ids, h) for ids, h in zip(probe_batches, fp_out)]
            kls = [[k for ids, r, h in zip(probe_batches, ref, v) for k in sequence_kls(r, logp(ids, h))]
                   for v in variants]
        del variants, states
        span_done(records, kls)
        s = e
