"""NVFP4 weights (llm-compressor's NVFP4A16): E2M1 codes in groups of 16, E4M3 group scales over a per-tensor global
scale shared by the linears engines fuse; RTN and GPTQ, compressed-tensors nvfp4-pack-quantized export and loading;
NVFP4 inputs (NVFP4, W4A4). Some tests also take the MX grids and presets."""
from __future__ import annotations

import json

import pytest
import torch

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.formats import compressed_tensors as ct
from qforge.kernels import Fp8Linear
from qforge.solvers import Grid, rtn
from qforge.solvers.gptq import gptq
from qforge.solvers.grid import E2M1, nvfp4_global_scale, to_e2m1, to_e4m3

NVFP4 = Grid(4, 16, True, fp4=True)
NVFP4A16 = dict(method="rtn", bits=4, group_size=16, sym=True, nvfp4=True)
E4M3 = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[torch.isfinite(E4M3)].unique()


@pytest.mark.parametrize("bad", [dict(bits=8), dict(sym=False), dict(group_size=-1)])
def test_an_nvfp4_grid_is_4_bit_symmetric_in_groups(bad):
    with pytest.raises(ValueError, match="FP4 grid"):
        Grid(**{**dict(bits=4, group_size=16, sym=True, fp4=True), **bad})


