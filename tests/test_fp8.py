"""FP8: E4M3 weights with one scale per output channel (RTN and GPTQ), optionally with dynamic per-token FP8 inputs
(llm-compressor's FP8_DYNAMIC); compressed-tensors float-quantized export and loading; evaluation as served."""
from __future__ import annotations

import json

import pytest
import torch

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.eval import load_eval_text, perplexity
from qforge.eval.simulate import fake_quant_fp8_per_token, quantized_activations
from qforge.formats import compressed_tensors as ct
from qforge.kernels import Fp8Linear
from qforge.solvers import Grid, InputScheme, rtn
from qforge.solvers.gptq import gptq

FP8 = Grid(8, -1, True, fp8=True)
FP8_DYNAMIC = dict(method="rtn", bits=8, group_size=-1, sym=True, fp8=True, act_bits=8)
E4M3 = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[torch.isfinite(E4M3)].unique()                    # the 253 finite values (±0 once)


def _is_e4m3(x: torch.Tensor) -> bool:
    return bool(torch.isin(x.float(), E4M3).all())


@pytest.mark.parametrize("bad", [dict(bits=4), dict(sym=False)])
def test_an_fp8_grid_is_8_bit_symmetric(bad):
    with pytest.raises(ValueError, match="FP8 grid"):
        Grid(**{**dict(bits=8, group_size=-1, sym=True, fp8=True), **bad})


