"""FP8 in blocks (llm-compressor's FP8_BLOCK, DeepSeek-V3's layout): one E4M3 weight scale per R x C tile, inputs
quantized per token in groups of C channels; RTN and GPTQ, compressed-tensors export and loading, evaluation."""
from __future__ import annotations

import json

import pytest
import torch

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.eval.simulate import fake_quant_fp8_per_token, quantized_activations
from qforge.formats import compressed_tensors as ct
from qforge.kernels import Fp8Linear
from qforge.solvers import Grid, InputScheme, rtn
from qforge.solvers.gptq import gptq
from qforge.solvers.grid import to_e4m3

BLOCK = Grid(8, 32, True, fp8=True, block_rows=32)
FP8_BLOCK = dict(method="rtn", bits=8, group_size=32, sym=True, fp8=True, fp8_block=True, act_bits=8)


def tiles(W: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """[out, in] -> each element's tile absmax, by brute force."""
    out = torch.empty_like(W)
    for i in range(0, W.shape[0], r):
        for j in range(0, W.shape[1], c):
            out[i:i + r, j:j + c] = W[i:i + r, j:j + c].abs().amax()
    return out


def per_tile(q) -> torch.Tensor:
    """The layer's scales [out, in], one per weight."""
    return q.scales[:, q.g_idx.long()]


@pytest.mark.parametrize("bad", [dict(fp8=False), dict(group_size=-1), dict(block_rows=-4)])
def test_blocks_of_rows_are_fp8_grids_with_groups(bad):
    with pytest.raises(ValueError, match="blocks of rows"):
        Grid(**{**dict(bits=8, group_size=32, sym=True, fp8=True, block_rows=32), **bad})


@pytest.mark.parametrize("bad,msg", [
    (dict(fp8=False), "needs fp8"),
    (dict(group_size=-1), "group_size x group_size tiles"),
    (dict(act_static=True), "dynamic inputs"),
    (dict(method="gptq", act_order=True), "act_order needs static_groups"),
])
def test_impossible_fp8_block_settings_are_refused(bad, msg):
    with pytest.raises(QForgeError, match=msg):
        QuantizeConfig(**{**FP8_BLOCK, **bad})


def test_rtn_gives_each_tile_one_scale_its_absmax_over_448():
    torch.manual_seed(0)
    W = torch.randn(80, 96) * torch.rand(80, 1) * 3            # 80 rows: the last tile is 16 rows high
    W[40:48, 32:64] = 0.0                                       # zero rows inside a tile take the tile's scale
    W[64:80, 64:96] = 0.0                                       # a whole zero tile keeps a finite scale
    q = rtn(W, BLOCK)
    assert q.scales.shape == (80, 3) and q.codes.dtype == torch.float8_e4m3fn
    live = tiles(W, 32, 32) > 0
    torch.testing.assert_close(per_tile(q)[live], tiles(W, 32, 32)[live] / 448, rtol=0, atol=0)
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
    assert torch.equal(q.codes.float(), to_e4m3(W / per_tile(q)).float())
    assert torch.equal(q.dequantize(), per_tile(q) * q.codes.float())
    # a tile's scale is shared: coarser than per-channel FP8, never finer
    pc = rtn(W, Grid(8, -1, True, fp8=True))
    assert (W - q.dequantize()).norm() >= (W - pc.dequantize()).norm()


@pytest.mark.parametrize("opts", [dict(), dict(static_groups=True), dict(scale_search=True),
                                  dict(group_aware=True, scale_search=True)])
def test_gptq_in_blocks_keeps_one_scale_per_tile_and_beats_rtn(opts):
    wins = 0
    for seed in range(3):
        torch.manual_seed(seed)
        W = torch.randn(72, 128) * torch.rand(72, 1) * 2
        X = torch.randn(128, 1024) * torch.linspace(0.05, 3, 128)[:, None] + 0.5 * torch.randn(1, 1024)
        H = 2 * X @ X.T / X.shape[1]
        q = gptq(W, H, BLOCK, **opts)
        assert torch.equal(q.dequantize(), q.w_hat)             # codes and tile scales give the solver's Ŵ exactly
        s = q.scales
        for r0 in range(0, 72, 32):                             # every row of a tile holds its first row's scales
            assert torch.equal(s[r0:r0 + 32], s[r0:r0 + 1].expand_as(s[r0:r0 + 32]))
        if not opts.get("scale_search"):
            # min-max tiles: the scale covers the tile's largest weight as the solver saw it, so no code saturates
            assert q.codes.float().abs().amax() <= 448
        err = [((W - Wh) @ X).pow(2).sum() for Wh in (q.dequantize(), rtn(W, BLOCK).dequantize())]
        wins += bool(err[0] < err[1])
    assert wins == 3


def test_fake_quant_in_groups_scales_each_run_of_channels_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 80) * torch.logspace(-3, 2, 80)      # each group of channels at its own magnitude
    y = fake_quant_fp8_per_token(x, 32)                          # groups 32, 32, 16
    for a, b in ((0, 32), (32, 64), (64, 80)):
        torch.testing.assert_close(y[..., a:b], fake_quant_fp8_per_token(x[..., a:b]), rtol=0, atol=0)
    assert torch.equal(fake_quant_fp8_per_token(x, 80), fake_quant_fp8_per_token(x))
    assert (y - x).norm() < (fake_quant_fp8_per_token(x) - x).norm()
    with pytest.raises(QForgeError, match="inputs in groups"):
        with quantized_activations(torch.nn.Linear(4, 4), InputScheme(8, group_size=32)):
            pass


