"""greedy_decode (the decode-speed harness of benchmarks/kernels.py): its static-cache steps give the tokens
transformers' own greedy generate gives; the CUDA-graph replay gives them too, on a GPU."""
from __future__ import annotations

import pytest
import torch

from qforge.eval.decode import greedy_decode
from tiny_models import VOCAB, tiny_model


def _generate(model, prompt, steps):
    out = model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
    return out[0, prompt.shape[1]:].cpu()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_cache_decode_matches_generate(arch):
    model = tiny_model(arch)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    r = greedy_decode(model, prompt, steps=12)
    assert r.tokens.shape == (13,) and not r.cuda_graph and r.tokens_per_s > 0
    assert torch.equal(r.tokens, _generate(model, prompt, 12))


def test_decode_refuses_bad_requests():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\[1, P\]"):
        greedy_decode(model, torch.zeros(2, 3, dtype=torch.long), steps=2)
    with pytest.raises(ValueError, match="CUDA"):
        greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), steps=2, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_matches_generate():
    model = tiny_model("llama").cuda()
    prompt = torch.randint(0, VOCAB, (1, 7), device="cuda")
    r = greedy_decode(model, prompt, steps=12, cuda_graph=True)
    assert r.cuda_graph and torch.equal(r.tokens, _generate(model, prompt, 12))
