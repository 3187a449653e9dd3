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

from ..utils.progress import progress
from .perplexity import forward_logits


@torch.no_grad()
def compare_logits(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL, top-1 agreement and Δp for logits [N, vocab] vs ref_logits [N, vocab], targets [N]."""
    logp, ref_logp = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    same = logits.argmax(-1) == ref_logits.argmax(-1)
    t = targets.unsqueeze(-1)
    dp = logp.gather(-1, t).exp().squeeze(-1) - ref_logp.gather(-1, t).exp().squeeze(-1)
    return {"kl": kl.clamp_min(0).double(), "top1": same.double(), "dp": dp.double()}


@torch.no_grad()
def compare_to_reference(model, reference, windows: torch.Tensor, device: str = "cpu", make_cache=None,
                         show_progress: bool = True, chunk: int = 512) -> dict:
    """Mean KLD, top-1 agreement and Δp of `model` against `reference` over windows [n, T]."""
    parts: dict[str, list[torch.Tensor]] = {"kl": [], "top1": [], "dp": []}
    for w in progress(list(windows), desc="kld", enabled=show_progress):
        x = w.unsqueeze(0).to(device)
        logits = forward_logits(model, x, make_cache)[0, :-1]
        ref = forward_logits(reference, x)[0, :-1]
        for a in range(0, logits.shape[0], chunk):           # bounded memory: vocab-wide softmaxes in chunks
            r = compare_logits(logits[a: a + chunk], ref[a: a + chunk], x[0, 1 + a: 1 + a + chunk])
            for k, v in r.items():
                parts[k].append(v.cpu())
    kl, top1, dp = (torch.cat(parts[k]) for k in ("kl", "top1", "dp"))
    return {"kld_mean": float(kl.mean()), "kld_p99": float(kl.quantile(0.99)) if kl.numel() <= 16_000_000 else None,
            "top1_agreement": float(top1.mean()), "delta_p_mean": float(dp.mean()), "positions": int(kl.numel())}
