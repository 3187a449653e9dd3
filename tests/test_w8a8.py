"""W8A8: int8 per-channel weights with dynamic per-token int8 inputs (config, SmoothQuant before quantizing,
compressed-tensors int-quantized export and loading, activation quantization in evaluation)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.eval import load_eval_text, perplexity
from qforge.formats import compressed_tensors as ct
from qforge.solvers import Grid, InputScheme, rtn

W8A8 = dict(method="rtn", bits=8, group_size=-1, sym=True, act_bits=8)


@pytest.mark.parametrize("bad,msg", [
    (dict(bits=4), "8-bit symmetric per-channel"),
    (dict(group_size=128), "8-bit symmetric per-channel"),
    (dict(sym=False), "8-bit symmetric per-channel"),
    (dict(method="awq", sym=True), "weight-only"),
    (dict(method="gptq", bpw=6.0), "mixed precision"),
    (dict(act_bits=4), "act_bits must be 8"),
    (dict(act_bits=None, smoothquant=0.5), "needs act_bits 8"),
    (dict(smoothquant=1.5), r"\[0, 1\]"),
])
def test_impossible_w8a8_settings_are_refused(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig(**{**W8A8, **bad})


def test_smoothquant_makes_rtn_need_calibration():
    assert not QuantizeConfig(**W8A8).needs_calibration
    assert QuantizeConfig(**W8A8, smoothquant=0.8).needs_calibration


def _layer(out=48, inp=64, sym=True, seed=0):
    torch.manual_seed(seed)
    return rtn(torch.randn(out, inp) * torch.rand(out, 1), Grid(8, -1, sym))


@pytest.mark.parametrize("sym", [True, False])
def test_int_quantized_round_trip_is_bit_exact(sym):
    q = _layer(sym=sym)
    t = ct.pack(q, torch.float16, InputScheme(8))
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == q.shape
    assert t["weight_scale"].shape == (q.shape[0], 1) and ("weight_zero_point" in t) == (not sym)
    back = ct.unpack(t, q.grid)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.scales, q.scales.half().float()) and torch.equal(back.zeros, q.zeros)
    # what the library itself decompresses is the same weight
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    scheme = ct._scheme(q.grid, ["Linear"], InputScheme(8))
    dense = IntQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    torch.testing.assert_close(dense, back.dequantize().to(dense.dtype), rtol=0, atol=0)     # in the scales' dtype


def test_a_per_tensor_scale_reads_as_every_channels():
    q = _layer()
    t = ct.pack(q, torch.float32, InputScheme(8))
    t["weight_scale"] = t["weight_scale"][:1, 0].clone().reshape(1)          # as a per-tensor writer stores it
    back = ct.unpack(t, Grid(8, -1, True))
    assert back.scales.shape == (q.shape[0], 1) and torch.all(back.scales == t["weight_scale"])


def test_only_8_bit_dynamic_per_token_or_static_per_tensor_inputs_are_read():
    ok = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert ct.input_acts({"config_groups": {"g": {"weights": w, "input_activations": ok}}}) == InputScheme(8)
    assert ct.input_acts({"config_groups": {"g": {"weights": w}}}) is None
    for bad, msg in (({**ok, "dynamic": False}, "8-bit int token static symmetric"),
                     ({**ok, "num_bits": 4}, "4-bit int token dynamic"),
                     ({**ok, "strategy": "tensor"}, "8-bit int tensor dynamic")):
        with pytest.raises(QForgeError, match=msg):
            ct.input_acts({"config_groups": {"g": {"weights": w, "input_activations": bad}}})
    with pytest.raises(QForgeError, match="different input quantizations .or none."):
        ct.input_acts({"config_groups": {"a": {"weights": w, "input_activations": ok}, "b": {"weights": w}}})


@pytest.fixture
def w8a8_run(tiny_llama_dir, wiki_excerpt, tmp_path):
    m = qforge.load(tiny_llama_dir, QuantizeConfig(**W8A8, smoothquant=0.8))
    norm_before = m.model.model.layers[0].input_layernorm.weight.detach().clone()
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    out = m.save(tmp_path / "out")
    return m, out, norm_before


def test_w8a8_smooths_quantizes_exports_and_evaluates_as_served(w8a8_run, tmp_path):
    m, out, norm_before = w8a8_run
    # SmoothQuant folded into the norms before the weights were rounded, and saved
    assert m.result.smoothquant and not torch.equal(m.model.model.layers[0].input_layernorm.weight, norm_before)
    assert (out / "smoothquant_scales.safetensors").is_file()
    assert m.act_bits == 8
    with pytest.raises(QForgeError, match="compressed-tensors .int-quantized. only"):
        m.export(tmp_path / "gptq", "gptq")
    sizes = m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)   # fp16 would round the norms
    assert sizes["bits_per_weight"] == pytest.approx(8 + 32 / m.model.config.hidden_size, rel=0.2)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"

    packed = qforge.load(tmp_path / "ct")
    assert packed.packed_format == "compressed-tensors" and packed.act_bits == 8
    saved = qforge.load(out)
    rows = {name: qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0] for name, q in
            (("packed", packed), ("saved", saved), ("memory", m))}
    assert rows["packed"]["act_bits"] == 8
    ppl = {k: r["ppl"] for k, r in rows.items()}
    assert ppl["packed"] == pytest.approx(ppl["saved"], rel=1e-4)
    assert ppl["saved"] == pytest.approx(ppl["memory"], rel=1e-5)
    # the inputs really are quantized in that evaluation: the same weights on unquantized inputs score otherwise
    weight_only = perplexity(packed.model, packed.tokenizer, load_eval_text("wiki"), 64, 2)["ppl"]
    assert abs(weight_only - ppl["packed"]) > 1e-5 * ppl["packed"]
    with pytest.raises(QForgeError, match="already"):
        qforge.evaluate(packed, "wiki", seqlen=64, max_windows=1, simulate=qforge.SimulationConfig(act_bits=4))


@pytest.mark.parametrize("smoothquant", [None, 0.5])
def test_w8a8_streams(tiny_llama_dir, wiki_excerpt, tmp_path, smoothquant):
    """One block in memory gives the in-memory run's model: SmoothQuant is a per-block stage of the pipeline."""
    cfg = QuantizeConfig(**W8A8, smoothquant=smoothquant)
    streamed = qforge.load(tiny_llama_dir, cfg, stream=True)
    streamed.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "rs")
    streamed.save(tmp_path / "streamed_out")
    streamed.export(tmp_path / "streamed", "compressed-tensors")
    in_memory = qforge.load(tiny_llama_dir, cfg)
    in_memory.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    in_memory.export(tmp_path / "memory", "compressed-tensors")
    assert bool(streamed.result.smoothquant) == (smoothquant is not None)
    assert streamed.result.smoothquant.keys() == in_memory.result.smoothquant.keys()
    if smoothquant is not None:
        saved = load_file(tmp_path / "streamed_out" / "smoothquant_scales.safetensors")
        assert all(torch.equal(saved[k], s) for k, s in in_memory.result.smoothquant.items())
    a, b = qforge.load(tmp_path / "streamed"), qforge.load(tmp_path / "memory")
    assert a.act_bits == b.act_bits == 8
    ppl = [qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for q in (a, b)]
    assert ppl[0] == ppl[1]
    with pytest.raises(QForgeError, match="without stream"):
        qforge.evaluate(qforge.load(tmp_path / "streamed", stream=True), "wiki", seqlen=64, max_windows=1)


