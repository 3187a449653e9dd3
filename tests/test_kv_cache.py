"""FP8 KV cache (QuantizeConfig.kv_cache "fp8"): per attention layer, a key scale and a value scale calibrated on the
quantized model (capture/kv_range.py), kept in the output, exported as compressed-tensors kv_cache_scheme, read back
from qforge's and other writers' checkpoints, and applied in evaluation and generation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import qforge
from qforge.api import QModel
from qforge.capture.blocks import make_batches
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.eval.simulate import QuantizedKVCache, kv_cache_factory
from qforge.formats import compressed_tensors as ct
from qforge.solvers.grid import FP8_MAX, to_e4m3
from tiny_models import VOCAB, tiny_model

W4 = dict(method="rtn", bits=4, group_size=16, kv_cache="fp8")
FP8_KV = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _samples(n=6, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g) for _ in range(n)]


def _quantized(model_type="llama", **cfg) -> QModel:
    q = QModel(tiny_model(model_type), None, model_type, QuantizeConfig(**{**W4, **cfg}))
    q.quantize(_samples(), batch_size=4)
    return q


def test_kv_cache_settings_are_validated_and_need_calibration():
    with pytest.raises(QForgeError, match="kv_cache must be one of fp8"):
        QuantizeConfig(method="rtn", kv_cache="int8")
    assert QuantizeConfig(method="rtn", kv_cache="fp8").needs_calibration       # RTN runs the model for the scales
    with pytest.raises(QForgeError, match="needs calibration"):
        QModel(tiny_model("llama"), None, "t", QuantizeConfig(**W4)).quantize(None)


@pytest.mark.parametrize("model_type,cfg", [("llama", {}), ("qwen3", {}),
                                            ("llama", dict(bits=8, group_size=-1, act_bits=8)),
                                            ("gpt2", {}), ("lfm2", {})])
def test_kv_scales_are_the_largest_cached_keys_and_values(model_type, cfg):
    """Brute force: the quantized model (its inputs quantized too, W8A8) run with a plain cache over the same batches;
    every attention layer's scales are the largest |key| / 448 and |value| / 448 it cached (keys after the rotary
    embedding and Qwen3's key norm); a hybrid model's (LFM2) convolution blocks have none."""
    q = _quantized(model_type, **cfg)
    caches = []
    with torch.no_grad(), q.quantized_inputs():
        for batch in make_batches(_samples(), 4):
            caches.append(DynamicCache(config=q.model.config))
            q.model(input_ids=batch, past_key_values=caches[-1], use_cache=True)
    attn = {n: m.layer_idx for n, m in q.model.named_modules() if n.rpartition(".")[2] in ("self_attn", "attn")}
    assert q.kv_scales.keys() == {f"{n}.{k}" for n in attn for k in ("k_scale", "v_scale")}
    for name, i in attn.items():
        k = max(float(c.layers[i].keys.abs().max()) for c in caches)
        v = max(float(c.layers[i].values.abs().max()) for c in caches)
        got = q.kv_scales[f"{name}.k_scale"], q.kv_scales[f"{name}.v_scale"]
        assert got[0].shape == (1,) and got[0].dtype == torch.float32
        assert float(got[0]) == pytest.approx(k / FP8_MAX, rel=1e-6) and float(got[1]) == pytest.approx(v / FP8_MAX,
                                                                                                         rel=1e-6)
    if model_type == "lfm2":
        assert len(attn) < q.model.config.num_hidden_layers


def test_kv_scales_of_zeros_are_one_and_of_non_finite_values_refused():
    from qforge.capture.kv_range import kv_scales

    s = kv_scales({"a": torch.tensor([0.0, 4.48])})
    assert float(s["a.k_scale"]) == 1.0 and float(s["a.v_scale"]) == pytest.approx(0.01)
    with pytest.raises(QForgeError, match="non-finite"):
        kv_scales({"a": torch.tensor([float("nan"), 1.0])})


def test_the_fp8_cache_casts_with_each_layers_scales():
    """x̂ = fp8(x / s) · s per layer; small values (a value projection's) keep their precision with a calibrated scale
    and lose it with scale 1 (E4M3's subnormals below 2^-6)."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 5, 8) * 0.003, torch.randn(1, 2, 5, 8) * 3
    ks, vs = float(k.abs().max()) / FP8_MAX, float(v.abs().max()) / FP8_MAX
    model = tiny_model("llama")
    cache = QuantizedKVCache(model.config, 8, fp8=True, scales={0: (ks, vs), 1: (1.0, 1.0)})
    k0, v0 = cache.update(k, v, 0)
    torch.testing.assert_close(k0, to_e4m3(k / ks).float() * ks, rtol=0, atol=0)
    torch.testing.assert_close(v0, to_e4m3(v / vs).float() * vs, rtol=0, atol=0)
    k1, _ = cache.update(k, v, 1)
    assert (k1 - k).abs().mean() > 3 * (k0 - k).abs().mean()
    with pytest.raises(QForgeError, match="no FP8 KV scales"):
        cache.update(k, v, 5)
    with pytest.raises(QForgeError, match="FP8 scales"):
        kv_cache_factory(model, 4, scales={"model.layers.0.self_attn.k_scale": torch.ones(1)})


def test_calibrated_scales_keep_keys_beyond_e4m3s_range():
    """Keys far above 448 (a model whose key projection is large) saturate a scale-1 FP8 cache; the calibrated scales
    keep them to E4M3's rounding (at most 1/16 of the largest)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(2000)
    q = QModel(model, None, "big keys", QuantizeConfig(method="rtn", bits=8, group_size=-1, kv_cache="fp8"))
    q.quantize(_samples())
    assert min(float(v) for n, v in q.kv_scales.items() if n.endswith("k_scale")) > 1     # max|k| > 448
    ids = torch.stack(_samples())                          # the calibration tokens: no key beyond its scale's range
    caches = [DynamicCache(config=q.model.config), q.kv_cache_factory()(), kv_cache_factory(q.model, 8, fp8=True)()]
    with torch.no_grad():
        for cache in caches:
            q.model(ids, past_key_values=cache, use_cache=True)
    k, calibrated, one = (c.layers[0].keys for c in caches)   # the first layer's: the same inputs in all three runs
    top = k.abs().max()
    assert top > 448 * 1.5
    assert (calibrated - k).abs().max() <= top / 16 and (one - k).abs().max() > top / 2


def test_kv_scales_round_trip_through_the_output_and_the_export(tmp_path, tiny_tokenizer):
    q = _quantized()
    q.tokenizer = tiny_tokenizer
    q.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "qforge_config.json").read_text())["kv_cache"] == "fp8"
    saved = qforge.load(tmp_path / "out")
    assert saved.kv_scales.keys() == q.kv_scales.keys()
    assert all(torch.equal(saved.kv_scales[k], v) for k, v in q.kv_scales.items())
    saved.export(tmp_path / "ct", "compressed-tensors", torch.float32)        # fp32: the same model as the output
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert {k: qc["kv_cache_scheme"][k] for k in FP8_KV} == FP8_KV
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert all(torch.equal(state[k], v) and state[k].dtype == torch.float32 for k, v in q.kv_scales.items())
    packed = qforge.load(tmp_path / "ct")
    assert all(torch.equal(packed.kv_scales[k], v) for k, v in q.kv_scales.items())
    rows = [qforge.evaluate(m, "wiki", seqlen=32, max_windows=2) for m in (saved, packed)]
    assert rows[0][0]["kv_cache"] == rows[1][0]["kv_cache"] == "fp8"
    assert rows[0][0]["ppl"] == pytest.approx(rows[1][0]["ppl"], rel=1e-4)
    saved.result.kv_scales = {}                                         # the same model, its cache unquantized
    assert qforge.evaluate(saved, "wiki", seqlen=32, max_windows=2)[0]["ppl"] != rows[0][0]["ppl"]


def test_generate_and_evaluate_cast_the_cache_with_the_models_scales(tmp_path):
    q = _quantized()
    ids = torch.stack(_samples(2, 16))
    with torch.no_grad():
        plain = q.model(ids).logits
        fp8 = q.model(ids, past_key_values=q.kv_cache_factory()(), use_cache=True).logits
        make = kv_cache_factory(q.model, 8, fp8=True)                                       # scale 1
        one = q.model(ids, past_key_values=make(), use_cache=True).logits
    assert 0 < (fp8 - plain).abs().max() < (one - plain).abs().max()
    with pytest.raises(QForgeError, match="quantize it again"):
        qforge.evaluate(q, "wiki", seqlen=32, max_windows=1, simulate=qforge.SimulationConfig(kv_bits=8, kv_fp8=True))


def test_kv_cache_settings_the_run_cannot_honour_are_refused_before_quantizing(tiny_llama_dir, tmp_path):
    with pytest.raises(QForgeError, match="hand them on through 'shared_kv_states'"):
        QModel(tiny_model("gemma4_text"), None, "g", QuantizeConfig(**W4)).quantize(_samples())
    from qforge.export import check_exportable

    with pytest.raises(QForgeError, match="compressed-tensors \\(kv_cache_scheme\\) only"):
        check_exportable(tiny_model("llama"), QuantizeConfig(**W4), "gptq")
    q = _quantized()
    q.result.kv_scales = {}                                    # a config asking for scales the result lacks
    with pytest.raises(QForgeError, match="holds no KV scales"):
        q.export(tmp_path / "x", "compressed-tensors")
    assert not (tmp_path / "x").exists()


def test_checkpoints_with_other_kv_schemes_or_missing_scales_are_refused(tmp_path, tiny_tokenizer):
    assert not ct.kv_cache_fp8({}) and ct.kv_cache_fp8({"kv_cache_scheme": FP8_KV})
    with pytest.raises(QForgeError, match="kv_cache_scheme 8-bit int tensor static"):
        ct.kv_cache_fp8({"kv_cache_scheme": {**FP8_KV, "type": "int"}})
    q = _quantized()
    q.tokenizer = tiny_tokenizer
    q.export(tmp_path / "ct", "compressed-tensors")
    path = tmp_path / "ct" / "model.safetensors"
    state = load_file(str(path))
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if not k.endswith(".v_scale")}, str(path))
    with pytest.raises(QForgeError, match="one of k_scale / v_scale missing"):
        qforge.load(tmp_path / "ct")
    save_file({k: v for k, v in state.items() if not k.endswith(("k_scale", ".v_scale"))}, str(path))
    with pytest.raises(QForgeError, match="stores no k_scale / v_scale tensors"):
        qforge.load(tmp_path / "ct")


def test_the_command_line_quantizes_exports_and_evaluates_an_fp8_cache(tiny_llama_dir, wiki_excerpt, tmp_path,
                                                                       capsys):
    from qforge.cli.main import main

    out, ct_dir = tmp_path / "q", tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "16",
                 "--kv-cache", "fp8", "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32",
                 "--out", str(out), "--format", "compressed-tensors", "--export-out", str(ct_dir)]) == 0
    assert "KV FP8" in capsys.readouterr().out
    assert json.loads((ct_dir / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]["type"] == \
        "float"
    assert qforge.load(ct_dir).kv_scales.keys() == qforge.load(out).kv_scales.keys()
    assert main(["-q", "generate", str(ct_dir), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", str(ct_dir), "--dataset", "wiki", "--eval-seqlen", "32", "--max-windows", "1"]) == 0
    assert "its KV cache in FP8 with calibrated scales" in capsys.readouterr().out


@pytest.mark.parametrize("model_type,cfg", [("llama", dict(method="gptq")), ("lfm2", {}),
                                            ("llama", dict(bits=8, group_size=-1, act_bits=8))])
def test_a_streamed_run_calibrates_the_scales_of_the_in_memory_run(model_type, cfg, tiny_tokenizer, wiki_excerpt,
                                                                     tmp_path):
    """Streamed (one block in memory), the quantized blocks run block by block from the run state with each batch's
    cache handed to their attention: the same scales as the whole quantized model in memory (W8A8: its inputs
    quantized too; LFM2: its convolution blocks write none), in the output and the export alike."""
    from runs import streamed_and_in_memory

    src = tmp_path / "src"
    tiny_model(model_type).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    a, b = streamed_and_in_memory(src, QuantizeConfig(**{**W4, **cfg}), wiki_excerpt, tmp_path)
    assert a.kv_scales.keys() == b.kv_scales.keys() and a.kv_scales
    for k, v in b.kv_scales.items():
        torch.testing.assert_close(a.kv_scales[k], v, rtol=1e-6, atol=0)


def test_a_streamed_evaluation_casts_the_cache_with_the_models_scales(tiny_llama_dir, wiki_excerpt, tmp_path):
    """A packed checkpoint and a saved output with FP8 KV scales, evaluated block by block: each window's cache goes
    with the blocks' calls and casts as the in-memory evaluation's does (the same ppl, not the plain cache's)."""
    q = qforge.load(tiny_llama_dir, QuantizeConfig(**W4))
    q.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    scale = {k: v / 64 for k, v in q.kv_scales.items()}         # scales that saturate: the cache's effect shows
    q.result.kv_scales = scale
    out = q.save(tmp_path / "out")
    q.export(tmp_path / "ct", "compressed-tensors")
    for path in (tmp_path / "ct", out):
        streamed = qforge.load(path, stream=True)
        assert streamed.kv_scales.keys() == scale.keys()
        got = qforge.evaluate(streamed, "wiki", seqlen=64, max_windows=2)[0]["ppl"]
        want = qforge.evaluate(path, "wiki", seqlen=64, max_windows=2)[0]["ppl"]
        assert got == pytest.approx(want, rel=1e-5)
        plain = qforge.load(path)
        plain.result.kv_scales = {}
        assert abs(qforge.evaluate(plain, "wiki", seqlen=64, max_windows=2)[0]["ppl"] - want) > 1e-3 * want