@pytest.mark.parametrize("bad,msg", [
    (dict(group_size=32), "groups of 16"),
    (dict(bits=8), "groups of 16"),
    (dict(method="awq"), "rtn or gptq"),
    (dict(method="gptq", bpw=4.5), "integer schemes"),
])
def test_impossible_nvfp4_settings_are_refused(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig(**{**NVFP4A16, **bad})


def test_e2m1_rounding_is_to_the_nearest_code_ties_to_even():
    values = torch.tensor(E2M1)
    x = torch.cat([torch.linspace(-8, 8, 4001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    x = torch.cat([x, -x])
    got = to_e2m1(x)
    cand = torch.cat([values, -values])
    dist = (x[:, None] - cand).abs()
    best = dist.min(1).values
    assert torch.equal((got - x).abs(), best)                 # always a nearest code
    ties = (dist == best[:, None]).sum(1) > 1                  # at a tie, the code with an even mantissa
    even = torch.tensor([0.0, 1.0, 2.0, 4.0])
    assert torch.isin(got[ties].abs(), even).all() and ties.sum() >= 14
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    y = torch.randn(10000) * 4
    assert torch.equal(to_e2m1(y), cast_to_fp4(y.clone()))   # the library's rounding, ties included


def test_rtn_scales_are_e4m3_numbers_in_units_of_the_global_scale():
    torch.manual_seed(0)
    W = torch.randn(32, 64) * torch.rand(32, 1) * 0.1
    W[5, 16:32] = 0.0                                          # a group of zeros: scale 0.125 (the library's)
    q = rtn(W, NVFP4)
    g = float(q.global_scale)
    assert g == nvfp4_global_scale(W) == float(torch.tensor(448.0 * 6) / W.abs().max())
    s8 = q.scales
    assert torch.isin(s8, E4M3).all() and s8[5, 1] == 0.125 and s8.max() == 448   # the largest group: E4M3's max
    assert torch.isin(q.codes.float(), torch.tensor(E2M1 + tuple(-v for v in E2M1))).all()
    # each group's scale is g · absmax / 6 rounded to E4M3, and each weight its nearest code
    live = W.abs().reshape(32, 4, 16).amax(-1) > 0
    assert torch.equal(s8[live], to_e4m3((g * W).abs().reshape(32, 4, 16).amax(-1)[live] / 6).float())
    assert torch.equal(q.codes.float(), to_e2m1(g * W / s8.repeat_interleave(16, 1)))
    assert torch.equal(q.dequantize(), s8.repeat_interleave(16, 1) * q.codes.float() / g)


@pytest.mark.parametrize("grid", [NVFP4, Grid(4, 32, True, fp4=True, mx=True), Grid(8, 32, True, fp8=True, mx=True)],
                         ids=["NVFP4", "MXFP4", "MXFP8"])
@pytest.mark.parametrize("opts", [dict(), dict(scale_search=True), dict(group_aware=True, scale_search=True)])
def test_gptq_on_float_grids_beats_rtn_exactly_on_its_own_grid(grid, opts):
    wins = 0
    for seed in range(3):
        torch.manual_seed(seed)
        W = torch.randn(48, 128) * 0.05
        X = torch.randn(128, 1024) * torch.linspace(0.05, 3, 128)[:, None] + 0.5 * torch.randn(1, 1024)
        q = gptq(W, 2 * X @ X.T / X.shape[1], grid, **opts)
        assert torch.equal(q.dequantize(), q.w_hat)             # codes, scales (and g) give the solver's Ŵ exactly
        if grid.mx:                                             # powers of two, no global scale
            assert torch.equal(2.0 ** torch.log2(q.scales).round(), q.scales) and q.global_scale is None
        else:
            assert torch.isin(q.scales, E4M3).all()
        err = [((W - Wh) @ X).pow(2).sum() for Wh in (q.dequantize(), rtn(W, grid).dequantize())]
        wins += bool(err[0] < err[1])
    assert wins == 3


def test_nvfp4_round_trip_is_bit_exact_and_decompresses_as_the_library_does():
    torch.manual_seed(1)
    q = rtn(torch.randn(48, 64) * torch.rand(48, 1), NVFP4)
    t = ct.pack(q, torch.bfloat16)
    assert set(t) == {"weight_packed", "weight_scale", "weight_global_scale"}
    assert t["weight_packed"].shape == (48, 32) and t["weight_scale"].dtype == torch.float8_e4m3fn
    back = ct.unpack(t, NVFP4)
    assert torch.equal(back.codes.view(torch.uint8), q.codes.view(torch.uint8))
    assert torch.equal(back.scales, q.scales) and torch.equal(back.global_scale, q.global_scale)
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    dense = NVFP4PackedCompressor.decompress(dict(t), ct._scheme(NVFP4, ["Linear"]))["weight"]
    # the library multiplies by s8 / g (then rounds to bf16), qforge divides s8 · code by g: an ulp or two apart
    torch.testing.assert_close(dense.float(), back.dequantize(), rtol=2 ** -7, atol=0)
    qc = ct.build_config({"a": NVFP4}, []).model_dump()
    assert qc["format"] == "nvfp4-pack-quantized" and ct.grid_for(qc, "a") == NVFP4
    lin = Fp8Linear.from_quant(back, None, torch.float32)
    assert torch.equal(lin.dequantized(torch.float32), back.dequantize())
    t["weight_scale"] = t["weight_scale"][:, :3]
    with pytest.raises(QForgeError, match=r"needs a \[48, 4\] weight_scale"):
        ct.unpack(t, NVFP4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nvfp4_quantizes_exports_and_evaluates(method, tiny_llama_dir, wiki_excerpt, tmp_path):
    m = qforge.load(tiny_llama_dir, QuantizeConfig(**{**NVFP4A16, "method": method}))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    layers = m.result.layers
    assert all(q.grid == NVFP4 and q.codes.dtype == torch.float8_e4m3fn for q in layers.values())
    # the linears engines fuse (q/k/v, gate/up) share one global scale, the largest their weights allow
    for block in range(2):
        for fused in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            gs = {float(layers[f"model.layers.{block}.{n}"].global_scale) for n in fused}
            assert len(gs) == 1
    out = m.save(tmp_path / "out")
    with pytest.raises(QForgeError, match="nvfp4-pack-quantized"):
        m.export(tmp_path / "gptq", "gptq")
    sizes = m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    assert sizes["bits_per_weight"] == pytest.approx(4.5, abs=0.1)          # 4-bit codes + an 8-bit scale per 16
    assert m.storage()["bits_per_weight"] == pytest.approx(sizes["bits_per_weight"], rel=1e-3)   # as counted
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "tensor_group"
    packed, saved = qforge.load(tmp_path / "ct"), qforge.load(out)
    for name, q in layers.items():
        assert torch.equal(packed.result.layers[name].global_scale, q.global_scale)
        assert torch.equal(saved.result.layers[name].scales, q.scales)
        assert isinstance(packed.model.get_submodule(name), Fp8Linear)
    ppl = [qforge.evaluate(x, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for x in (m, saved, packed)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5) and ppl[2] == pytest.approx(ppl[0], rel=1e-4)


@pytest.mark.parametrize("scheme", ["NVFP4A16", "NVFP4", "MXFP4A16"])
def test_float4_streamed_gives_the_in_memory_codes(scheme, tiny_llama_dir, wiki_excerpt, tmp_path):
    from runs import streamed_and_in_memory

    a, b = streamed_and_in_memory(tiny_llama_dir, QuantizeConfig.from_scheme(scheme, method="gptq"), wiki_excerpt,
                                  tmp_path)
    for n, q in b.result.layers.items():
        assert torch.equal(a.result.layers[n].codes.view(torch.uint8), q.codes.view(torch.uint8))
        assert torch.equal(a.result.layers[n].scales, q.scales)
        assert (a.result.layers[n].input_scale is None) == (scheme != "NVFP4")      # W4A4: the input global scales
        if scheme == "NVFP4":
            assert torch.equal(a.result.layers[n].input_scale, q.input_scale)


@pytest.mark.parametrize("scheme,label,field,bad,msg", [
    ("NVFP4A16", "W4 NVFP4 g16", "nvfp4", ["--nvfp4"], "groups of 16"),
    ("MXFP8A16", "W8 MXFP8 g32", "mx", ["--mx", "--bits", "4"], "groups of 32"),
    ("NVFP4", "W4A4 (static input scales) NVFP4 g16", "nvfp4", ["--nvfp4", "--group-size", "16", "--act-bits", "4"],
     "act_static"),
])
def test_float_schemes_from_the_command_line(scheme, label, field, bad, msg, tiny_llama_dir, wiki_excerpt, tmp_path,
                                             capsys):
    from qforge.cli.main import main

    out, packed = tmp_path / "q", tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--scheme", scheme, "--method", "gptq",
                 "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32", "--out", str(out),
                 "--format", "compressed-tensors", "--export-out", str(packed)]) == 0
    assert f"gptq {label} sym" in capsys.readouterr().out
    assert json.loads((out / "qforge_config.json").read_text())[field] is True
    assert main(["-q", "eval", str(packed), "--dataset", "wiki", "--eval-seqlen", "32", "--max-windows", "1"]) == 0
    assert main(["quantize", str(tiny_llama_dir), *bad, "--out", str(tmp_path / "bad")]) == 2
    assert msg in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), "--scheme", scheme, "--format", "gptq",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "export as compressed-tensors" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_nvfp4_inputs_are_the_librarys_fake_quantization():
    """NVFP4 inputs: the global scale is compressed-tensors' generate_gparam of the largest |x|, and each token's groups
    of 16 are its fake_quantize under that global scale, bit for bit."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    from qforge.eval.simulate import fake_quant_nvfp4
    from qforge.solvers.grid import InputScheme
    from qforge.solvers.input_scale import nvfp4_input_scale

    acts = InputScheme(4, False, True, 16, fp4=True)
    args = ct._scheme(NVFP4, ["Linear"], acts).input_activations
    assert args.dynamic == "local" and args.strategy == "tensor_group" and args.group_size == 16
    torch.manual_seed(4)
    x = torch.randn(5, 7, 64) * torch.logspace(-2, 1, 64)
    x[0, 0, :16] = 0.0
    g = nvfp4_input_scale(x.abs().amax())
    assert torch.equal(g, generate_gparam(x.amin(), x.amax()))
    groups = x.reshape(35, 4, 16)
    s, z = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=g)
    ref = fake_quantize(x.reshape(35, 64), s, z, args, global_scale=g).reshape(x.shape)
    got = fake_quant_nvfp4(x, g, 16)
    assert torch.equal(got, ref) and not torch.equal(got, x)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nvfp4_inputs_quantize_export_and_evaluate_as_the_model_runs(method, tiny_llama_dir, wiki_excerpt, tmp_path):
    cfg = QuantizeConfig.from_scheme("NVFP4", method=method)
    assert cfg.input_scheme.fp4 and cfg.input_scheme.static and cfg.input_scheme.group_size == 16
    m = qforge.load(tiny_llama_dir, cfg)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    scales = m.input_scales
    assert scales.keys() == m.result.layers.keys() and all(float(g) > 0 for g in scales.values())
    for block in range(2):          # q/k/v read one input: one input global scale, and one weight global scale
        qkv = [f"model.layers.{block}.self_attn.{p}_proj" for p in "qkv"]
        assert len({float(scales[n]) for n in qkv}) == 1
        assert len({float(m.result.layers[n].global_scale) for n in qkv}) == 1
    out = m.save(tmp_path / "out")
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["strategy"] == "tensor_group" and acts["dynamic"] == "local" and acts["num_bits"] == 4
    packed, saved = qforge.load(tmp_path / "ct"), qforge.load(out)
    assert packed.input_scheme == saved.input_scheme == m.input_scheme
    for name, g in scales.items():
        assert torch.equal(packed.input_scales[name], g) and torch.equal(saved.input_scales[name], g)
    rows = [qforge.evaluate(x, "wiki", seqlen=64, max_windows=2)[0] for x in (m, saved, packed)]
    assert rows[0]["act_format"] == "NVFP4" and rows[0]["act_group_size"] == 16
    assert rows[1]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-5)
    assert rows[2]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-4)
    for q in m.result.layers.values():        # the same weights on unquantized inputs
        q.input_scale = None
    m.config = QuantizeConfig.from_scheme("NVFP4A16", method=method)
    plain = qforge.evaluate(m, "wiki", seqlen=64, max_windows=2)[0]["ppl"]
    assert abs(plain - rows[0]["ppl"]) > 1e-3 * plain


@pytest.mark.parametrize("bad,msg", [(dict(act_static=False), "act_static"), (dict(act_observer="mse"), "max"),
                                     (dict(act_bits=8), "NVFP4 inputs")])
def test_impossible_nvfp4_input_settings_are_refused(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig.from_scheme("NVFP4", **bad)
