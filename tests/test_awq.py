"""AWQ: the pure scale/clip functions, function-preserving folding on every architecture, the pipeline,
saved results re-applied with --awq-from."""
from __future__ import annotations

import logging

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.capture import capture_block_inputs
from qforge.capture.blocks import make_batches
from qforge.models.arch import ARCHS, SmoothMapping, arch_spec, block_linears, get_blocks
from qforge.pipeline import quantize_model
from qforge.smoothing import awq_block, fold_scales, mapping_units
from qforge.solvers import Grid, rtn
from qforge.solvers import gptq
from qforge.solvers.awq import (apply_clip, awq_scales, clip_search, scaled_fake_quant, scaled_gptq_quant,
                                weight_magnitude)
from tiny_models import CONFIGS, VOCAB, tiny_model


def ids(n=8, length=48):
    return [torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(s)) for s in range(n)]


def test_scales_are_normalised_and_follow_activations():
    x = torch.tensor([0.1, 1.0, 10.0, 2.0])
    s = awq_scales(x, None, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(torch.argsort(s), torch.argsort(x))                # salient channels scaled up most
    assert torch.allclose(awq_scales(x, None, 0.0), torch.ones(4))        # α = 0: no scaling
    w = torch.tensor([1.0, 1.0, 4.0, 1.0])
    duo = awq_scales(x, w, 0.5)
    assert duo[2] / duo[1] < s[2] / s[1]                                  # duo scaling divides by w^(1-α)


def test_weight_magnitude_by_hand():
    W = torch.tensor([[1.0, -2.0, 4.0, 0.0], [3.0, 3.0, -1.0, 1.0]])
    want = torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).mean(0)   # |w| / group max, group 2
    assert torch.allclose(weight_magnitude(W, Grid(4, 2, False)), want, atol=1e-5)


def test_scaled_fake_quant_with_unit_scales_is_rtn():
    W = torch.randn(16, 64)
    grid = Grid(3, 32, False)
    assert torch.equal(scaled_fake_quant(W, torch.ones(64), grid), rtn(W, grid).dequantize())


def _hessian(X):
    from qforge.capture import HessianAccumulator
    acc = HessianAccumulator(X.shape[1])
    acc.add(X)
    return acc.H


