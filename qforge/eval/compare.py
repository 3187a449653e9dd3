"""Distribution-level comparison of a (quantized) model with a reference on the same windows, as
llama.cpp's perplexity tool reports it (`--kl-divergence`):

- mean KL divergence of the model's next-token distribution from the reference's,
  KL(P_ref ‖ P) = Σ_v P_ref(v) (log P_ref(v) − log P(v)), averaged over every predicted position;
- top-1 agreement: how often both models' most likely next token is the same;
- Δp: the mean change of the probability given to the correct next token (P − P_ref).
Perplexity alone averages damage away; KLD sees every changed distribution.
"""
from __future__ import annotations

import torch

from .perplexity import forward_logits, token_nll


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P) per position from log-probabilities [..., vocab] (clamped at 0 against rounding)."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)


@torch.no_grad()
def compare_logits(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL, top-1 agreement and Δp for logits [N, vocab] vs ref_logits [N, vocab], targets [N]."""
    logp, ref_logp = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    same = logits.argmax(-1) == ref_logits.argmax(-1)
    t = targets.unsqueeze(-1)
    dp = logp.gather(-1, t).exp().squeeze(-1) - ref_logp.gather(-1, t).exp().squeeze(-1)
    return {"kl": kl_divergence(ref_logp, logp).double(), "top1": same.double(), "dp": dp.double()}


class ReferenceComparison:
    """Accumulates KL, top-1 agreement and Δp of every batch of logits it is given against `reference`
    run on the same ids; pass it as `on_logits` to perplexity.token_nll so the model runs once."""

    def __init__(self, reference, chunk: int = 512):
        self.reference, self.chunk = reference, chunk
        self.parts: dict[str, list[torch.Tensor]] = {"kl": [], "top1": [], "dp": []}

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """logits [B, T, vocab] of the model on ids [B, T]."""
        ref = forward_logits(self.reference, ids)
        for b in range(ids.shape[0]):
            for a in range(0, ids.shape[1] - 1, self.chunk):    # bounded memory: vocab-wide softmaxes in chunks
                e = min(a + self.chunk, ids.shape[1] - 1)
                for k, v in compare_logits(logits[b, a:e], ref[b, a:e], ids[b, a + 1: e + 1]).items():
                    self.parts[k].append(v.cpu())

    def result(self) -> dict:
        kl, top1, dp = (torch.cat(self.parts[k]) for k in ("kl", "top1", "dp"))
        return {"kld_mean": float(kl.mean()), "kld_p99": float(kl.quantile(0.99)) if kl.numel() <= 16_000_000 else None,
                "top1_agreement": float(top1.mean()), "delta_p_mean": float(dp.mean()), "positions": int(kl.numel())}


def compare_to_reference(model, reference, windows: torch.Tensor, device: str = "cpu", make_cache=None,
                         show_progress: bool = True, chunk: int = 512) -> dict:
    """Mean KLD, top-1 agreement and Δp of `model` against `reference` over windows [n, T]."""
    comparison = ReferenceComparison(reference, chunk)
    token_nll(model, windows, device, 1, "kld", show_progress, make_cache, on_logits=comparison)
    return comparison.result()
