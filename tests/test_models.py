import pytest
import torch

import qforge
from qforge import QForgeError
from qforge.models import load_model, resolve_model


def test_missing_path_is_a_clear_error():
    with pytest.raises(QForgeError, match="no such"):
        resolve_model("./no/such/model")
    with pytest.raises(QForgeError, match="no such GGUF"):
        resolve_model("missing.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(QForgeError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(QForgeError, match="could not read GGUF"):
        resolve_model(str(bad))


def test_corrupt_safetensors(tiny_llama_dir):
    (tiny_llama_dir / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(QForgeError, match="could not load"):
        load_model(str(tiny_llama_dir))


def test_hub_id_offline_fails_cleanly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QForgeError, match="hub id"):
        load_model("some-org/some-model-that-is-not-here")
    with pytest.raises(QForgeError, match="Did you mean the built-in 'smollm2-135m'"):
        load_model("SmolLM2")                                    # a near miss of an alias


def test_nan_weights_and_a_missing_tokenizer_are_refused(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
    lm.model.save_pretrained(tmp_path / "nan")
    with pytest.raises(QForgeError, match="has no tokenizer"):
        load_model(str(tmp_path / "nan"))
    lm.tokenizer.save_pretrained(tmp_path / "nan")
    with pytest.raises(QForgeError, match="NaN.*up_proj"):
        load_model(str(tmp_path / "nan"))


def test_quantized_dir_refuses_a_second_config(tiny_llama_dir, tmp_path):
    m = qforge.load(str(tiny_llama_dir), qforge.QuantizeConfig())
    m.quantize()
    m.save(tmp_path / "q")
    with pytest.raises(QForgeError, match="already quantized"):
        qforge.load(str(tmp_path / "q"), qforge.QuantizeConfig())


def test_the_chunked_finiteness_check_finds_every_bad_value():
    """utils.tensors.all_finite, a chunk at a time (GPTQ's Hessians, a 70B vocabulary's embeddings): NaN and
    Inf anywhere, in the last ragged chunk and in column-major views (the Cholesky factor's), are found."""
    import torch

    from qforge.utils.tensors import all_finite

    t = torch.randn(37, 53)
    assert all_finite(t, chunk=100) and all_finite(t.mT, chunk=100) and all_finite(t[:, ::2], chunk=7)
    for pos, bad in [((0, 0), float("nan")), ((36, 52), float("inf")), ((20, 11), float("-inf"))]:
        u = t.clone()
        u[pos] = bad
        assert not all_finite(u, chunk=100) and not all_finite(u.mT, chunk=100) and not all_finite(u, chunk=1 << 20)