def test_blocks_are_written_as_the_block_strategy_and_read_into_fp8_linear():
    """(The round trip itself: tests/test_fp8.py, per channel and in blocks.)"""
    torch.manual_seed(1)
    q = rtn(torch.randn(80, 64) * torch.rand(80, 1), BLOCK)
    t = ct.pack(q, torch.bfloat16, InputScheme(8, fp8=True, group_size=32))
    qc = ct.build_config({"a": BLOCK}, [], InputScheme(8, fp8=True, group_size=32)).model_dump()
    w, a = qc["config_groups"]["group_0"]["weights"], qc["config_groups"]["group_0"]["input_activations"]
    assert (w["strategy"], w["block_structure"]) == ("block", [32, 32])
    assert (a["strategy"], a["group_size"], a["dynamic"]) == ("group", 32, True)
    back = ct.unpack(t, BLOCK)
    lin = Fp8Linear.from_quant(back, None, torch.bfloat16)
    assert torch.equal(lin.dequantized(torch.float32), back.dequantize())
    assert torch.equal(lin.to_quant().scales, back.scales)
    t["weight_scale"] = t["weight_scale"][:2]
    with pytest.raises(QForgeError, match=r"needs a \[3, 2\] weight_scale"):
        ct.unpack(t, BLOCK)


def test_rows_that_cut_a_block_are_refused():
    q = rtn(torch.randn(96, 64), BLOCK)
    assert q.rows(32, 96).scales.shape == (64, 2)
    for r0, r1, step in ((0, 48, 1), (16, 96, 1), (0, 96, 2)):
        with pytest.raises(QForgeError, match="cut its blocks"):
            q.rows(r0, r1, step)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_fp8_block_quantizes_exports_and_evaluates_as_served(method, tiny_llama_dir, wiki_excerpt, tmp_path):
    m = qforge.load(tiny_llama_dir, QuantizeConfig(**{**FP8_BLOCK, "method": method}))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    assert m.input_scheme == InputScheme(8, fp8=True, group_size=32)
    for name, q in m.result.layers.items():
        W = q.dequantize()
        assert q.grid == BLOCK
        if method == "rtn":
            # RTN maps each tile's largest weight to ±448 exactly
            torch.testing.assert_close(per_tile(q), tiles(W, 32, 32) / 448, rtol=1e-6, atol=0)
        assert torch.equal(W, per_tile(q) * q.codes.float())
    out = m.save(tmp_path / "out")
    sizes = m.export(tmp_path / "ct16", "compressed-tensors")                  # fp16 scales, as storage counts them
    assert m.storage()["bits_per_weight"] == pytest.approx(sizes["bits_per_weight"], rel=1e-3)   # a scale per tile
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["block_structure"] == [32, 32]
    assert (group["input_activations"]["strategy"], group["input_activations"]["group_size"]) == ("group", 32)

    packed, saved = qforge.load(tmp_path / "ct"), qforge.load(out)
    assert packed.input_scheme == saved.input_scheme == m.input_scheme
    assert all(q.grid == BLOCK for q in (*saved.result.layers.values(), *packed.result.layers.values()))
    assert all(isinstance(packed.model.get_submodule(n), Fp8Linear) for n in packed.result.layers)
    rows = {name: qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0] for name, q in
            (("packed", packed), ("saved", saved), ("memory", m))}
    assert rows["packed"]["act_group_size"] == 32
    ppl = {k: r["ppl"] for k, r in rows.items()}
    assert ppl["packed"] == pytest.approx(ppl["saved"], rel=1e-4)
    assert ppl["saved"] == pytest.approx(ppl["memory"], rel=1e-5)
    # the inputs are quantized in groups in that evaluation: per token alone, the same weights score otherwise
    with quantized_activations(packed.model, InputScheme(8, fp8=True), set(packed.result.layers)):
        per_token = qforge.evaluate(packed, "wiki", seqlen=64, max_windows=2)
    assert abs(per_token[0]["ppl"] - ppl["packed"]) > 1e-5 * ppl["packed"]


def test_stacked_layers_whose_blocks_would_straddle_are_solved_apart(tiny_llama_dir, wiki_excerpt):
    """Blocks of 64 rows: stacked, q (64 rows), k (32) and v (32) would put k and v in one tile; solved apart, each
    layer's tiles are its own (so are gate's and up's, 96 rows each)."""
    cfg = QuantizeConfig(method="gptq", bits=8, group_size=64, fp8=True, fp8_block=True, compute_dtype="float32")
    m = qforge.load(tiny_llama_dir, cfg)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    k, v = (m.result.layers[f"model.layers.1.self_attn.{n}_proj"] for n in "kv")
    assert k.scales.shape == v.scales.shape == (32, 1)
    assert k.scales.unique().numel() == v.scales.unique().numel() == 1 and k.scales[0] != v.scales[0]
    for name, q in m.result.layers.items():
        assert "stacked_with" not in q.info, name
        torch.testing.assert_close(per_tile(q), tiles(q.dequantize(), 64, 64) / 448, rtol=1e-6, atol=0)


