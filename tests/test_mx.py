"""MX weights (the OCP microscaling formats; llm-compressor's MXFP4A16 and MXFP8A16): E2M1 or E4M3 codes in groups of
32 with power-of-two (E8M0) scales; RTN and GPTQ, compressed-tensors mxfp4-pack-quantized / mxfp8-quantized export
and loading."""
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
from qforge.solvers.grid import mx_exponent, search_params

MXFP4 = Grid(4, 32, True, fp4=True, mx=True)
MXFP8 = Grid(8, 32, True, fp8=True, mx=True)
SCHEMES = {"MXFP4A16": MXFP4, "MXFP8A16": MXFP8}


def _codes(grid: Grid) -> torch.Tensor:
    """Every code of the grid's element format."""
    from qforge.solvers.grid import E2M1

    if grid.fp4:
        return torch.tensor(E2M1 + tuple(-v for v in E2M1))
    e4m3 = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return e4m3[torch.isfinite(e4m3)]


@pytest.mark.parametrize("bad", [dict(group_size=-1), dict(fp4=False), dict(block_rows=32, fp4=False, fp8=True,
                                                                                    bits=8)])
def test_an_mx_grid_has_float_codes_in_groups(bad):
    with pytest.raises(ValueError, match="(MX|FP4) grid"):
        Grid(**{**dict(bits=4, group_size=32, sym=True, fp4=True, mx=True), **bad})


