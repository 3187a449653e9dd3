"""Token NLLs of a model larger than RAM (a skeleton from models/streaming.py): every window goes through one
decoder block at a time, each block read once, as the GPTQ paper's own evaluation does.

1. the weights outside the blocks in memory: the windows' inputs to block 0 (and each block's call
   arguments: masks, rotary tables) are captured without running a block (capture/blocks.py);
2. block i read, run on every window's hidden states, dropped;
3. the outside weights again: the model's own forward with its blocks swapped for stand-ins that return the
   last block's outputs, so its final norm, head and any logit soft-capping run as they always do.
Memory holds one block and the windows' hidden states (windows x seqlen x hidden x 4 bytes, twice). The blocks
run on `device`; the embeddings and the head run on the CPU, where the skeleton keeps its buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capture.blocks import StandIn, capture_block_inputs, run_block, swapped_blocks
from ..models.arch import arch_spec, get_blocks
from ..utils.progress import progress


class _Given(StandIn):
    """Returns `value` whatever it is given: the first block's place, holding the last block's output."""

    value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


class _PassThrough(StandIn):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def streamed_token_nll(model, weights, windows: torch.Tensor, device="cpu", batch_size: int = 1,
                       desc: str = "eval", show_progress: bool = True) -> torch.Tensor:
    """NLL (fp64) of positions 1..T-1 of each window -> [n_windows, T-1], as perplexity.token_nll computes it.
    `weights`: the skeleton's models.streaming.BlockLoader."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    batches = list(windows.split(batch_size))
    with weights.outside(model):
        inputs = capture_block_inputs(model, spec, batches)
    hidden = inputs.hidden
    for i, block in enumerate(progress(blocks, desc=f"{desc} (blocks)", enabled=show_progress)):
        weights.load(i, block)
        block.to(device)
        hidden = run_block(block, hidden, inputs.for_block(i), device)
        block.to("cpu")
        weights.release(block)
    given = _Given(blocks[0])
    out = []
    with weights.outside(model), swapped_blocks(model, spec, [given] + [_PassThrough(b) for b in blocks[1:]]):
        for x, h in zip(batches, hidden):
            given.value = h
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="none")
            out.append(nll.view(len(x), -1).double())
    return torch.cat(out)
