import math

import pytest
import torch
import torch.nn.functional as F

from qforge import QForgeError
from qforge.eval import perplexity, token_windows


def direct_ppl(model, ids, seqlen, max_windows=None):
    """The protocol written out longhand: window by window, token by token."""
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    total, count = 0.0, 0
    for w in range(n):
        x = ids[w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=x[None]).logits[0].double(), dim=-1)
        for t in range(1, seqlen):
            total -= logp[t - 1, x[t]].item()
            count += 1
    return math.exp(total / count), n, count


@pytest.mark.parametrize("seqlen,max_windows", [(32, None), (50, 2)])
def test_perplexity_follows_the_protocol(tiny_llama, tiny_tokenizer, seqlen, max_windows):
    text = "The quick brown fox jumps over the lazy dog. " * 30
    ids = torch.tensor(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    want, n, count = direct_ppl(tiny_llama, ids, seqlen, max_windows)
    got = perplexity(tiny_llama, tiny_tokenizer, text, seqlen, max_windows, batch_size=2, show_progress=False)
    assert got["windows"] == n and got["predicted_tokens"] == count and got["tokens"] == n * seqlen
    assert got["ppl"] == pytest.approx(want, rel=1e-6)


def test_windows_drop_the_remainder_and_use_no_special_tokens(tiny_tokenizer):
    text = "abc def ghi " * 40
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    w = token_windows(tiny_tokenizer, text, 16)
    assert w.shape == (len(ids) // 16, 16)
    assert w.flatten().tolist() == ids[: w.numel()]


def test_text_shorter_than_a_window_is_an_error(tiny_llama, tiny_tokenizer):
    with pytest.raises(QForgeError, match="fewer than one window"):
        perplexity(tiny_llama, tiny_tokenizer, "too short", seqlen=64, show_progress=False)


def test_seqlen_beyond_context_or_below_2_is_an_error(tiny_llama, tiny_tokenizer):
    with pytest.raises(QForgeError, match="context length"):
        perplexity(tiny_llama, tiny_tokenizer, "x " * 5000, seqlen=4096, show_progress=False)
    with pytest.raises(QForgeError, match="at least 2"):
        perplexity(tiny_llama, tiny_tokenizer, "x " * 5000, seqlen=1, show_progress=False)
    with pytest.raises(QForgeError, match="max_windows must be at least 1"):
        perplexity(tiny_llama, tiny_tokenizer, "x " * 5000, seqlen=16, max_windows=0, show_progress=False)