def test_fp8_block_from_the_command_line(tiny_llama_dir, wiki_excerpt, tmp_path, capsys):
    from qforge.cli.main import main

    out, packed = tmp_path / "q", tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "8", "--group-size", "32",
                 "--fp8", "--fp8-block", "--act-bits", "8", "--calib", wiki_excerpt, "--nsamples", "4",
                 "--calib-seqlen", "32", "--out", str(out), "--format", "compressed-tensors",
                 "--export-out", str(packed)]) == 0
    assert "gptq FP8 W8A8 32x32 blocks sym" in capsys.readouterr().out
    assert json.loads((out / "qforge_config.json").read_text())["fp8_block"] is True
    assert main(["-q", "eval", str(packed), "--dataset", "wiki", "--seqlen", "32", "--max-windows", "2"]) == 0
    assert "quantized to fp8 per token in groups of 32" in capsys.readouterr().out
    assert main(["quantize", str(tiny_llama_dir), "--fp8", "--fp8-block", "--group-size", "-1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "group_size x group_size tiles" in capsys.readouterr().err
    # tiles of 64 columns do not divide down_proj's 96 inputs: refused before quantizing when the export is asked for
    assert main(["quantize", str(tiny_llama_dir), "--bits", "8", "--group-size", "64", "--fp8", "--fp8-block",
                 "--out", str(tmp_path / "bad"), "--format", "compressed-tensors"]) == 2
    assert "does not divide 96" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_fused_experts_in_blocks_export_one_module_each_and_load(tiny_tokenizer, wiki_calibration, tmp_path):
    """Mixtral's experts (3-D parameters, gate and up fused): 32-row tiles split at gate / up boundaries, written one
    module per expert and read back fused, scoring as in memory. GPT-OSS interleaves gate and up rows, which would
    cut every tile: refused before quantizing."""
    from tiny_models import tiny_model

    from qforge.export import check_exportable

    src = tmp_path / "src"
    tiny_model("mixtral", seed=1).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    cfg = QuantizeConfig(method="gptq", bits=8, group_size=32, fp8=True, fp8_block=True)
    m = qforge.load(src, cfg)
    m.quantize(wiki_calibration)
    assert any(".experts." in n for n in m.result.layers)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    packed = qforge.load(tmp_path / "ct")
    assert all(q.grid == BLOCK for q in packed.result.layers.values())
    ppl = [qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for q in (m, packed)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)

    gpt_oss = tmp_path / "gpt_oss"
    tiny_model("gpt_oss", seed=1).save_pretrained(gpt_oss)
    tiny_tokenizer.save_pretrained(gpt_oss)
    with pytest.raises(QForgeError, match="cut its 32-row FP8 blocks"):
        check_exportable(qforge.load(gpt_oss).model, cfg, "compressed-tensors")


def test_fp8_block_streamed_gives_the_in_memory_codes(tiny_llama_dir, wiki_excerpt, tmp_path):
    from runs import streamed_and_in_memory

    a, b = streamed_and_in_memory(tiny_llama_dir, QuantizeConfig(**{**FP8_BLOCK, "method": "gptq"}), wiki_excerpt,
                                  tmp_path)
    assert a.input_scheme == b.input_scheme == InputScheme(8, fp8=True, group_size=32)
    for n, q in b.result.layers.items():
        assert q.grid == BLOCK and torch.equal(a.result.layers[n].scales, q.scales)
        assert torch.equal(a.result.layers[n].codes.view(torch.uint8), q.codes.view(torch.uint8))


@pytest.mark.parametrize("kv_heads,warned", [(2, False), (1, True)])
def test_a_merged_part_that_is_not_whole_blocks_is_warned_about(kv_heads, warned, tiny_tokenizer, tmp_path, caplog):
    """vLLM merges q/k/v into one module and refuses FP8 blocks there unless every part but the last is whole blocks:
    one kv head of 16 rows in blocks of 32 is not (k precedes v), two heads are."""
    from tiny_models import tiny_model

    src = tmp_path / "src"
    tiny_model("llama", num_key_value_heads=kv_heads).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(src, QuantizeConfig(method="rtn", bits=8, group_size=32, fp8=True, fp8_block=True))
    m.quantize()
    with caplog.at_level("WARNING", logger="qforge.export"):
        m.export(tmp_path / "ct", "compressed-tensors")
    said = [r.getMessage() for r in caplog.records if "vLLM refuses such a merged layer" in r.getMessage()]
    assert bool(said) == warned
    if warned:
        assert said[0].startswith("model.layers.0.self_attn.k_proj has 16 rows") and "qkv_proj" in said[0]
    assert qforge.load(tmp_path / "ct").result.layers.keys() == m.result.layers.keys()    # loads in qforge
