"""Token NLLs of a model larger than RAM (a skeleton from models/streaming.py): every window goes through one
decoder block at a time, each block read once, as the GPTQ paper's own evaluation does.

1. the weights outside the blocks in memory: the windows' inputs to block 0 (and each block's call
   arguments: masks, rotary tables) are captured without running a block (capture/blocks.py);
2. block i read, run on every window's hidden states, dropped;
3. the outside weights again: the model's own forward with its blocks swapped for stand-ins that return the
   last block's outputs, so its final norm, head and any logit soft-capping run as they always do.
Memory holds one block and the windows' hidden states (windows x seqlen x hidden x 4 bytes, twice), or one of
the embeddings and the head: the capture reads no head, the head pass no embeddings (a stand-in makes zeros
that the blocks' stand-ins ignore), so a 70B vocabulary costs 4.2 GB in fp32 instead of 8.4 (unless tied). The
blocks run on `device`; the embeddings and the head run on the CPU, where the skeleton keeps its buffers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

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


class _NoEmbedding(nn.Module):
    """The input embeddings' place in the head pass: zeros of their output's shape and dtype, never read. `weight`
    is a zero view of the table's shape, no memory (Gemma 4's vision-language forward reads the pad token's row)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.rows, self.dim, self.dtype = embeddings.num_embeddings, embeddings.embedding_dim, embeddings.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.dtype).expand(self.rows, self.dim)

    def forward(self, input_ids, *args, **kwargs):
        return torch.zeros(*input_ids.shape, self.dim, dtype=self.dtype, device=input_ids.device)


@contextlib.contextmanager
def _input_embeddings(model, module: nn.Module):
    real = model.get_input_embeddings()
    model.set_input_embeddings(module)
    try:
        yield
    finally:
        model.set_input_embeddings(real)


@torch.no_grad()
def streamed_token_nll(model, weights, windows: torch.Tensor, device="cpu", batch_size: int = 1,
                       desc: str = "eval", show_progress: bool = True, make_cache=None) -> torch.Tensor:
    """NLL (fp64) of positions 1..T-1 of each window -> [n_windows, T-1], as perplexity.token_nll computes it.
    `weights`: the skeleton's models.streaming.BlockLoader. `make_cache`: each batch's KV cache maker (an FP8 cache
    with the model's scales, simulate.kv_cache_factory(..., keep=False): its blocks run one at a time, so the cache
    goes with their captured calls and keeps nothing)."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    batches = list(windows.split(batch_size))
    with weights.outside(model, without="head"):
        inputs = capture_block_inputs(model, spec, batches, [make_cache() for _ in batches] if make_cache else None)
    hidden = inputs.hidden
    for i, block in enumerate(progress(blocks, desc=f"{desc} (blocks)", enabled=show_progress)):
        with weights.loaded(i, block, device):
            hidden = run_block(block, hidden, inputs.for_block(i), device)
    out = []
    with head_pass(model, weights) as logits_of:
        for x, h in zip(batches, hidden):
            logits = logits_of(x, h).float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="none")
            out.append(nll.view(len(x), -1).double())
    return torch.cat(out)


@contextlib.contextmanager
def head_pass(model, weights, keep: torch.Tensor | None = None):
    """Inside: `logits_of(ids, h)`, the model's logits for `ids` [B, T] whose last block returned `h` [B, T, hidden]:
    its own forward, the blocks swapped for stand-ins that hand `h` over, so its final norm, head and any logit
    soft-capping run as they always do; the head reads only positions `keep` when given. The weights outside the
    blocks, but the input embeddings, are in memory while inside (`weights`: a models.streaming.BlockLoader)."""
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    given = _Given(blocks[0])
    stand_ins = [given] + [_PassThrough(b) for b in blocks[1:]]

    def logits_of(ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        given.value = h
        return model(input_ids=ids, use_cache=False).logits

    with (weights.outside(model, without="embeddings"), swapped_blocks(model, spec, stand_ins),
          _input_embeddings(model, _NoEmbedding(model.get_input_embeddings()))):
        head = model.get_output_embeddings()
        hook = None if keep is None else head.register_forward_pre_hook(lambda m, args: (args[0][:, keep],) + args[1:])
        try:
            yield logits_of
        finally:
            if hook is not None:
                hook.remove()
