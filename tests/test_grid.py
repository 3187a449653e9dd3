import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qforge import QForgeError, QuantizeConfig
from qforge.solvers import Grid, dequantize, fit_params, quantize, rtn
from qforge.solvers.grid import search_params


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), rows=st.integers(1, 9), cols=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_grid_codes_in_range_and_error_bounded(bits, sym, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    grid = Grid(bits, -1, sym)
    scale, zero = fit_params(W, grid)
    q = quantize(W, scale, zero, grid)
    assert q.min() >= 0 and q.max() <= grid.maxq and torch.equal(q, q.round())
    err = (dequantize(q, scale, zero) - W).abs()
    # every weight lies inside its row's grid range, so rounding moves it by at most half a step,
    # except the symmetric grid's top code, which is one step short of +absmax (GPTQ convention)
    bound = scale.unsqueeze(1) * (1.0 if sym else 0.5) + 1e-6
    assert (err <= bound).all()


def test_symmetric_grid_matches_signed_convention():
    """GPTQ's sym grid (zero 2^(b-1), scale 2*absmax/maxq) == signed int grid with scale absmax/(maxq/2)."""
    W = torch.randn(16, 64)
    grid = Grid(4, -1, True)
    scale, zero = fit_params(W, grid)
    assert torch.all(zero == 8)
    signed_scale = W.abs().amax(dim=1) / 7.5
    signed = torch.clamp(torch.round(W / signed_scale[:, None]), -8, 7)
    torch.testing.assert_close(scale, signed_scale)
    assert torch.equal(quantize(W, scale, zero, Grid(4)) - 8, signed)


def test_asymmetric_grid_spans_min_to_max():
    W = torch.tensor([[-1.0, 0.0, 3.0, 1.0]])
    scale, zero = fit_params(W, Grid(2, -1, False))
    assert torch.allclose(scale, torch.tensor([4 / 3])) and zero.item() == 1  # round(1 / (4/3))
    assert quantize(W, scale, zero, Grid(2)).tolist() == [[0.0, 1.0, 3.0, 2.0]]


def test_all_zero_row_is_exact():
    W = torch.zeros(3, 8)
    q = rtn(W, Grid(4, 4, True))
    assert torch.equal(q.dequantize(), W)


@pytest.mark.parametrize("group", [-1, 16, 32, 24])
def test_rtn_groups_and_ragged_last_group(group):
    W = torch.randn(8, 80)
    grid = Grid(3, group, False)
    q = rtn(W, grid)
    glen = 80 if group == -1 else group
    assert q.scales.shape == (8, -(-80 // glen))
    assert torch.equal(q.g_idx, torch.arange(80, dtype=torch.int32) // glen)
    assert grid.ragged(80) == (80 % glen != 0)
    # each group quantized independently: equals RTN of that column range alone
    for k in range(q.scales.shape[1]):
        cols = slice(k * glen, min((k + 1) * glen, 80))
        alone = rtn(W[:, cols], Grid(3, -1, False))
        assert torch.equal(q.codes[:, cols], alone.codes)
        assert torch.equal(q.dequantize()[:, cols], alone.dequantize())


def test_dequantize_by_row_chunks_is_the_formula_bit_for_bit():
    W = torch.randn(600, 8192)                   # 600 rows: several chunks of 2^20 elements
    q = rtn(W, Grid(3, 128, False))
    q.g_idx = q.g_idx[torch.randperm(8192)]      # act-order: columns in any group order
    g = q.g_idx.long()
    assert torch.equal(q.dequantize(), q.scales[:, g] * (q.codes.float() - q.zeros[:, g]))


def test_more_bits_less_error():
    W = torch.randn(64, 128)
    errs = [(rtn(W, Grid(b, 32, True)).dequantize() - W).norm() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "bits"), (dict(bits=9), "bits"), (dict(group_size=0), "group_size"),
    (dict(method="magic"), "unknown method"), (dict(damp=0), "damp"), (dict(static_groups=True, group_size=-1), "static_groups"),
    (dict(compute_dtype="float64"), "compute_dtype"), (dict(compute_dtype="bf16"), "compute_dtype"),
    (dict(quantize_lm_head=True), "not implemented"),
])
def test_config_rejects_impossible_settings(kwargs, match):
    with pytest.raises(QForgeError, match=match):
        QuantizeConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = QuantizeConfig(bits=3, group_size=64, sym=False, skip=("*.o_proj",))
    cfg.save(tmp_path / "c.json")
    assert QuantizeConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(QForgeError, match="unknown field"):
        QuantizeConfig.from_dict({"bits": 4, "colour": "red"})


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), rows=st.integers(1, 9), cols=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_scale_search_never_loses_to_min_max_on_its_weighted_error(bits, sym, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) ** 3 * torch.rand(rows, 1, generator=g)   # heavy tails
    c = torch.rand(cols, generator=g) + 0.01
    grid = Grid(bits, -1, sym)

    def err(scale, zero):
        return (((dequantize(quantize(W, scale, zero, grid), scale, zero) - W) ** 2) * c).sum(dim=1)

    s, z = search_params(W, grid, c)
    assert (err(s, z) <= err(*fit_params(W, grid)) * (1 + 1e-6) + 1e-12).all()
    q = quantize(W, s, z, grid)
    assert q.min() >= 0 and q.max() <= grid.maxq and (s > 0).all()


def test_scale_search_clips_a_cheap_outlier_and_one_step_is_min_max():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 64, generator=g)
    W[:, 0] = 12.0                                   # an outlier column whose error costs almost nothing
    c = torch.ones(64)
    c[0] = 1e-4
    grid = Grid(3, -1, True)
    s0, z0 = fit_params(W, grid)
    s, z = search_params(W, grid, c)
    assert (s < 0.8 * s0).all()                      # the range shrank for every row
    s1, z1 = search_params(W, grid, c, steps=1)
    assert torch.equal(s1, s0) and torch.equal(z1, z0)