def test_w8a8_from_the_command_line(tiny_llama_dir, wiki_excerpt, tmp_path, capsys):
    from qforge.cli.main import main

    out, packed = tmp_path / "q", tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "8", "--group-size", "-1",
                 "--act-bits", "8", "--smoothquant", "0.5", "--calib", wiki_excerpt, "--nsamples", "4",
                 "--calib-seqlen", "32", "--out", str(out), "--format", "compressed-tensors",
                 "--export-out", str(packed)]) == 0
    assert "gptq W8A8 per-channel sym" in capsys.readouterr().out
    cfg = json.loads((out / "qforge_config.json").read_text())
    assert cfg["act_bits"] == 8 and cfg["smoothquant"] == 0.5
    js = tmp_path / "r.json"
    assert main(["-q", "eval", str(packed), "--dataset", "wiki", "--seqlen", "32", "--max-windows", "2",
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())[0]["act_bits"] == 8
    assert "quantized to int8 per token" in capsys.readouterr().out
    assert main(["-q", "generate", str(packed), "--prompt", "The city", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    # settings W8A8 cannot take exit 2 with the reason, before any work
    assert main(["quantize", str(tiny_llama_dir), "--act-bits", "8", "--out", str(tmp_path / "bad")]) == 2
    assert "8-bit symmetric per-channel" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), "--bits", "8", "--group-size", "-1", "--act-bits", "8",
                 "--format", "gptq", "--out", str(tmp_path / "bad")]) == 2
    assert "compressed-tensors (int-quantized) only" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("model_type", ["qwen2", "gemma", "opt", "gpt_neox", "phi3"])
def test_w8a8_on_other_families(model_type, tiny_tokenizer, wiki_calibration, tmp_path):
    """SmoothQuant's folds (biases, Gemma's 1 + w norms, fused q|k|v and gate|up), the int-quantized export and its
    reading agree: the packed checkpoint scores as the model that wrote it."""
    from tiny_models import tiny_model

    src = tmp_path / "src"
    tiny_model(model_type, seed=1).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(src, QuantizeConfig(**W8A8, smoothquant=0.5))
    m.quantize(wiki_calibration)
    assert m.result.smoothquant
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    packed = qforge.load(tmp_path / "ct")
    assert packed.act_bits == 8 and len(packed.result.layers) == len(m.result.layers)
    ppl = [qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for q in (m, packed)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)


def test_w8a8_refuses_fused_experts(tmp_path, tiny_tokenizer):
    from tiny_models import tiny_model

    src = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    with pytest.raises(QForgeError, match="experts of fused parameters"):
        qforge.load(src, QuantizeConfig(**W8A8)).quantize(None)
    m = qforge.load(src, QuantizeConfig(**W8A8, skip=("*.experts.*",)))
    m.quantize(None)
    assert m.result.layers and not any(".experts." in n for n in m.result.layers)