@pytest.mark.parametrize("bad,msg", [
    (dict(bits=4), "one scale per output channel"),
    (dict(group_size=128), "one scale per output channel"),
    (dict(method="awq", sym=True), "rtn or gptq"),
    (dict(method="gptq", bpw=6.0, act_bits=None), "integer schemes"),
    (dict(smoothquant=0.5), "int8 activations"),
])
def test_impossible_fp8_settings_are_refused(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig(**{**FP8_DYNAMIC, **bad})


def test_rtn_rounds_each_weight_to_the_nearest_e4m3_multiple_of_its_channel_scale():
    torch.manual_seed(0)
    W = torch.randn(32, 96) * torch.rand(32, 1) * 3
    W[3] = 0.0                                                  # a dead row keeps a finite scale
    q = rtn(W, FP8)
    assert q.codes.dtype == torch.float8_e4m3fn and q.scales.shape == (32, 1) and torch.all(q.zeros == 0)
    assert torch.allclose(q.scales[:, 0][W.abs().amax(1) > 0], W.abs().amax(1)[W.abs().amax(1) > 0] / 448)
    assert _is_e4m3(q.codes)
    # brute force: the nearest of every E4M3 value times the scale
    cand = (q.scales[:, :, None] * E4M3).expand(*W.shape, -1)   # [out, in, 253]
    nearest = cand.gather(2, (W[:, :, None] - cand).abs().argmin(2, keepdim=True))[..., 0]
    assert torch.equal(q.dequantize(), nearest)
    assert torch.equal(q.dequantize(), q.scales * q.codes.float())
    assert q.codes.float().abs().amax() == 448                  # the largest weight of a row lands on E4M3's max


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_the_fp8_grid_lowers_the_output_error_of_rtn(act_order):
    wins = 0
    for seed in range(4):
        torch.manual_seed(seed)
        W = torch.randn(48, 128)
        X = torch.randn(128, 1024) * torch.linspace(0.05, 3, 128)[:, None] + 0.5 * torch.randn(1, 1024)
        H = 2 * X @ X.T / X.shape[1]
        q = gptq(W, H, FP8, act_order=act_order, scale_search=True)
        assert q.codes.dtype == torch.float8_e4m3fn and _is_e4m3(q.codes)
        assert torch.equal(q.dequantize(), q.w_hat)             # the codes and scales give the solver's Ŵ exactly
        err = [((W - Wh) @ X).pow(2).sum() for Wh in (q.dequantize(), rtn(W, FP8).dequantize())]
        wins += bool(err[0] < err[1])
    assert wins == 4


def test_fake_quant_fp8_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.tensor([1e-3, 1.0, 300.0])[:, None, None]
    y = fake_quant_fp8_per_token(x)
    s = x.abs().amax(-1, keepdim=True) / 448
    def nearest(r):                                             # the nearest E4M3 value, by brute force
        return E4M3[(r[..., None] - E4M3).abs().argmin(-1)]

    torch.testing.assert_close(y / s, nearest(x / s), rtol=1e-6, atol=0)   # each value to its nearest E4M3 step
    assert torch.equal(nearest(y / s).abs().amax(-1), torch.full((3, 5), 448.0))
    assert ((y - x).abs() <= x.abs() / 16 + s * 2 ** -9).all()  # 3 mantissa bits; subnormals step 2^-9 · s
    with pytest.raises(QForgeError, match="must be 8 for FP8"):
        with quantized_activations(torch.nn.Module(), InputScheme(4, fp8=True)):
            pass


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("grid,rows,scale_shape", [(FP8, 48, (48, 1)),
                                                   (Grid(8, 32, True, fp8=True, block_rows=32), 80, (3, 2))])
def test_float_quantized_round_trip_is_bit_exact(grid, rows, scale_shape, act_bits):
    """Per channel, and in 32 x 32 blocks (one scale per tile, the last tile 16 rows high; inputs in groups of 32)."""
    torch.manual_seed(1)
    q = rtn(torch.randn(rows, 64) * torch.rand(rows, 1), grid)
    acts = None if act_bits is None else InputScheme(8, fp8=True, group_size=grid.block_rows or -1)
    t = ct.pack(q, torch.bfloat16, acts)
    assert set(t) == {"weight", "weight_scale"}
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == scale_shape
    back = ct.unpack(t, grid)
    assert torch.equal(back.codes.view(torch.uint8), q.codes.view(torch.uint8))
    assert torch.equal(back.scales, q.scales.bfloat16().float())
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor

    dense = FloatQuantizationCompressor.decompress(dict(t), ct._scheme(grid, ["Linear"], acts))["weight"]
    torch.testing.assert_close(dense.float(), back.dequantize().to(dense.dtype).float(), rtol=0, atol=0)
    qc = ct.build_config({"a": grid}, [], acts).model_dump()
    assert qc["format"] == "float-quantized" and qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    assert ct.input_acts(qc) == acts
    assert ct.grid_for(qc, "a") == grid


def test_fp8_linear_matches_its_layer_and_keeps_its_codes_through_to():
    torch.manual_seed(2)
    q = rtn(torch.randn(24, 40), FP8)
    lin = Fp8Linear.from_quant(q, torch.randn(24), torch.float32)
    x = torch.randn(3, 40)
    torch.testing.assert_close(lin(x), x @ q.dequantize().t() + lin.bias, rtol=1e-6, atol=1e-6)
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.dtype == torch.bfloat16
    assert torch.equal(lin.to_quant().codes.view(torch.uint8), q.codes.view(torch.uint8))
    assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_float_weights_other_tools_write_in_groups_are_refused():
    w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": 128}
    with pytest.raises(QForgeError, match="per channel, tensor or block"):
        ct.grid_for({"config_groups": {"g": {"targets": ["Linear"], "weights": w}}}, "x")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_fp8_dynamic_quantizes_exports_and_evaluates_as_served(method, tiny_llama_dir, wiki_excerpt, tmp_path):
    m = qforge.load(tiny_llama_dir, QuantizeConfig(**{**FP8_DYNAMIC, "method": method}))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    assert m.act_bits == 8 and m.act_fp8
    assert all(q.codes.dtype == torch.float8_e4m3fn for q in m.result.layers.values())
    out = m.save(tmp_path / "out")
    for fmt in ("gptq", "awq"):
        with pytest.raises(QForgeError, match="float-quantized"):
            m.export(tmp_path / fmt, fmt)
    sizes = m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    assert sizes["bits_per_weight"] == pytest.approx(8 + 32 / m.model.config.hidden_size, rel=0.2)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    assert qc["config_groups"]["group_0"]["input_activations"]["type"] == "float"

    packed = qforge.load(tmp_path / "ct")
    assert packed.act_bits == 8 and packed.act_fp8
    assert all(isinstance(packed.model.get_submodule(n), Fp8Linear) for n in packed.result.layers)
    saved = qforge.load(out)
    assert saved.act_fp8 and all(q.grid == FP8 for q in saved.result.layers.values())
    rows = {name: qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0] for name, q in
            (("packed", packed), ("saved", saved), ("memory", m))}
    assert rows["packed"]["act_fp8"] is True
    ppl = {k: r["ppl"] for k, r in rows.items()}
    assert ppl["packed"] == pytest.approx(ppl["saved"], rel=1e-4)
    assert ppl["saved"] == pytest.approx(ppl["memory"], rel=1e-5)
    # the inputs really are FP8 in that evaluation: the same weights score otherwise on unquantized or int8 inputs
    text = load_eval_text("wiki")
    assert abs(perplexity(packed.model, packed.tokenizer, text, 64, 2)["ppl"] - ppl["packed"]) > 1e-5 * ppl["packed"]
    with quantized_activations(packed.model, InputScheme(8), set(packed.result.layers)):
        assert abs(perplexity(packed.model, packed.tokenizer, text, 64, 2)["ppl"] - ppl["packed"]) > 1e-5