def test_scale_search_is_a_gptq_option():
    assert QuantizeConfig(method="gptq").scale_search and QuantizeConfig(method="awq+gptq").scale_search
    assert not QuantizeConfig(method="rtn").scale_search and not QuantizeConfig(method="awq").scale_search
    assert not QuantizeConfig(method="gptq", scale_search=False).scale_search
    with pytest.raises(QForgeError, match="scale_search is a GPTQ option"):
        QuantizeConfig(method="rtn", scale_search=True)


def test_awq_clip_defaults_to_on_unless_gptq_searches_the_ranges():
    assert QuantizeConfig(method="awq").awq_clip and not QuantizeConfig(method="awq+gptq").awq_clip
    assert QuantizeConfig(method="awq+gptq", scale_search=False).awq_clip
    assert QuantizeConfig(method="awq+gptq", awq_clip=True).awq_clip and not QuantizeConfig(method="awq", awq_clip=False).awq_clip
    assert not QuantizeConfig(method="gptq").awq_clip


@pytest.mark.parametrize("caps,want", [({"avx512_bf16": True}, "bfloat16"), ({"amx_bf16": True}, "bfloat16"),
                                       ({"avx512_bf16": False, "avx2": True}, "float32"), ({}, "float32")])
def test_auto_compute_dtype_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, caps, want):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    cfg = QuantizeConfig(method="gptq")
    assert cfg.compute_dtype == "auto" and cfg.for_device("cpu").compute_dtype == want
    assert cfg.for_device("cpu").to_dict() == {**cfg.to_dict(), "compute_dtype": want}
    explicit = QuantizeConfig(method="gptq", compute_dtype="bfloat16")
    assert explicit.for_device("cpu") is explicit                     # a dtype the user chose is kept


def test_quantize_saves_the_compute_dtype_it_ran(tiny_llama_dir, tmp_path):
    import qforge

    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(method="gptq", bits=4, group_size=32))
    m.quantize(nsamples=2, seqlen=32)
    ran = QuantizeConfig(method="gptq").for_device("cpu").compute_dtype
    assert m.config.compute_dtype == ran
    out = m.save(tmp_path / "q")
    assert json.loads((out / "qforge_config.json").read_text())["compute_dtype"] == ran