def test_scaled_gptq_quant_solves_the_scaled_layer():
    """s = 1 is plain GPTQ; otherwise the result is GPTQ of W·diag(s) on the Hessian of x / s, mapped back."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) / 8                           # correlated inputs: GPTQ has work to do
    X = (torch.randn(512, 64, generator=g) @ mix) * torch.exp(torch.randn(64, generator=g))
    W = torch.randn(24, 64, generator=g)
    grid, H = Grid(3, 32, False), _hessian(X)
    assert torch.equal(scaled_gptq_quant(W, H, torch.ones(64), grid, scale_search=True),
                       gptq(W, H, grid, scale_search=True).dequantize())
    s = awq_scales(X.abs().mean(0), None, 0.5)
    direct = gptq(W * s, _hessian(X / s), grid).dequantize() / s
    err = lambda W_hat: float((X @ (W - W_hat).T).pow(2).sum())          # noqa: E731
    assert abs(err(scaled_gptq_quant(W, H, s, grid)) - err(direct)) <= 0.02 * err(direct)
    assert err(direct) < 0.9 * err(scaled_fake_quant(W, s, grid))        # GPTQ still compensates


@torch.no_grad()
def test_gptq_aware_search_keeps_no_scaling_when_it_wins():
    """With identity=True, s = 1 is a candidate: a quantizer that is exact only unscaled must leave the
    unit unscaled (α = -1), and awq_block then folds nothing for it."""
    from qforge.models.arch import block_linears
    from qforge.smoothing.awq_search import _capture, _input_keys, _search, _units

    m = tiny_model("llama")
    spec = arch_spec(m)
    block = get_blocks(m, spec)[0]
    inputs = capture_block_inputs(m, spec, make_batches(ids(2), 2))
    groups = block_linears(block, spec)
    units = _units(block, spec, [r for g in groups for r in g])
    keys = _input_keys(groups)
    X, store = _capture(block, units, groups, keys, inputs.hidden, inputs.for_block(0), "cpu")
    exact_unscaled = lambda W, key, s: W if torch.all(s == 1) else W * 1.01     # noqa: E731
    for u in units:
        alpha, s = _search(block, u, X, keys, store, exact_unscaled, 4, True, Grid(3, 32, False), "cpu", identity=True)
        assert alpha == -1.0 and torch.equal(s, torch.ones_like(s)), u.key
        alpha, _ = _search(block, u, X, keys, store, exact_unscaled, 4, True, Grid(3, 32, False), "cpu")
        assert alpha >= 0, u.key                                           # without it, some α is chosen


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_awq_gptq_runs_on_every_architecture(model_type):
    """awq+gptq with its defaults (GPTQ-judged scales, no AWQ clip): finite weights, closer to the fp
    model than RTN."""
    cfgs = {method: QuantizeConfig(method=method, bits=3, group_size=32, awq_grid=4) for method in ("rtn", "awq+gptq")}
    assert cfgs["awq+gptq"].awq_gptq_aware and not cfgs["awq+gptq"].awq_clip
    errs, results = _logit_errors(model_type, cfgs)
    for res in results.values():
        assert all(torch.isfinite(q.dequantize()).all() for q in res.layers.values())
    assert errs["awq+gptq"] < errs["rtn"]


def test_clip_search_never_widens_and_lowers_output_error():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    W[:, 5] *= 8                                                          # outliers make clipping pay
    X = torch.randn(256, 64, generator=g)
    grid = Grid(3, 32, True)
    max_val = clip_search(W, X, grid)
    org = W.abs().view(32, 2, 32).amax(-1)
    assert (max_val <= org + 1e-6).all() and (max_val >= 0.5 * org - 1e-6).all()
    assert (max_val < org - 1e-6).any()
    err = lambda Wq: float(((X @ (W - Wq).T) ** 2).mean())               # noqa: E731
    assert err(rtn(apply_clip(W, max_val, grid), grid).dequantize()) < err(rtn(W, grid).dequantize())


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_folded_scales_leave_the_fp_model_unchanged(model_type):
    m = tiny_model(model_type)
    x = torch.stack(ids(4, 32))
    with torch.no_grad():
        before = m(input_ids=x).logits
    spec = arch_spec(m)
    inputs = capture_block_inputs(m, spec, make_batches(ids(), 4))
    applied = 0
    for i, block in enumerate(get_blocks(m, spec)):
        r = awq_block(block, spec, inputs.hidden, inputs.for_block(i), Grid(3, 32, False), n_grid=5, clip=False)
        applied += len(r.scales)
        assert not r.clips
        if r.scales:
            assert any(not torch.allclose(s, torch.ones_like(s)) for s in r.scales.values())
    with torch.no_grad():
        after = m(input_ids=x).logits
    assert (after - before).norm() <= 1e-5 * before.norm() + 1e-6
    assert applied >= len(get_blocks(m, spec))        # at least one mapping per block is folded


def test_every_mapping_of_the_table_folds_in_some_tiny_model():
    """No dead table rows: each SmoothMapping of an entry fits a block of one of the tiny models using that entry
    (a mapping naming a module the block lacks would be skipped silently, with a log line). v -> o folds need as
    many kv heads as heads, so each tiny model is also built that way."""
    fits: dict[int, set[int]] = {}
    for model_type in sorted(CONFIGS):
        for m in (tiny_model(model_type), tiny_model(model_type, num_key_value_heads=4)):
            spec = arch_spec(m)
            for block in get_blocks(m, spec):
                refs = [r for g in block_linears(block, spec) for r in g]
                fits.setdefault(id(spec), set()).update(k for k, mp in enumerate(spec.smooth)
                                                        if mapping_units(block, mp, refs)[0])
    for model_type, spec in ARCHS.items():
        assert fits[id(spec)] == set(range(len(spec.smooth))), model_type


def test_fused_qkv_folds_into_v_only_without_grouped_kv_heads():
    """Phi-3's q|k|v linear feeds o_proj from its last third: with as many kv heads as heads the fold divides only
    those rows (the function is unchanged: test_folded_scales_...); with grouped kv heads it does not fit."""
    mapping = SmoothMapping("self_attn.qkv_proj", ("self_attn.o_proj",), prev_rows="v_third")
    for kv_heads, fits in ((4, True), (2, False)):
        m = tiny_model("phi3", num_key_value_heads=kv_heads)
        block = get_blocks(m, arch_spec(m))[0]
        refs = [r for g in block_linears(block, arch_spec(m)) for r in g]
        units, why = mapping_units(block, mapping, refs)
        assert bool(units) == fits and (fits or "v_third" in why)
        if fits:
            W = block.self_attn.qkv_proj.weight.detach().clone()
            s = torch.rand(64) + 0.5
            fold_scales(block, units[0], s, norm_plus_one=False)
            assert torch.equal(block.self_attn.qkv_proj.weight[:128], W[:128])          # q and k rows untouched
            torch.testing.assert_close(block.self_attn.qkv_proj.weight[128:], W[128:] / s[:, None])


def test_mapping_that_does_not_fit_is_skipped_with_a_log_line(caplog):
    m = tiny_model("llama")                            # GQA: v_proj has 32 outputs, o_proj reads 64
    spec = arch_spec(m)
    inputs = capture_block_inputs(m, spec, make_batches(ids(2), 2))
    with caplog.at_level(logging.INFO, logger="qforge.smoothing.awq_search"):
        r = awq_block(get_blocks(m, spec)[0], spec, inputs.hidden, inputs.for_block(0), Grid(4, 32, False), n_grid=3)
    assert "self_attn.v_proj" not in r.scales and "input_layernorm" in r.scales
    assert any("v_proj" in rec.message and "skipped" in rec.message for rec in caplog.records)


def test_mixtral_experts_get_router_balanced_and_per_expert_scales():
    m = tiny_model("mixtral")
    spec = arch_spec(m)
    block = get_blocks(m, spec)[0]
    router = block.mlp.gate.weight.detach().clone()
    n_experts = block.mlp.experts.gate_up_proj.shape[0]
    inputs = capture_block_inputs(m, spec, make_batches(ids(), 4))
    r = awq_block(block, spec, inputs.hidden, inputs.for_block(0), Grid(3, 32, False), n_grid=5)
    s = r.scales["post_attention_layernorm"]
    assert torch.allclose(block.mlp.gate.weight, router * s)          # the router reads x / s: balanced, not quantized
    assert {f"mlp.experts.gate_up_proj.{e}" for e in range(n_experts)} <= set(r.scales)   # up half -> down, per expert
    assert {f"mlp.experts.down_proj.{e}" for e in range(n_experts)} <= set(r.clips)
    assert "mlp.gate" not in r.clips


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_awq_beats_rtn_on_every_architecture(model_type):
    errs, _ = _logit_errors(model_type, {method: QuantizeConfig(method=method, bits=3, group_size=32, awq_grid=8)
                                         for method in ("rtn", "awq")})
    assert errs["awq"] < errs["rtn"]


def _logit_errors(model_type: str, cfgs: dict[str, QuantizeConfig]) -> tuple[dict[str, float], dict]:
    """Each config quantizes a fresh tiny model on the same samples: the distance of its logits from the fp
    model's, and its QuantizeResult."""
    samples = ids(8, 64)
    x = torch.stack(samples[:4])
    with torch.no_grad():
        want = tiny_model(model_type)(input_ids=x).logits
    errs, results = {}, {}
    for name, cfg in cfgs.items():
        m = tiny_model(model_type)
        results[name] = quantize_model(m, cfg, samples, show_progress=False)
        with torch.no_grad():
            errs[name] = float((m(input_ids=x).logits - want).norm())
    return errs, results


