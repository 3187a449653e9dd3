"""Packed formats: bit-exact pack/unpack round trips, documented layouts, QuantLinear vs its reference,
qforge's exports loading back, and clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.formats import FORMATS, awq, gptq
from qforge.formats.bitpack import pack_int32, unpack_int32
from qforge.kernels import QuantLinear, dequantize_packed, matmul_reference
from qforge.solvers import Grid, LayerQuant, rtn


def random_quant(out_f, in_f, bits, group, sym, act_order=False, seed=0) -> LayerQuant:
    g = torch.Generator().manual_seed(seed)
    grid = Grid(bits, group, sym)
    G = grid.n_groups(in_f)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    zeros = (torch.full((out_f, G), float(2 ** (bits - 1))) if sym
             else torch.randint(0, 2**bits, (out_f, G), generator=g).float())
    scales = (torch.rand(out_f, G, generator=g) * 0.1 + 1e-3).half().float()   # fp16-representable
    g_idx = torch.arange(in_f, dtype=torch.int32) // grid.group_len(in_f)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return LayerQuant(grid, codes, scales, zeros, g_idx, info={})


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_round_trip_random_shapes(bits):
    g = torch.Generator().manual_seed(bits)
    for _ in range(5):
        rows, runs = torch.randint(1, 9, (2,), generator=g).tolist()
        v = torch.randint(0, 2**bits, (rows, 32 * runs), generator=g)
        p = pack_int32(v, bits)
        assert p.dtype == torch.int32 and p.shape == (rows, runs * bits)
        assert torch.equal(unpack_int32(p, bits), v)
        assert torch.equal(unpack_int32(pack_int32(v.t(), bits, dim=0), bits, dim=0), v.t())
        small = unpack_int32(p, bits, dtype=torch.uint8)                  # codes' own dtype
        assert small.dtype == torch.uint8 and torch.equal(small.long(), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_unpacked_in_chunks_and_transposed(bits):
    """bitpack.unpack_codes_t (GPTQ's qweight -> codes [out, in]) at chunk sizes that leave a ragged last chunk."""
    from qforge.formats.bitpack import unpack_codes_t

    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (32 * 7, 24), generator=g)           # [in, out]: 7 runs of 32 rows
    p = pack_int32(v, bits, dim=0)
    for chunk in (1, 32 * 24 * 2, 32 * 24 * 3, 1 << 20):
        got = unpack_codes_t(p, bits, chunk=chunk)
        assert got.dtype == torch.uint8 and got.is_contiguous() and torch.equal(got.long(), v.t())


@pytest.mark.parametrize("fmt,grid", [("gptq", Grid(3, 128, False)), ("compressed-tensors", Grid(8, 128, True)),
                                      ("compressed-tensors", Grid(4, 64, False)), ("awq", Grid(4, 64, False))])