def test_fp8_weight_only_and_streamed(tiny_llama_dir, wiki_excerpt, tmp_path):
    """W8A16 FP8 (no act_bits): weight-only checkpoint; a streamed run gives the in-memory run's codes."""
    from runs import streamed_and_in_memory

    a, b = streamed_and_in_memory(tiny_llama_dir, QuantizeConfig(method="gptq", bits=8, group_size=-1, fp8=True),
                                  wiki_excerpt, tmp_path)
    assert a.act_bits is None and not a.act_fp8
    for n, q in b.result.layers.items():
        assert torch.equal(a.result.layers[n].codes.view(torch.uint8), q.codes.view(torch.uint8))
    ppl = [qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for q in (a, b)]
    assert ppl[0] == ppl[1]


def test_fp8_from_the_command_line(tiny_llama_dir, wiki_excerpt, tmp_path, capsys):
    from qforge.cli.main import main

    out, packed = tmp_path / "q", tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "8", "--group-size", "-1",
                 "--fp8", "--act-bits", "8", "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32",
                 "--out", str(out), "--format", "compressed-tensors", "--export-out", str(packed)]) == 0
    assert "gptq FP8 W8A8 per-channel sym" in capsys.readouterr().out
    assert json.loads((out / "qforge_config.json").read_text())["fp8"] is True
    again = tmp_path / "again"                                  # the saved output exports the same checkpoint
    assert main(["-q", "export", str(out), "--format", "compressed-tensors", "--out", str(again)]) == 0
    from safetensors.torch import load_file

    a, b = load_file(packed / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
                                        if a[k].dtype == torch.float8_e4m3fn else torch.equal(a[k], b[k]) for k in a)
    assert any(t.dtype == torch.float8_e4m3fn for t in a.values())
    assert main(["-q", "eval", str(packed), "--dataset", "wiki", "--seqlen", "32", "--max-windows", "2"]) == 0
    assert "quantized to fp8 per token" in capsys.readouterr().out
    assert main(["-q", "generate", str(packed), "--prompt", "The city", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["quantize", str(tiny_llama_dir), "--fp8", "--out", str(tmp_path / "bad")]) == 2
    assert "one scale per output channel" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_simulated_fp8_is_the_fp8_dynamic_rtn_model(tiny_llama_dir):
    """eval --w-bits 8 --act-bits 8 --fp8 on the fp model scores what the quantized FP8_DYNAMIC RTN model scores."""
    sim = qforge.SimulationConfig(weight_bits=8, act_bits=8, fp8=True)
    assert sim.label == "FP8 W8A8"
    simulated = qforge.evaluate(qforge.load(tiny_llama_dir), "wiki", seqlen=64, max_windows=2, simulate=sim)[0]
    m = qforge.load(tiny_llama_dir, QuantizeConfig(**FP8_DYNAMIC))
    m.quantize(None)
    assert simulated["ppl"] == qforge.evaluate(m, "wiki", seqlen=64, max_windows=2)[0]["ppl"]
    int8 = qforge.SimulationConfig(weight_bits=8, act_bits=8)
    assert qforge.evaluate(qforge.load(tiny_llama_dir), "wiki", seqlen=64, max_windows=2,
                           simulate=int8)[0]["ppl"] != simulated["ppl"]
    for bad in (dict(weight_bits=4), dict(weight_bits=8, weight_group_size=32), dict(act_bits=4), dict()):
        with pytest.raises(QForgeError, match="simulated FP8"):
            qforge.SimulationConfig(fp8=True, **{"act_bits": 8, **bad} if bad else {})


def test_an_fp8_kv_cache_holds_e4m3_keys_and_values(tiny_llama_dir):
    from qforge.eval.simulate import QuantizedKVCache

    m = qforge.load(tiny_llama_dir).model
    x = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    cache = QuantizedKVCache(m.config, 8, fp8=True)
    with torch.no_grad():
        out = m(input_ids=x, past_key_values=cache, use_cache=True).logits
        base = m(input_ids=x).logits
    for layer in cache.layers:
        assert _is_e4m3(layer.keys) and _is_e4m3(layer.values)   # per-tensor scale 1: the values themselves
    assert 0 < (out - base).abs().max() < 0.1 * base.abs().max()
    sim = qforge.SimulationConfig(kv_bits=8, kv_fp8=True)
    assert sim.label == "W16A16 KV FP8"
    with pytest.raises(QForgeError, match="FP8 KV cache is 8 bits"):
        qforge.SimulationConfig(kv_bits=4, kv_fp8=True)


def test_eval_simulates_fp8_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    from qforge.cli.main import main

    js = tmp_path / "r.json"
    assert main(["-q", "eval", str(tiny_llama_dir), "--dataset", "wiki", "--seqlen", "32", "--max-windows", "2",
                 "--w-bits", "8", "--act-bits", "8", "--fp8", "--kv-fp8", "--json", str(js)]) == 0
    assert "simulated FP8 W8A8 KV FP8" in capsys.readouterr().out
    sim = json.loads(js.read_text())[0]["simulation"]
    assert sim["fp8"] and sim["kv_fp8"] and sim["kv_bits"] == 8


def test_fp8_weights_of_fused_experts_export_and_load(tiny_tokenizer, wiki_calibration, tmp_path):
    """Mixtral's experts (3-D parameters): FP8 weight-only rounds them, writes them one float-quantized module per
    expert and reads them back fused; W8A8 FP8 refuses them, as int8 W8A8 does (their inputs are not modules')."""
    from tiny_models import tiny_model

    src = tmp_path / "src"
    tiny_model("mixtral", seed=1).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(src, QuantizeConfig(method="gptq", bits=8, group_size=-1, fp8=True))
    m.quantize(wiki_calibration)
    experts = [n for n in m.result.layers if ".experts." in n]
    assert experts and all(m.result.layers[n].codes.dtype == torch.float8_e4m3fn for n in experts)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    packed = qforge.load(tmp_path / "ct")
    assert packed.act_bits is None and all(q.grid == FP8 for q in packed.result.layers.values())
    ppl = [qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for q in (m, packed)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)
    with pytest.raises(QForgeError, match="experts of fused parameters"):
        qforge.load(src, QuantizeConfig(**FP8_DYNAMIC)).quantize(None)