def test_awq_defaults_and_saved_results_reapply_exactly(tiny_llama_dir, tmp_path):
    cfg = QuantizeConfig(method="awq")
    assert (cfg.bits, cfg.group_size, cfg.sym) == (4, 128, False)     # AutoAWQ's w_bit, q_group_size, zero_point
    assert QuantizeConfig(method="gptq").sym is True
    samples = ids(8, 64)
    a = qforge.load(tiny_llama_dir, QuantizeConfig(method="awq", bits=3, group_size=32, awq_grid=5))
    a.quantize(samples)
    out = a.save(tmp_path / "a")
    assert (out / "awq_results.safetensors").is_file()
    b = qforge.load(tiny_llama_dir, QuantizeConfig(method="awq", bits=3, group_size=32, awq_from=str(out)))
    assert not b.config.needs_calibration
    b.quantize(None)                                                  # nothing searched, nothing needed
    for name, q in a.result.layers.items():
        assert torch.equal(b.result.layers[name].codes, q.codes), name
    c = qforge.load(tiny_llama_dir, QuantizeConfig(method="awq+gptq", bits=3, group_size=32, awq_from=str(out)))
    c.quantize(samples)
    assert set(c.result.awq) == set(a.result.awq)
    with pytest.raises(QForgeError, match="no AWQ results"):
        qforge.load(tiny_llama_dir, QuantizeConfig(method="awq", awq_from=str(tmp_path))).quantize(None)