def test_a_layer_unpacked_in_several_chunks_round_trips(fmt, grid):
    """Layers wide and tall enough that the formats unpack their codes in several ~1M-code chunks, a ragged one
    last: the codes, scales and zeros packed."""
    q = rtn(torch.randn(608, 4096, generator=torch.Generator().manual_seed(grid.bits)), grid)
    got = FORMATS[fmt].unpack(FORMATS[fmt].pack(q), grid)
    assert torch.equal(got.codes, q.codes) and torch.equal(got.zeros, q.zeros)
    torch.testing.assert_close(got.scales, q.scales.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitpack_equals_compressed_tensors_packer(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    v = torch.randint(0, 2**bits, (6, 128), generator=torch.Generator().manual_seed(1))
    assert torch.equal(pack_int32(v, bits), pack_to_int32((v - 2 ** (bits - 1)).to(torch.int8), bits))


def test_bitpack_layout_by_hand():
    v = torch.arange(8).repeat(4).view(1, 32) % 16               # 0..7 repeated
    assert pack_int32(v, 4)[0, 0].item() == 0x76543210            # value j at shift 4j
    three = torch.zeros(1, 32, dtype=torch.int64)
    three[0, 10] = 0b101                                          # straddles words 0 and 1
    words = pack_int32(three, 3)[0].tolist()
    assert words[0] == 0b01 << 30 and words[1] == 0b1 and words[2] == 0
    with pytest.raises(QForgeError, match="multiple of 32"):
        pack_int32(torch.zeros(1, 31, dtype=torch.int64), 4)
    with pytest.raises(QForgeError, match="range"):
        pack_int32(torch.full((1, 32), 16), 4)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_round_trips_are_bit_exact(fmt):
    g = torch.Generator().manual_seed(3)
    for trial in range(12):
        bits = 4 if fmt == "awq" else [2, 3, 4, 8][trial % 4]
        out_f, in_f = 32 * int(torch.randint(1, 5, (1,), generator=g)), 32 * int(torch.randint(1, 5, (1,), generator=g))
        group = [-1, 32, in_f][trial % 3]
        sym = fmt != "awq" and trial % 2 == 0
        act_order = fmt == "gptq" and trial % 4 == 1
        q = random_quant(out_f, in_f, bits, group, sym, act_order, seed=trial)
        r = FORMATS[fmt].unpack(FORMATS[fmt].pack(q), q.grid)
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(r, field).to(getattr(q, field).dtype), getattr(q, field)), (fmt, trial, field)
        assert torch.equal(r.dequantize(), q.dequantize())


def test_gptq_v1_zero_convention_and_shapes():
    q = random_quant(64, 96, 4, 32, sym=True)
    t = gptq.pack(q)
    assert t["qweight"].shape == (96 * 4 // 32, 64) and t["qzeros"].shape == (3, 64 * 4 // 32)
    assert t["scales"].shape == (3, 64) and t["scales"].dtype == torch.float16
    assert (t["qzeros"] == 0x77777777).all()                      # zero 8 stored as 8 - 1 in every field
    assert torch.equal(gptq.unpack({**t, "qzeros": pack_int32(torch.full((3, 64), 8), 4)}, q.grid, v1=False).zeros,
                       q.zeros)


def test_gptq_v1_three_bit_zeros_shift_each_field():
    """3-bit fields straddle int32 words (10 | 1 | 10 | 1 | 10), so v1's "zero - 1" is taken per field
    (mod 8), as GPTQModel reads it, not by subtracting a packed pattern word by word."""
    q = random_quant(64, 96, 3, 32, sym=False)
    zeros = torch.arange(64 * 3).reshape(64, 3) % 8                # every value, zero included, in straddling fields
    q = LayerQuant(q.grid, q.codes, q.scales, zeros.float(), q.g_idx, {})
    t = gptq.pack(q)
    fields = unpack_int32(t["qzeros"], 3, dim=1)                   # [G, out], per field as a reader decodes them
    assert torch.equal(fields.long(), ((zeros.t() - 1) % 8).long())
    assert torch.equal(gptq.unpack(t, q.grid).zeros, q.zeros)


def test_awq_interleaved_order():
    q = random_quant(32, 32, 4, 32, sym=False)
    q.codes = torch.arange(32).remainder(16).repeat(32, 1).t().contiguous().to(torch.uint8)  # row o holds o % 16
    w = awq.pack(q)["qweight"]                                    # [in, out/8]
    first = w[0, 0].item() & 0xFFFFFFFF
    slots = [(first >> (4 * k)) & 0xF for k in range(8)]
    assert slots == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, True, False), (3, 64, False, True), (2, -1, True, False),
                                                     (8, 32, False, False)])
