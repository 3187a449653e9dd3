"""Greedy decoding speed with a static KV cache, optionally replayed as one CUDA graph per token.

At batch 1 a decode step is a few hundred small kernels; launched from Python, the GPU waits on the
launches and a faster matmul hardly shows. Captured once as a CUDA graph and replayed, a step costs
what its kernels cost, which is what a serving engine sees. The step is the model's own forward on a
transformers StaticCache (fixed shapes, so a capture replays for every position).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeResult:
    tokens: torch.Tensor        # [steps + 1] the greedy continuation: the prefill's token, then the steps'
    seconds: float              # wall time of the `steps` decode steps (prefill and warm-up excluded)
    cuda_graph: bool

    @property
    def tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.seconds


def greedy_decode(model, prompt: torch.Tensor, steps: int, cuda_graph: bool = False, warmup: int = 2) -> DecodeResult:
    """Greedy-decode after `prompt` [1, P] with a static cache on the model's device: the prefill's token,
    then `steps` timed decode steps."""
    from transformers import StaticCache

    if prompt.dim() != 2 or prompt.shape[0] != 1 or steps < 1:
        raise ValueError("greedy_decode takes a [1, P] prompt and steps >= 1")
    if cuda_graph and prompt.device.type != "cuda":
        raise ValueError("a CUDA graph needs the model and prompt on a CUDA device")
    P, device = prompt.shape[1], prompt.device
    ids = torch.empty(1, 1, dtype=torch.long, device=device)
    pos = torch.empty(1, dtype=torch.long, device=device)

    def prefill() -> tuple[StaticCache, torch.Tensor]:
        cache = StaticCache(config=model.config, max_cache_len=P + steps + 1)
        logits = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(P, device=device),
                       use_cache=True).logits
        return cache, logits[0, -1].argmax()

    def step(cache) -> torch.Tensor:         # the cache writes at its own counter; pos feeds rope and the mask
        logits = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        return logits[0, -1].argmax()

    with torch.no_grad():
        scratch, first = prefill()           # warm-up on a throwaway cache: kernels compiled and tuned
        ids.fill_(first)
        side = torch.cuda.Stream() if cuda_graph else None
        if side is not None:                 # a capture wants its warm-up on a side stream
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for i in range(warmup):
                pos.fill_(P + i)
                step(scratch)
        del scratch
        cache, first = prefill()
        if cuda_graph:                       # captured, not run: the cache's counter stays at P until replays
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            pos.fill_(P)
            with torch.cuda.graph(graph):
                next_tok = step(cache)

            def run() -> torch.Tensor:
                graph.replay()
                return next_tok
        else:
            run = functools.partial(step, cache)
        ids.fill_(first)
        out = torch.empty(steps + 1, dtype=torch.long, device=prompt.device)
        out[0] = first
        if prompt.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):               # step i writes token i's KV at P + i and predicts token i + 1
            pos.fill_(P + i)
            out[i + 1] = run()
            ids.copy_(out[i + 1].view(1, 1))
        if prompt.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return DecodeResult(out.cpu(), seconds, cuda_graph)