@pytest.mark.parametrize("bad,msg", [
    (dict(group_size=16), "groups of 32"),
    (dict(bits=8), "groups of 32"),                 # 8-bit MX needs fp8
    (dict(sym=False), "groups of 32"),
    (dict(nvfp4=True, group_size=16), "nvfp4"),
    (dict(method="awq"), "rtn or gptq"),
    (dict(method="gptq", bpw=4.5), "integer schemes"),
])
def test_impossible_mx_settings_are_refused(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig(**{**QuantizeConfig.from_scheme("MXFP4A16").to_dict(), **bad})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_presets_give_the_mx_grids(scheme):
    assert QuantizeConfig.from_scheme(scheme).grid == SCHEMES[scheme]


@pytest.mark.parametrize("grid", SCHEMES.values(), ids=SCHEMES)
def test_rtn_scales_are_the_librarys_powers_of_two(grid):
    """compressed-tensors' qparams for the same groups are qforge's scales, and its fake quantization qforge's Ŵ:
    an RTN export is llm-compressor's to the bit."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    W = torch.randn(64, 128) * torch.rand(64, 1) * torch.logspace(-3, 1, 64)[:, None]
    W[3, :32] = 0.0                                              # a group of zeros
    W[4, 40] = 1.75 * 2.0 ** -3                                  # an absmax exactly where the exponent rounds up
    W[5, 70] = 1.7499 * 2.0 ** -3
    q = rtn(W, grid)
    s, z = calculate_qparams(W.reshape(64, 4, 32).amin(-1), W.reshape(64, 4, 32).amax(-1), ct._args(grid))
    assert torch.equal(q.scales, s) and torch.equal(q.dequantize(), fake_quantize(W, s, z, ct._args(grid)))
    assert torch.isin(q.codes.float(), _codes(grid)).all()
    m, _ = torch.frexp(q.scales)
    assert torch.all(m == 0.5)                                   # powers of two
    ratio = W.abs().reshape(64, 4, 32).amax(-1) / q.scales       # the absmax lands in [3.5, 7) or [224, 448) codes
    lo = 3.5 if grid.fp4 else 224.0
    assert torch.all((ratio[ratio > 0] >= lo) & (ratio[ratio > 0] < 2 * lo))
    assert q.scales[3, 0] == 2.0 ** -127 and torch.all(q.codes[3, :32].float() == 0)


@pytest.mark.parametrize("grid", SCHEMES.values(), ids=SCHEMES)
def test_the_range_search_keeps_powers_of_two_and_never_loses_to_min_max(grid):
    torch.manual_seed(1)
    W = torch.randn(64, 32) * torch.rand(64, 1)
    c = torch.rand(32) + 0.1
    s0 = rtn(W, grid).scales[:, 0]
    s, _ = search_params(W, grid, c)
    assert set((s / s0).unique().tolist()) <= {0.5, 1.0, 2.0}
    mx_exponent(s)                                               # E8M0 numbers

    def err(scale):
        from qforge.solvers.grid import quantize

        codes = quantize(W, scale, torch.zeros_like(scale), grid)
        return ((codes * scale[:, None] - W) ** 2 * c).sum(1)
    assert torch.all(err(s) <= err(s0))
    assert torch.any(err(s) < err(s0)) or grid.fp8            # E4M3's min-max range is rarely beaten


def test_e8m0_bytes_refuse_what_is_not_a_power_of_two():
    assert mx_exponent(torch.tensor([2.0 ** -127, 1.0, 0.25, 2.0 ** 127])).tolist() == [0, 127, 125, 254]
    for bad in (0.3, 0.0, float("inf"), float("nan")):
        with pytest.raises(QForgeError, match="powers of two"):
            mx_exponent(torch.tensor([1.0, bad]))


@pytest.mark.parametrize("grid", SCHEMES.values(), ids=SCHEMES)
def test_mx_round_trip_is_bit_exact_and_decompresses_as_the_library_does(grid):
    torch.manual_seed(2)
    q = rtn(torch.randn(48, 64) * torch.rand(48, 1), grid)
    t = ct.pack(q)
    key = "weight_packed" if grid.fp4 else "weight"
    assert set(t) == {key, "weight_scale"} and t["weight_scale"].dtype == torch.uint8
    assert t[key].shape == ((48, 32) if grid.fp4 else (48, 64)) and t["weight_scale"].shape == (48, 2)
    assert torch.equal(t["weight_scale"], mx_exponent(q.scales))
    back = ct.unpack(t, grid)
    assert torch.equal(back.codes.view(torch.uint8), q.codes.view(torch.uint8)) and torch.equal(back.scales, q.scales)
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor

    compressor = MXFP4PackedCompressor if grid.fp4 else MXFP8QuantizationCompressor
    dense = compressor.decompress(dict(t), ct._scheme(grid, ["Linear"]))["weight"]
    assert torch.equal(dense.float(), back.dequantize())        # powers of two: bf16 holds the products exactly
    qc = ct.build_config({"a": grid}, []).model_dump()
    assert qc["format"] == ("mxfp4-pack-quantized" if grid.fp4 else "mxfp8-quantized")
    assert ct.grid_for(json.loads(json.dumps(qc, default=str)), "a") == grid
    lin = Fp8Linear.from_quant(back, None, torch.float32)
    assert torch.equal(lin.dequantized(torch.float32), back.dequantize())
    bad = dict(t, weight_scale=t["weight_scale"][:, :1])
    with pytest.raises(QForgeError, match=r"needs a \[48, 2\] weight_scale"):
        ct.unpack(bad, grid)
    bad = dict(t, weight_scale=torch.full_like(t["weight_scale"], 255))   # E8M0's NaN
    with pytest.raises(QForgeError, match="NaN"):
        ct.unpack(bad, grid)


@pytest.mark.parametrize("scheme,method", [("MXFP4A16", "rtn"), ("MXFP4A16", "gptq"), ("MXFP8A16", "gptq")])
def test_mx_quantizes_exports_and_evaluates(scheme, method, tiny_llama_dir, wiki_excerpt, tmp_path):
    grid = SCHEMES[scheme]
    m = qforge.load(tiny_llama_dir, QuantizeConfig.from_scheme(scheme, method=method))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    layers = m.result.layers
    assert all(q.grid == grid and q.codes.dtype == torch.float8_e4m3fn for q in layers.values())
    out = m.save(tmp_path / "out")
    with pytest.raises(QForgeError, match="MX weights export as compressed-tensors"):
        m.export(tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()
    sizes = m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    assert sizes["bits_per_weight"] == pytest.approx(grid.bits + 0.25, abs=0.1)   # codes + an 8-bit scale per 32
    assert m.storage()["bits_per_weight"] == pytest.approx(sizes["bits_per_weight"], rel=1e-3)   # as counted
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("mxfp4-pack-quantized" if grid.fp4 else "mxfp8-quantized")
    packed, saved = qforge.load(tmp_path / "ct"), qforge.load(out)
    for name, q in layers.items():
        assert torch.equal(packed.result.layers[name].scales, q.scales)
        assert torch.equal(saved.result.layers[name].codes.view(torch.uint8), q.codes.view(torch.uint8))
        assert isinstance(packed.model.get_submodule(name), Fp8Linear)
    ppl = [qforge.evaluate(x, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for x in (m, saved, packed)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5) and ppl[2] == pytest.approx(ppl[0], rel=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_mx_inputs_are_the_librarys_dynamic_mx_quantization(bits):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from qforge.eval.simulate import fake_quant_mx
    from qforge.solvers.grid import InputScheme

    acts = InputScheme(bits, bits == 8, False, 32, mx=True)
    args = ct._scheme(acts.grid, ["Linear"], acts).input_activations
    assert args.dynamic is True and args.strategy == "group" and args.group_size == 32
    torch.manual_seed(3)
    x = torch.randn(5, 7, 96) * torch.logspace(-2, 1, 96)
    x[0, 0, :32] = 0.0
    s, z = calculate_qparams(x.unflatten(-1, (3, 32)).amin(-1), x.unflatten(-1, (3, 32)).amax(-1), args)
    ref = fake_quantize(x.reshape(35, 96), s.reshape(35, 3), z.reshape(35, 3), args).reshape(x.shape)
    got = fake_quant_mx(x, bits, 32)
    assert torch.equal(got, ref) and not torch.equal(got, x)
    ragged = fake_quant_mx(x[..., :80], bits, 32)               # a shorter last group: as if padded with zeros
    assert torch.equal(ragged[..., :64], got[..., :64])


def test_mx_inputs_settings():
    cfg = QuantizeConfig.from_scheme("MXFP4")
    assert cfg.input_scheme.mx and cfg.input_scheme.bits == 4 and cfg.input_scheme.group_size == 32
    assert QuantizeConfig.from_scheme("MXFP8").input_scheme.grid == MXFP8
    for bad, msg in [(dict(act_bits=8), "MX inputs"), (dict(act_bits=4, act_static=True), "MX inputs"),
                     (dict(act_bits=4, smoothquant=0.5), "MX inputs take")]:
        with pytest.raises(QForgeError, match=msg):
            QuantizeConfig.from_scheme("MXFP4A16", **bad)
    with pytest.raises(QForgeError, match="act_bits must be 8"):
        QuantizeConfig(bits=4, group_size=32, act_bits=4)        # int4 inputs: not an MX scheme


@pytest.mark.parametrize("scheme", ["MXFP4", "MXFP8"])
def test_mx_inputs_quantize_export_and_evaluate_as_the_model_runs(scheme, tiny_llama_dir, tmp_path):
    m = qforge.load(tiny_llama_dir, QuantizeConfig.from_scheme(scheme))
    m.quantize()
    assert m.input_scheme.mx and m.act_bits == SCHEMES[scheme + "A16"].bits
    out = m.save(tmp_path / "out")
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["strategy"] == "group" and acts["group_size"] == 32 and acts["dynamic"] is True
    packed, saved = qforge.load(tmp_path / "ct"), qforge.load(out)
    assert packed.input_scheme == saved.input_scheme == m.input_scheme
    rows = [qforge.evaluate(x, "wiki", seqlen=64, max_windows=2)[0] for x in (m, saved, packed)]
    assert rows[0]["act_format"] == "MX" and rows[0]["act_group_size"] == 32
    assert rows[1]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-5)
    assert rows[2]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-4)
    weights_only = qforge.load(tiny_llama_dir, QuantizeConfig.from_scheme(scheme + "A16"))
    weights_only.quantize()
    plain = qforge.evaluate(weights_only, "wiki", seqlen=64, max_windows=2)[0]["ppl"]
    assert abs(plain - rows[0]["ppl"]) > 1e-4 * plain                # the inputs' rounding shows