def test_quant_linear_matches_reference_and_dense(bits, group, sym, act_order):
    q = random_quant(96, 64, bits, group, sym, act_order)
    bias = torch.randn(96)
    m = QuantLinear.from_quant(q, bias)
    x = torch.randn(3, 5, 64)
    dense = x @ q.dequantize().t() + bias
    assert torch.allclose(m(x), dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(m(x), matmul_reference(x, m.qweight, m.qzeros, m.scales, m.g_idx, bits, m.bias))
    r = m.to_quant()
    assert torch.equal(r.codes, q.codes) and torch.equal(r.zeros, q.zeros)


def test_quant_linear_keeps_scale_dtype_and_caches_the_dequantized_weight():
    q = random_quant(96, 64, 4, 32, sym=False)
    q.scales = q.scales * (1 + 1e-6 * torch.rand_like(q.scales))   # not representable in fp16
    exact = QuantLinear.from_quant(q, scale_dtype=torch.float32)
    assert exact.scales.dtype == torch.float32 and torch.equal(exact.scales.t(), q.scales)
    cached = QuantLinear.from_quant(q, scale_dtype=torch.float32, cache=True)
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(cached(x), exact(x), rtol=1e-6, atol=1e-6)     # one GEMM order or another
    assert torch.equal(cached._w_cache, dequantize_packed(cached.qweight, cached.qzeros, cached.scales, cached.g_idx,
                                                          4, torch.float32).t())   # W [out, in], exactly
    cached.double()                                                   # .to() drops the cache
    assert cached._w_cache is None and cached(x.double()).dtype == torch.float64
    assert torch.allclose(cached(x.double()).float(), exact(x), atol=1e-5)


@pytest.fixture
def quantized_tiny(tiny_llama_dir):
    def make(cfg):
        m = qforge.load(tiny_llama_dir, cfg)
        m.quantize([torch.randint(0, 500, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)])
        return m
    return make


@pytest.mark.parametrize("fmt,cfg", [
    ("gptq", QuantizeConfig(method="gptq", bits=3, group_size=32, act_order=True)),
    ("gptq", QuantizeConfig(method="rtn", bits=4, group_size=-1, sym=False)),
    ("compressed-tensors", QuantizeConfig(method="rtn", bits=4, group_size=32, sym=False)),
    ("compressed-tensors", QuantizeConfig(method="gptq", bits=8, group_size=-1)),
    ("awq", QuantizeConfig(method="rtn", bits=4, group_size=32, sym=False)),
    ("awq", QuantizeConfig(method="gptq", bits=4, group_size=32, sym=False, act_group_aware=True)),
])
def test_export_loads_back_with_the_same_codes_and_logits(fmt, cfg, quantized_tiny, tmp_path):
    m = quantized_tiny(cfg)
    sizes = m.export(tmp_path / "x", fmt)
    files = {p.name for p in (tmp_path / "x").iterdir()}
    assert {"config.json", "model.safetensors", "qforge_export.json", "tokenizer.json"} <= files
    assert json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    assert 0 < sizes["bits_per_weight"] < 9
    back = qforge.load(tmp_path / "x")
    assert back.packed_format == fmt and set(back.result.layers) == set(m.result.layers)
    for name, q in m.result.layers.items():
        r = back.result.layers[name]
        assert torch.equal(r.codes, q.codes) and torch.equal(r.zeros, q.zeros), name
        assert torch.equal(r.scales, q.scales.half().float()), name
        assert isinstance(back.model.get_submodule(name), QuantLinear)
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        a, b = m.model(x).logits, back.model(x).logits
    assert (a - b).abs().max() < 1e-2 * a.abs().max()             # fp16 scales and embeddings only


def test_fp32_compressed_tensors_scales_load_exactly(quantized_tiny, tmp_path):
    m = quantized_tiny(QuantizeConfig(method="gptq", bits=4, group_size=32, sym=False))
    m.export(tmp_path / "x", "compressed-tensors", dtype=torch.float32)
    back = qforge.load(tmp_path / "x")
    name, q = next(iter(m.result.layers.items()))
    assert back.model.get_submodule(name).scales.dtype == torch.float32
    assert torch.equal(back.result.layers[name].scales, q.scales)
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        a, b = m.model(x).logits, back.model(x).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max()             # nothing rounded on the way


def test_export_sharded_and_gptq_files(quantized_tiny, tmp_path):
    m = quantized_tiny(QuantizeConfig(method="rtn", bits=4, group_size=32))
    m.export(tmp_path / "s", "gptq", max_shard_size=40_000)
    idx = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    assert json.loads((tmp_path / "s" / "quantize_config.json").read_text())["bits"] == 4
    back = qforge.load(tmp_path / "s")
    assert len(back.result.layers) == len(m.result.layers)


@pytest.mark.parametrize("kw,desc_act", [
    (dict(act_order=True), True),                              # groups permuted: readers must follow g_idx
    (dict(act_order=True, static_groups=True), False),         # act-order's solve, groups in column order
    (dict(act_order=True, group_size=-1), False),              # one group: nothing to follow
    (dict(), False),
])
def test_gptq_desc_act_says_whether_g_idx_is_out_of_column_order(quantized_tiny, tmp_path, kw, desc_act):
    """desc_act=True only where a layer's groups are permuted: vLLM 0.32 refuses any desc_act=True checkpoint, so
    static groups (or per-channel act-order) must export as the plain layout (benchmarks/vllm_loads_exports.py)."""
    m = quantized_tiny(QuantizeConfig(**{"method": "gptq", "bits": 4, "group_size": 32, **kw}))
    m.export(tmp_path / "g", "gptq")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is desc_act and qc["static_groups"] is bool(kw.get("static_groups"))
    back = qforge.load(tmp_path / "g").result.layers
    assert all(torch.equal(back[n].g_idx, q.g_idx) for n, q in m.result.layers.items())


def test_export_errors_are_clear_and_leave_nothing(quantized_tiny, tmp_path):
    m = quantized_tiny(QuantizeConfig(method="gptq", bits=3, group_size=32, act_order=True))
    with pytest.raises(QForgeError, match="4-bit"):
        m.export(tmp_path / "a", "awq")
    with pytest.raises(QForgeError, match="column order"):
        m.export(tmp_path / "c", "compressed-tensors")
    with pytest.raises(QForgeError, match="unknown export format"):
        m.export(tmp_path / "u", "exl2")
    with pytest.raises(QForgeError, match="2, 3, 4 or 8-bit"):
        quantized_tiny(QuantizeConfig(method="rtn", bits=6, group_size=32)).export(tmp_path / "b", "gptq")
    assert not [p for p in tmp_path.iterdir() if p.name != "tiny-llama"]   # nothing half-written
    m.export(tmp_path / "g", "gptq")
    with pytest.raises(QForgeError, match="already exists"):
        m.export(tmp_path / "g", "gptq")


def test_impossible_exports_are_refused_before_quantizing(tiny_llama_dir, tmp_path):
    from qforge.mixed import Allocation

    def check(fmt, allocation=None, **kw):
        qforge.load(tiny_llama_dir, QuantizeConfig(**kw)).check_export(fmt, allocation)

    check("gptq", bits=3, group_size=32, act_order=True)                      # g_idx keeps any order
    check("compressed-tensors", bits=5, group_size=32, act_order=True, static_groups=True)
    for fmt, kw, match in [("gptq", dict(bits=5), "2, 3, 4 or 8-bit"), ("awq", dict(bits=3), "4-bit"),
                           ("awq", dict(method="awq", group_size=32, act_order=True), "in-order"),
                           ("compressed-tensors", dict(bits=4, group_size=48), "does not divide"),
                           ("compressed-tensors", dict(group_size=32, act_order=True), "column order"),
                           ("awq", dict(method="gptq", bpw=3.0), "one scheme"), ("exl2", {}, "unknown")]:
        with pytest.raises(QForgeError, match=match):
            check(fmt, **kw)
    a = Allocation(3.0, "gptq", {"model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 32, "sym": True}})
    with pytest.raises(QForgeError, match="one scheme"):
        check("awq", a, method="gptq", bits=4, group_size=32)
    check("gptq", a, method="gptq", bits=4, group_size=32)


def test_cli_refuses_an_impossible_export_before_quantizing(tiny_llama_dir, tmp_path, capsys):
    from qforge.cli.main import main

    assert main(["quantize", str(tiny_llama_dir), "--bits", "5", "--format", "gptq",
                 "--out", str(tmp_path / "q")]) == 2
    assert "compressed-tensors" in capsys.readouterr().err
    (tmp_path / "r-gptq").mkdir()
    assert main(["quantize", str(tiny_llama_dir), "--format", "gptq", "--out", str(tmp_path / "r")]) == 2
    assert "r-gptq already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-gptq", "tiny-llama"]     # nothing quantized or saved


def test_corrupt_or_foreign_packed_checkpoints(quantized_tiny, tmp_path):
    m = quantized_tiny(QuantizeConfig(method="rtn", bits=4, group_size=32))
    m.export(tmp_path / "g", "gptq")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(QForgeError, match="corrupt"):
        qforge.load(tmp_path / "g")
    m.export(tmp_path / "h", "gptq")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "bitsandbytes"
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QForgeError, match="not supported"):
        qforge.load(tmp_path / "h")


def test_cli_quantize_with_format_export_and_generate(tiny_llama_dir, tmp_path, capsys):
    from qforge.cli.main import main

    out = tmp_path / "run"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--out", str(out),
                 "--format", "gptq"]) == 0
    assert (tmp_path / "run-gptq" / "config.json").is_file()
    assert "bits/weight (measured on the files)" in capsys.readouterr().out
    assert main(["-q", "export", str(out), "--format", "awq", "--out", str(tmp_path / "awq")]) == 0
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert main(["-q", "export", str(tmp_path / "awq"), "--format", "gptq", "--out", str(tmp_path / "x")]) == 2
    assert "not a qforge output directory" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["-q", "generate", str(tmp_path / "awq"), "--prompt", "def main", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["-q", "generate", str(tmp_path / "awq"), "--prompt", "def main", "--max-new-tokens", "5",
                 "--dtype", "bfloat16"]) == 0                       # the CPU int4 matmul's dtype
    assert capsys.readouterr().out.strip()
    assert main(["-q", "eval", str(tmp_path / "run-gptq"), "--dataset", "code", "--seqlen", "64",
                 "--max-windows", "2"]) == 0
    assert "perplexity of" in capsys.readouterr().out
    # kernel tuning times the Triton kernels on a GPU: asked for on the CPU it is refused clearly
    assert main(["-q", "generate", str(tmp_path / "awq"), "--prompt", "x", "--tune-kernels"]) == 2
    assert main(["-q", "eval", str(tmp_path / "run-gptq"), "--dataset", "code", "--seqlen", "64",
                 "--max-windows", "1", "--tune-kernels"]) == 2
    assert capsys.readouterr().err.count("kernel tuning times the Triton kernels on a CUDA device") == 2


