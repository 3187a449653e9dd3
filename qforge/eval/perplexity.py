"""Perplexity by the shared protocol (shared/README.md §1, as in the GPTQ paper):

tokenize the whole text without special tokens; cut the stream into non-overlapping windows of
`seqlen` tokens, dropping the remainder (and keeping the first `max_windows`); run every window on
its own; ppl = exp(mean NLL over positions 1..seqlen-1 of every window).

Perplexity is also reported per position bucket (the position of the predicted token inside its
window), because quantized KV caches hurt long contexts more than short ones.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import QForgeError
from ..utils.progress import progress


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[n_windows, seqlen] int64."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise QForgeError(f"max_windows must be at least 1 (None: every window), got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise QForgeError(f"the evaluation text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def forward_logits(model, x: torch.Tensor, make_cache=None) -> torch.Tensor:
    """Logits [B, T, vocab] (fp32) of one batch; `make_cache` (e.g. a quantizing KV cache) is used when given."""
    if make_cache is None:
        return model(input_ids=x, use_cache=False).logits.float()
    return model(input_ids=x, past_key_values=make_cache(), use_cache=True).logits.float()


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, device: str = "cpu", batch_size: int = 1, desc: str = "eval",
              show_progress: bool = True, make_cache=None, on_logits=None) -> torch.Tensor:
    """NLL (fp64) of positions 1..T-1 of each window -> [n_windows, T-1]. `on_logits(logits, ids)` sees
    every batch's logits [B, T, vocab] (e.g. compare.ReferenceComparison), so nothing runs twice."""
    out = []
    chunks = list(windows.split(batch_size))
    for chunk in progress(chunks, desc=desc, enabled=show_progress):
        x = chunk.to(device)
        logits = forward_logits(model, x, make_cache)
        if on_logits is not None:
            on_logits(logits, x)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(len(chunk), -1).double().cpu())
    return torch.cat(out)


def position_buckets(seqlen: int) -> list[tuple[int, int]]:
    """[start, end) ranges of predicted-token positions: the first 1/16, up to 1/4, up to 1/2, the rest."""
    edges = sorted({1, max(2, seqlen // 16), max(2, seqlen // 4), max(2, seqlen // 2), seqlen})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def bucket_ppl(nll: torch.Tensor, seqlen: int) -> list[dict]:
    """Perplexity per position bucket from token NLLs [n_windows, T-1] (column k predicts position k+1)."""
    return [{"positions": [a, b], "ppl": math.exp(float(nll[:, a - 1: b - 1].mean()))} for a, b in position_buckets(seqlen)]


def perplexity(model, tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None,
               device: str = "cpu", batch_size: int = 1, desc: str = "eval", show_progress: bool = True,
               make_cache=None, on_logits=None, weights=None) -> dict:
    """`weights`: a streamed skeleton's models.streaming.BlockLoader (eval/streamed.py runs the windows one
    block at a time; no logits hook then, and each batch's `make_cache` cache goes with its blocks' calls: one that
    keeps nothing holds no window's keys and values)."""
    if seqlen < 2:
        raise QForgeError(f"seqlen must be at least 2 (a window predicts tokens 1..seqlen-1), got {seqlen}")
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise QForgeError(f"seqlen {seqlen} exceeds the model's context length {max_pos}")
    windows = token_windows(tokenizer, text, seqlen, max_windows)
    t0 = time.perf_counter()
    if weights is not None:
        if on_logits is not None:
            raise QForgeError("a streamed evaluation measures perplexity only (no reference)")
        from .streamed import streamed_token_nll

        tok = streamed_token_nll(model, weights, windows, device, batch_size, desc, show_progress, make_cache)
    else:
        tok = token_nll(model, windows, device, batch_size, desc, show_progress, make_cache, on_logits)
    n_pred = windows.shape[0] * (seqlen - 1)
    mean_nll = float(tok.sum() / n_pred)
    if not math.isfinite(mean_nll):
        raise QForgeError("the model produced non-finite log-likelihoods")
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "seqlen": seqlen, "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()), "predicted_tokens": n_pred, "seconds": time.perf_counter() - t0,
            "by_position": bucket_ppl(tok, seqlen)}