def test_cli_awq(tiny_llama_dir, tmp_path, capsys):
    from qforge.cli.main import main

    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "awq+gptq", "--bits", "4", "--group-size", "32",
                 "--awq-grid", "4", "--calib", "builtin:code", "--nsamples", "4", "--seqlen", "64",
                 "--out", str(tmp_path / "o"), "--format", "awq"]) == 0
    assert "awq+gptq W4 g32 asym" in capsys.readouterr().out
    assert (tmp_path / "o" / "awq_results.safetensors").is_file() and (tmp_path / "o-awq" / "config.json").is_file()


def test_fp32_searches_beside_bf16_passes_read_the_carried_state_in_fp32():
    """Gemma 4's kv-shared blocks read the keys and values an earlier block left in the mapping the model hands every
    block (ArchSpec.carried). Filled by bf16 passes, AWQ's and SmoothQuant's fp32 searches get a copy cast to fp32
    (its own writes stay there): before, the fp32 query met bf16 keys."""
    from collections import UserDict

    from qforge.capture.blocks import BlockCall, with_own_carried

    shared = UserDict({"full_attention": (torch.ones(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16))})
    calls = [BlockCall((), {"shared_kv_states": shared, "x": torch.ones(1, dtype=torch.bfloat16)})]
    own = with_own_carried(calls, "shared_kv_states", torch.float32)[0].kwargs
    assert type(own["shared_kv_states"]) is UserDict and own["shared_kv_states"] is not shared
    assert all(t.dtype == torch.float32 for t in own["shared_kv_states"]["full_attention"])
    own["shared_kv_states"]["sliding_attention"] = ()
    assert "sliding_attention" not in shared and shared["full_attention"][0].dtype == torch.bfloat16
    assert with_own_carried(calls, None, torch.float32) is calls
    for method, extra in (("awq", {}), ("rtn", dict(bits=8, group_size=-1, act_bits=8, smoothquant=0.5))):
        m = tiny_model("gemma4_text")
        cfg = QuantizeConfig(method=method, compute_dtype="bfloat16", **({"bits": 4, "group_size": 32, "awq_grid": 2}
                                                                          if method == "awq" else extra))
        res = quantize_model(m, cfg, ids(8, 32), show_progress=False)
        assert all(torch.isfinite(q.dequantize()).all() for q in res.layers.values())