def test_zero_points_of_zero_are_reported_once_per_export(quantized_tiny, tmp_path, caplog):
    m = quantized_tiny(QuantizeConfig(method="rtn", bits=4, group_size=32, sym=False))
    layers = {n: q for n, q in m.result.layers.items()}
    for q in layers.values():
        q.zeros[0, 0] = 0                                          # every layer needs the v1 borrow
    with caplog.at_level("WARNING", logger="qforge.export"):
        m.export(tmp_path / "x", "gptq")
    warnings = [r for r in caplog.records if "zero points of 0" in r.getMessage()]
    assert len(warnings) == 1 and f"{len(layers)} of {len(layers)} layers" in warnings[0].getMessage()
    back = qforge.load(tmp_path / "x")
    for name, q in layers.items():
        assert torch.equal(back.result.layers[name].zeros, q.zeros), name   # the borrow is undone exactly


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq"])
def test_moe_experts_are_exported_as_the_models_checkpoints_store_them(model_type, fmt, tiny_tokenizer, tmp_path,
                                                                      wiki_excerpt):
    """transformers fuses MoE experts into 3-D parameters; a packed export stores each expert's linears as the
    model's own checkpoints do (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2, the router renamed with them;
    Qwen3-MoE: mlp.experts.{e}.gate_proj/up_proj/down_proj), and loads back to the quantized model."""
    from safetensors.torch import load_file

    from tiny_models import tiny_model

    src = tmp_path / model_type
    tiny_model(model_type, seed=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    stored = set(load_file(str(src / "model.safetensors")))                  # what save_pretrained writes
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, sym=fmt == "compressed-tensors",
                         act_order=fmt == "gptq")
    m = qforge.load(str(src), cfg)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    assert any(".experts.gate_up_proj." in n for n in m.result.layers)
    sizes = m.export(tmp_path / "x", fmt, dtype=torch.float32)      # fp16 router weights could flip near-tied routes
    packed = set(load_file(str(tmp_path / "x" / "model.safetensors")))
    first = FORMATS[fmt].KEYS[0]
    modules = {k[: -len(first) - 1] for k in packed if k.endswith("." + first)}
    assert {f"{n}.weight" for n in modules} <= stored                        # every packed module a stored one
    assert len(modules) == len([k for k in stored if ".layers." in k and k.endswith(("proj.weight", "_mqa.weight")) or
                                ".w1." in k or ".w2." in k or ".w3." in k])
    assert {k for k in packed if not k.startswith(tuple(f"{n}." for n in modules))} <= stored   # the router too
    assert sizes["quantized_weights"] == m.storage()["quantized_weights"]
    back = qforge.load(tmp_path / "x")
    assert set(back.result.layers) == modules
    rows = {}                                                      # stored modules in order: the fused rows again
    for n, q in back.result.layers.items():
        rows.setdefault(n.replace(".w3", ".w1").replace(".up_proj", ".gate_proj"), []).append(q.codes)
    for name, q in m.result.layers.items():
        i, e, kind = int(name.split(".")[2]), name.rsplit(".", 1)[1], name.split(".")[-2]
        if kind in ("gate_up_proj", "down_proj") and ".experts." in name:
            moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
            part = {"gate_up_proj": ("w1", "gate_proj"), "down_proj": ("w2", "down_proj")}[kind]
            key = f"model.layers.{i}.{moe}.experts.{e}.{part[0] if model_type == 'mixtral' else part[1]}"
            got = torch.cat(rows[key])
        else:
            got = back.result.layers[name].codes
        assert torch.equal(got, q.codes), name
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        a, b = m.model(x).logits, back.model(x).logits
    close = (a - b).abs().amax(-1) < 1e-2 * a.abs().max()           # fp16 scales only, per position
    assert close.float().mean() >= 0.95          # ... but they may flip a near-tied route (seen: 1 of 80 on DeepSeek)
    part = qforge.load(str(src), QuantizeConfig(method="rtn", bits=4, group_size=32, skip=("*.gate_up_proj.1",)))
    with pytest.raises(QForgeError, match="3 of its 4 experts are quantized"):
        part.check_export(fmt)                                        # refused before quantizing


