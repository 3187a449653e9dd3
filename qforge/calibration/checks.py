"""Warnings for calibration sets that are too small or too narrow to calibrate well."""
from __future__ import annotations

import functools
import math
from collections import Counter

MIN_SAMPLES = 32
MIN_TOKENS = 16_384
# Jensen-Shannon divergence (bits) of the token distribution from the built-in mix's (see narrowness),
# above which a set counts as one narrow domain. Measured with SmolLM2's tokenizer at 32x512 and
# 128x512 tokens: builtin:mix 0.004-0.014, wiki 0.044, brown 0.054, news 0.061, code 0.12-0.14
# (benchmarks/calibration_diversity.py).
NARROW_JSD = 0.03
TOP_TOKENS = 256


def _unigram(ids) -> Counter:
    c: Counter = Counter()
    for s in ids:
        c.update(s.tolist() if hasattr(s, "tolist") else s)
    return c


def jsd_bits(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence between two count distributions, in bits (0 .. 1)."""
    np_, nq = sum(p.values()), sum(q.values())
    total = 0.0
    for t in set(p) | set(q):
        a, b = p.get(t, 0) / np_, q.get(t, 0) / nq
        m = (a + b) / 2
        if a:
            total += 0.5 * a * math.log2(a / m)
        if b:
            total += 0.5 * b * math.log2(b / m)
    return total


@functools.lru_cache(maxsize=4)
def _mix_unigram(tokenizer_key: str, tokenizer) -> Counter:
    from .builtin import DOMAINS, builtin_documents

    c: Counter = Counter()
    for d in DOMAINS:
        text = "\n\n".join(t for _, t in builtin_documents(d, "calib"))
        c.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return c


def _bucket(c: Counter, keep: set) -> Counter:
    out: Counter = Counter()
    for t, n in c.items():
        out[t if t in keep else -1] += n
    return out


def narrowness(samples, tokenizer) -> float:
    """JSD between the set's and the mix's distributions over the mix's TOP_TOKENS most frequent
    tokens plus one bucket for all others (so that a small sample's unseen rare tokens add no bias)."""
    key = f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    mix = _mix_unigram(key, tokenizer)
    keep = {t for t, _ in mix.most_common(TOP_TOKENS)}
    return jsd_bits(_bucket(_unigram(samples), keep), _bucket(mix, keep))


def calibration_warnings(calib, tokenizer, nsamples: int, seqlen: int) -> list[str]:
    out = []
    if len(calib.samples) < nsamples:
        out.append(f"calibration: asked for {nsamples} samples, the data gave only {len(calib.samples)}")
    short = [len(s) for s in calib.samples if len(s) < seqlen]
    if short and len(short) == len(calib.samples) and calib.source.startswith("builtin:") is False:
        out.append(f"calibration: samples are shorter than seqlen={seqlen} (longest {max(len(s) for s in calib.samples)})")
    if len(calib.samples) < MIN_SAMPLES or calib.n_tokens < MIN_TOKENS:
        out.append(
            f"calibration set is small ({len(calib.samples)} samples, {calib.n_tokens} tokens; want at least "
            f"{MIN_SAMPLES} samples and {MIN_TOKENS} tokens): quantization may overfit it, as one-sample "
            f"calibration famously breaks OPT-125m"
        )
    labels = {d for d in calib.domains if d is not None}
    if len(labels) == 1 and None not in calib.domains:
        out.append(f"calibration comes from one domain only ({labels.pop()}): perplexity on other domains can "
                   f"degrade badly at low bit widths; builtin:mix is the diverse default")
    elif not labels:
        jsd = narrowness(calib.samples, tokenizer)
        if jsd > NARROW_JSD:
            out.append(f"calibration data looks narrow: its token distribution is far from the diverse built-in "
                       f"mix (Jensen-Shannon {jsd:.2f} bits > {NARROW_JSD}); other domains may degrade at low bits")
    return out


def token_samples(samples, vocab: int) -> list:
    """Calibration samples given as tensors, checked: each a 1-D integer tensor of at least 2 token ids in
    [0, vocab) (a 2-D tensor counts as one sample per row); QForgeError names the first bad one."""
    import torch

    from ..errors import QForgeError

    out = []
    for k, s in enumerate(samples):
        integer = isinstance(s, torch.Tensor) and not (s.dtype.is_floating_point or s.dtype.is_complex
                                                      or s.dtype == torch.bool)
        if not integer:
            kind = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise QForgeError(f"calibration sample {k}: expected an integer tensor of token ids, got {kind}")
        rows = [s] if s.dim() == 1 else list(s) if s.dim() == 2 else None
        if rows is None:
            raise QForgeError(f"calibration sample {k}: expected a 1-D tensor of token ids, got shape {tuple(s.shape)}")
        for r in rows:
            if r.numel() < 2:
                raise QForgeError(f"calibration sample {k}: {r.numel()} token(s); a sample needs at least 2")
            if int(r.min()) < 0 or int(r.max()) >= vocab:
                raise QForgeError(f"calibration sample {k}: token ids outside [0, {vocab}) of the model's "
                                  f"embedding; wrong tokenizer?")
            out.append(r.to(torch.long))
    return out
