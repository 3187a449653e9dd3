from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Two threads (CI's cores); under pytest-xdist (README: -n 2) the cores are shared among the workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

from tiny_models import VOCAB, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A real byte-level BPE tokenizer (vocab 512), trained on built-in text, saved and reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qforge.calibration import builtin_documents

    texts = [t[:20000] for d in ("wiki", "code") for _, t in builtin_documents(d, "calib")[:5]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return PreTrainedTokenizerFast.from_pretrained(d)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama saved as a Hugging Face directory with a tokenizer."""
    m = tiny_model("llama")
    d = tmp_path / "tiny-llama"
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def wiki_excerpt(tmp_path_factory) -> str:
    """A calibration SPEC for tests that need some text, not a corpus: 8 Wikipedia documents (3000 characters
    each) labelled as wiki (what builtin:wiki would warn about, without tokenizing its 1.4 MB: ~1.6 s a draw)."""
    import json

    from qforge.calibration import builtin_documents

    path = tmp_path_factory.mktemp("calib") / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": t[:3000], "domain": "wiki"}) + "\n"
                            for _, t in builtin_documents("wiki", "calib")[:8]))
    return str(path)


@pytest.fixture(scope="session")
def wiki_calibration(tiny_tokenizer, wiki_excerpt):
    """4 windows of 32 tiny-tokenizer tokens of `wiki_excerpt`, drawn once, for tests that take a CalibrationSet."""
    from qforge.calibration import build_calibration

    return build_calibration(wiki_excerpt, tiny_tokenizer, 4, 32)