@pytest.mark.parametrize("model_type,dtype,fp32", [
    ("deepseek_v3", torch.float16, ("e_score_correction_bias",)),          # the router's score bias, kept strictly
    ("nemotron_h_moe", torch.bfloat16, ("e_score_correction_bias",)),
    ("ernie4_5_moe", torch.bfloat16, ("gate.weight", "moe_statics")),
])
def test_packed_exports_keep_what_the_model_keeps_in_fp32(model_type, dtype, fp32, tiny_tokenizer, tmp_path,
                                                          wiki_excerpt):
    """The tensors a model class keeps in fp32 whatever it is loaded in (_keep_in_fp32_modules_strict: routers
    whose rounding would flip expert choices) are written in fp32 in a bf16/fp16 export, as save_pretrained does;
    everything else dense in the asked dtype."""
    from safetensors import safe_open

    from tiny_models import tiny_model

    src = tmp_path / "src"
    tiny_model(model_type, seed=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(str(src), QuantizeConfig(method="rtn", bits=4, group_size=32))
    m.quantize(wiki_excerpt, nsamples=2, seqlen=32)
    m.export(tmp_path / "x", "compressed-tensors", dtype=dtype)
    with safe_open(str(tmp_path / "x" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(("_packed", "_shape", "_scale",
                                                                                      "_zero_point", "g_idx"))}
    kept = {k for k in dtypes if any(n in k for n in fp32)}
    assert kept and all(dtypes[k] == "F32" for k in kept)
    assert {dtypes[k] for k in dtypes if k not in kept} == {{torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]}
    from qforge.models.packed import load_packed

    back = load_packed(tmp_path / "x", dtype)[0]                             # and loads back as from_pretrained
    state = back.state_dict()
    assert all(state[k].dtype == torch.float32 for k in state if any(n in k for n in fp32))
    assert back.get_input_embeddings().weight.dtype == dtype


def test_a_linear_its_checkpoints_store_by_columns_is_refused_by_packed_export_with_nothing_written(
        tiny_llama_dir, tmp_path):
    """A packed module holds whole rows of one linear: a linear the model's checkpoints store otherwise (here its
    load transforms, which from_pretrained records on the model, join up_proj from two column halves) is refused
    with its stored name, and nothing is written."""
    from transformers.core_model_loading import Concatenate, WeightConverter

    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(method="rtn", bits=4, group_size=32))
    m.quantize()
    m.model._weight_conversions = [WeightConverter(["mlp.up_a.weight", "mlp.up_b.weight"], "mlp.up_proj.weight",
                                                   [Concatenate(dim=1)])]
    with pytest.raises(QForgeError, match="up_proj.weight: the checkpoint stores it as .*up_a.weight, not as whole"):
        m.export(tmp_path / "x", "gptq")
    assert not list(tmp_path.glob("x*"))


_FUSED_EXPERTS = {"llama4_text": "feed_forward.experts", "gpt_oss": "mlp.experts",
                  "granitemoe": "block_sparse_moe.experts", "granitemoehybrid": "block_sparse_moe.experts",
                  "gemma4_text_moe": "experts"}


@pytest.mark.parametrize("model_type", list(_FUSED_EXPERTS))
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_experts_stored_fused_are_exported_one_module_each(model_type, fmt, tiny_tokenizer, tmp_path, wiki_excerpt):
    """Llama 4 and GPT-OSS checkpoints store their experts as the 3-D parameters ([experts, in, out]), Granite's
    MoE checkpoints as 3-D `block_sparse_moe.input_linear`/`output_linear` ([experts, out, in]); a packed export
    writes one module per expert, `<experts>.{e}.gate_proj/up_proj/down_proj` (llm-compressor's names, which
    vLLM's fused-MoE loader reads), gate and up rows as the layout holds them (GPT-OSS: interleaved), biases split
    with them, and loads back to the quantized model."""
    from safetensors.torch import load_file

    from qforge.models.arch import arch_spec
    from tiny_models import tiny_model

    src = tmp_path / model_type
    tiny_model(model_type, seed=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(str(src), QuantizeConfig(method="gptq", bits=4, group_size=32, sym=fmt == "compressed-tensors"))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    m.export(tmp_path / "x", fmt, dtype=torch.float32)
    packed = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj", "_proj_bias"))
                   or "moe.input_linear" in k or "moe.output_linear" in k for k in packed)
    parent = "model.layers.1." + _FUSED_EXPERTS[model_type]
    layout = arch_spec(m.model).experts
    back = qforge.load(tmp_path / "x")
    fp = m.model.get_submodule(parent)
    for e in range(4):
        q = m.result.layers[f"{parent}.gate_up_proj.{e}"]
        rows = dict(zip(("gate_proj", "up_proj"), layout.gate_up_rows(q.shape[0])))
        for proj, r in rows.items():
            assert f"{parent}.{e}.{proj}.{FORMATS[fmt].KEYS[0]}" in packed
            assert torch.equal(back.result.layers[f"{parent}.{e}.{proj}"].codes, q.codes[r])
            if model_type == "gpt_oss":
                assert torch.equal(packed[f"{parent}.{e}.{proj}.bias"], fp.gate_up_proj_bias[e, r])
        assert torch.equal(back.result.layers[f"{parent}.{e}.down_proj"].codes,
                           m.result.layers[f"{parent}.down_proj.{e}"].codes)
    if model_type == "gpt_oss":
        torch.testing.assert_close(back.model.get_submodule(parent).gate_up_proj_bias, fp.gate_up_proj_bias)
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        a, b = m.model(x).logits, back.model(x).logits
    close = (a - b).abs().amax(-1) < 1e-2 * a.abs().max()           # fp16 scales only, per position
    assert close.float().mean() >= 0.95                             # ... but they may flip a near-tied route


@pytest.mark.parametrize("stream", [False, True])
def test_a_mixtral_checkpoint_in_gptqmodels_per_expert_names_loads(stream, tiny_tokenizer, tmp_path, wiki_excerpt):
    """GPTQModel writes a Mixtral's experts as mlp.experts.{e}.gate_proj/up_proj/down_proj (its names for every
    gate/up/down MoE, qwen2_moe's layout) and its router as mlp.gate; qforge reads that layout too, in memory and
    block by block, to the same model as its own export (block_sparse_moe.experts.{e}.w1/w3/w2)."""
    from safetensors.torch import load_file, save_file

    from tiny_models import tiny_model

    src = tmp_path / "mixtral"
    tiny_model("mixtral", seed=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(str(src), QuantizeConfig(method="gptq", bits=4, group_size=32, act_order=True))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    m.export(tmp_path / "ours", "gptq", dtype=torch.float32)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    renamed = {k.replace(".block_sparse_moe.", ".mlp.").replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.")
               .replace(".w2.", ".down_proj."): v for k, v in ours.items()}
    assert any(".mlp.experts.0.gate_proj.qweight" in k for k in renamed)
    theirs = tmp_path / "theirs"
    shutil.copytree(tmp_path / "ours", theirs)
    save_file(renamed, str(theirs / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randint(0, 500, (2, 40))
    got = [qforge.load(str(d), stream=stream) for d in (tmp_path / "ours", theirs)]
    if stream:
        nll = [qforge.evaluate(g, ["wiki"], seqlen=32, max_windows=2)[0]["ppl"] for g in got]
        assert nll[0] == nll[1]
    else:
        assert set(got[1].result.layers) == {n.replace(".block_sparse_moe.", ".mlp.").replace(".w1", ".gate_proj")
                                             .replace(".w3", ".up_proj").replace(".w2", ".down_proj")
                                             for n in got[0].result.layers}
        with torch.no_grad():
            assert torch.equal(got[0].model(x).logits, got[1].model(x).logits)


def test_skipped_linears_are_named_for_readers(tiny_llama_dir, tmp_path):
    """A block linear kept dense (`skip`) is named where each format's readers look for it: gptq's `dynamic` "-:"
    rule (GPTQModel, vLLM; tests/test_clients.py loads one in GPTQModel), awq's modules_to_not_convert, and
    compressed-tensors' ignore list; qforge reads each back with that module dense."""
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="rtn", bits=4, group_size=32, sym=False,
                                                   skip=("*.1.mlp.down_proj",)))
    m.quantize(None)
    for fmt in ("gptq", "awq", "compressed-tensors"):
        m.export(tmp_path / fmt, fmt)
        qc = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
        listed = {"gptq": lambda: [k.replace("\\", "") for k in qc["dynamic"] if k.startswith("-:")],
                  "awq": lambda: qc["modules_to_not_convert"],
                  "compressed-tensors": lambda: qc["ignore"]}[fmt]()
        assert any("layers.1.mlp.down_proj" in k for k in listed), fmt
        assert not any("layers.0.mlp.down_proj" in k for k in listed), fmt
        back = qforge.load(tmp_path / fmt)
        assert "model.layers.1.mlp.down_proj" not in back.result.layers and len(back.result.layers) == 13
        assert type(back.model.model.layers[1].mlp.down_proj) is torch.nn.Linear
