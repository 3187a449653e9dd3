"""Evaluation-suite pieces: tensor statistics, simulated activation / KV-cache quantization, SmoothQuant,
distribution comparison, perplexity by position."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

import qforge
from qforge.analysis import Moments, collect_stats, tensor_stats
from qforge.cli.main import main as cli
from qforge.config import SimulationConfig
from qforge.errors import QForgeError
from qforge.eval.compare import compare_logits, compare_to_reference
from qforge.eval.perplexity import bucket_ppl, forward_logits, position_buckets
from qforge.eval.simulate import (QuantizedKVCache, fake_quant_groups_asym, fake_quant_per_token,
                                  quantized_activations)
from qforge.smoothing.smoothquant import smooth_model
from qforge.solvers import InputScheme


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dist", ["normal", "laplace", "student", "shifted"])
def test_statistics_match_numpy_and_scipy(dist):
    g = np.random.default_rng(0)
    x = {"normal": g.normal(size=200_000), "laplace": g.laplace(size=200_000),
         "student": g.standard_t(5, size=200_000), "shifted": 1000.0 + 0.01 * g.normal(size=200_000)}[dist]
    t = torch.tensor(x, dtype=torch.float32)
    st = tensor_stats(t)
    xf = t.double().numpy()
    assert st["absmax"] == pytest.approx(np.abs(xf).max(), rel=1e-12)
    assert st["std"] == pytest.approx(xf.std(), rel=1e-6)
    assert st["kurtosis"] == pytest.approx(sps.kurtosis(xf, fisher=False), rel=1e-5)
    # streaming over uneven chunks gives the same answer
    m = Moments()
    for chunk in np.array_split(xf, 7):
        m.update(torch.tensor(chunk))
    assert m.result()["kurtosis"] == pytest.approx(st["kurtosis"], rel=1e-9)
    if dist == "normal":
        assert st["kurtosis"] == pytest.approx(3.0, abs=0.05)
    if dist == "laplace":
        assert st["kurtosis"] == pytest.approx(6.0, abs=0.2)


def test_collect_stats_covers_weights_inputs_keys_values(tiny_llama):
    samples = [torch.randint(0, 500, (32,), generator=_gen(i)) for i in range(4)]
    st = collect_stats(tiny_llama, samples)
    n_blocks = len(tiny_llama.model.layers)
    assert len(st["tensors"]["weights"]) == len(st["tensors"]["activations"]) == 7 * n_blocks
    assert len(st["tensors"]["keys"]) == len(st["tensors"]["values"]) == n_blocks
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight
    assert st["tensors"]["weights"]["model.layers.0.self_attn.q_proj"]["kurtosis"] == pytest.approx(
        sps.kurtosis(w.detach().double().numpy().ravel(), fisher=False), rel=1e-6)
    k0 = st["tensors"]["keys"]["model.layers.0.keys"]
    head_dim = tiny_llama.config.hidden_size // tiny_llama.config.num_attention_heads
    assert k0["count"] == 4 * 32 * tiny_llama.config.num_key_value_heads * head_dim
    assert [r["layer"] for r in st["layers"]["activations"]] == list(range(n_blocks))
    tails = st["heaviest_tails"]
    assert tails == sorted(tails, key=lambda r: -r["kurtosis"])
    with pytest.raises(QForgeError, match="calibration"):
        collect_stats(tiny_llama, [])


def test_cli_stats_writes_json_and_plots(tiny_llama_dir, tmp_path, capsys, wiki_excerpt):
    out = tmp_path / "stats"
    assert cli(["-q", "stats", str(tiny_llama_dir), "--out", str(out), "--calib", wiki_excerpt, "--nsamples", "4",
                "--calib-seqlen", "32"]) == 0
    printed = capsys.readouterr().out
    assert "normal distribution gives 3" in printed and "heaviest-tailed" in printed
    data = json.loads((out / "stats.json").read_text())
    assert set(data["tensors"]) == {"weights", "activations", "keys", "values"}
    for s in ("absmax", "std", "kurtosis"):
        assert (out / f"stats_{s}.png").stat().st_size > 1000
    assert cli(["-q", "stats", str(tiny_llama_dir), "--out", str(out)]) == 2      # exists: refused, kept


# ---- simulated quantization ---------------------------------------------------------------------

def test_per_token_fake_quant_is_the_signed_symmetric_grid():
    x = torch.randn(5, 64, generator=_gen(1)) * torch.linspace(0.1, 10, 64)
    for bits in (8, 4):
        q = fake_quant_per_token(x, bits)
        qmax = 2 ** (bits - 1) - 1
        s = x.abs().amax(-1, keepdim=True) / qmax
        codes = q / s
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= qmax + 1e-4
        assert (q - x).abs().max() <= 0.5 * s.max() + 1e-6
    assert (fake_quant_per_token(x, 8) - x).norm() < (fake_quant_per_token(x, 4) - x).norm()


def test_kv_fake_quant_groups_are_asymmetric_grids():
    x = torch.randn(2, 3, 7, 16, generator=_gen(2)) + 3.0        # [B, heads, T, head_dim], off-centre
    q = fake_quant_groups_asym(x, 2, 8)
    for grp in q.reshape(-1, 8):
        assert len(torch.unique(grp.round(decimals=5))) <= 4
    errs = [(fake_quant_groups_asym(x, b, -1) - x).norm() for b in (8, 4, 3, 2)]
    assert errs == sorted(errs)
    with pytest.raises(QForgeError, match="does not divide"):
        fake_quant_groups_asym(x, 4, 5)


def test_quantized_kv_cache_quantizes_what_attention_reads(tiny_llama):
    x = torch.randint(0, 500, (1, 40), generator=_gen(3))
    base = forward_logits(tiny_llama, x)
    cache = QuantizedKVCache(tiny_llama.config, 2)
    out = tiny_llama(input_ids=x, past_key_values=cache, use_cache=True).logits
    keys = cache.layers[0].keys                                   # [B, kv_heads, T, head_dim]
    for row in keys.reshape(-1, keys.shape[-1]):
        assert len(torch.unique(row)) <= 4
    d8 = (forward_logits(tiny_llama, x, lambda: QuantizedKVCache(tiny_llama.config, 8)) - base).abs().max()
    d2 = (out - base).abs().max()
    assert 0 < d8 < d2


def test_activation_quantization_hooks_every_linear_and_leave_no_trace(tiny_llama):
    x = torch.randint(0, 500, (1, 24), generator=_gen(4))
    base = forward_logits(tiny_llama, x)
    with quantized_activations(tiny_llama, InputScheme(4)) as n:
        a4 = forward_logits(tiny_llama, x)
    with quantized_activations(tiny_llama, InputScheme(8)):
        a8 = forward_logits(tiny_llama, x)
    assert n == 7 * len(tiny_llama.model.layers)
    assert 0 < (a8 - base).abs().max() < (a4 - base).abs().max()
    assert torch.equal(forward_logits(tiny_llama, x), base)
    with pytest.raises(QForgeError):
        with quantized_activations(tiny_llama, InputScheme(3)):
            pass


def test_smoothquant_keeps_the_fp_function_and_flattens_inputs(tiny_llama):
    samples = [torch.randint(0, 500, (32,), generator=_gen(10 + i)) for i in range(4)]
    lin = tiny_llama.model.layers[0].mlp.gate_proj
    with torch.no_grad():                                       # plant an outlier channel in the MLP input
        tiny_llama.model.layers[0].post_attention_layernorm.weight[3] = 40.0
    x = torch.randint(0, 500, (2, 32), generator=_gen(5))
    base = forward_logits(tiny_llama, x)

    def input_spread():
        seen = []
        h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax(dim=(0, 1))))
        forward_logits(tiny_llama, x)
        h.remove()
        return float(seen[0].max() / seen[0].median())

    before = input_spread()
    scales = smooth_model(tiny_llama, samples, 0.5)
    assert "0.post_attention_layernorm" in scales and "0.input_layernorm" in scales
    assert torch.allclose(forward_logits(tiny_llama, x), base, rtol=1e-5, atol=1e-5 * float(base.abs().max()))
    assert input_spread() < before / 2
    with pytest.raises(QForgeError, match="alpha"):
        smooth_model(tiny_llama, samples, 1.5)


@pytest.mark.parametrize("model_type", ["mixtral", "gemma2", "opt", "gpt_neox", "phi3"])
def test_smoothquant_keeps_the_fp_function_on_other_architectures(model_type, caplog):
    import logging

    from tiny_models import tiny_model

    m = tiny_model(model_type)
    samples = [torch.randint(0, 500, (32,), generator=_gen(10 + i)) for i in range(4)]
    x = torch.randint(0, 500, (2, 32), generator=_gen(5))
    base = forward_logits(m, x)
    with caplog.at_level(logging.INFO, logger="qforge.smoothing.smoothquant"):
        scales = smooth_model(m, samples, 0.5)
    assert scales
    assert torch.allclose(forward_logits(m, x), base, rtol=1e-5, atol=1e-5 * float(base.abs().max()))
    if model_type == "mixtral":                                 # the experts' norm mapping folds; per-expert ones are AWQ's
        assert "0.post_attention_layernorm" in scales
        assert any("per-expert" in r.message for r in caplog.records)


def test_simulation_config_validates_and_labels():
    assert SimulationConfig(weight_bits=4, act_bits=8).label == "W4A8"
    assert SimulationConfig(kv_bits=2, smoothquant=0.5).label == "W16A16 KV2 SmoothQuant(0.5)"
    for bad in (dict(act_bits=6), dict(kv_bits=5), dict(smoothquant=2.0), dict(weight_bits=1)):
        with pytest.raises(QForgeError):
            SimulationConfig(**bad)
    again = SimulationConfig.from_dict(json.loads(json.dumps(SimulationConfig(kv_bits=4).to_dict())))
    assert again == SimulationConfig(kv_bits=4)


# ---- comparison and perplexity by position ------------------------------------------------------

def test_compare_logits_matches_a_longhand_kl():
    a, b = torch.randn(9, 50, generator=_gen(6)), torch.randn(9, 50, generator=_gen(7))
    t = torch.randint(0, 50, (9,), generator=_gen(8))
    r = compare_logits(a, b, t)
    p, q = torch.softmax(b.double(), -1).numpy(), torch.softmax(a.double(), -1).numpy()
    assert r["kl"].numpy() == pytest.approx([sps.entropy(p[i], q[i]) for i in range(9)], rel=1e-5)
    assert r["top1"].tolist() == (a.argmax(-1) == b.argmax(-1)).double().tolist()
    assert r["dp"].numpy() == pytest.approx(q[range(9), t.numpy()] - p[range(9), t.numpy()], abs=1e-6)
    same = compare_logits(a, a, t)
    assert float(same["kl"].max()) < 1e-6 and float(same["top1"].min()) == 1.0 and float(same["dp"].abs().max()) == 0


def test_compare_to_reference_sees_kv_damage(tiny_llama):
    w = torch.randint(0, 500, (2, 48), generator=_gen(9))
    assert compare_to_reference(tiny_llama, tiny_llama, w, show_progress=False)["kld_mean"] < 1e-9
    r8 = compare_to_reference(tiny_llama, tiny_llama, w, make_cache=lambda: QuantizedKVCache(tiny_llama.config, 8),
                              show_progress=False)
    r2 = compare_to_reference(tiny_llama, tiny_llama, w, make_cache=lambda: QuantizedKVCache(tiny_llama.config, 2),
                              show_progress=False)
    assert 0 < r8["kld_mean"] < r2["kld_mean"] and r2["top1_agreement"] <= r8["top1_agreement"]
    assert r2["positions"] == 2 * 47


@pytest.mark.parametrize("model_type", ["lfm2", "granitemoehybrid", "qwen3_next", "bamba", "nemotron_h", "qwen3_5_text",
                                        "jamba", "gemma4_text"])
def test_kv_simulation_quantizes_only_the_attention_blocks_of_a_hybrid(model_type):
    """LFM2, Granite 4.0-H, Qwen3-Next, Bamba, Nemotron-H, Qwen3.5, Jamba (block 0 a convolution, Mamba-2, Gated
    DeltaNet, Mamba-1; block 1 attention): the cache
    keeps the convolution's (and recurrent) state as it is and quantizes the attention block's keys and values; damage
    grows as bits shrink. Gemma 4's last blocks reuse the keys and values blocks 0 and 1 leave, as the cache
    returns them (quantized)."""
    from tiny_models import tiny_model

    m = tiny_model(model_type)
    w = torch.randint(0, 500, (2, 48), generator=_gen(9))
    r8, r2 = (compare_to_reference(m, m, w, make_cache=lambda b=b: QuantizedKVCache(m.config, b), show_progress=False)
              for b in (8, 2))
    assert 0 < r8["kld_mean"] < r2["kld_mean"]
    cache = QuantizedKVCache(m.config, 2)
    with torch.no_grad():
        m(w, past_key_values=cache, use_cache=True)
    keys = cache.layers[1].keys                                   # the attention block's: at most 4 levels a group
    assert all(len(torch.unique(g)) <= 4 for g in keys.reshape(-1, keys.shape[-1])[:16])


def test_position_buckets_partition_the_window():
    for T in (2048, 256, 40):
        b = position_buckets(T)
        assert b[0][0] == 1 and b[-1][1] == T and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    nll = torch.rand(3, 255, generator=_gen(11), dtype=torch.float64)
    rows = bucket_ppl(nll, 256)
    total = sum(math.log(r["ppl"]) * (r["positions"][1] - r["positions"][0]) for r in rows)
    assert total / 255 == pytest.approx(float(nll.mean()), rel=1e-12)


def test_cli_eval_simulates_and_compares(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert cli(["-q", "eval", str(tiny_llama_dir), "--dataset", "wiki", "--eval-seqlen", "64", "--max-windows", "2",
                "--w-bits", "8", "--act-bits", "8", "--kv-bits", "4", "--reference", str(tiny_llama_dir),
                "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "W8A8 KV4" in printed and "mean KLD" in printed and "by position" in printed
    row = json.loads(out.read_text())[0]
    assert row["simulation"]["kv_bits"] == 4 and row["reference"]["kld_mean"] > 0
    with pytest.raises(SystemExit):                                                    # argparse refuses
        cli(["-q", "eval", str(tiny_llama_dir), "--act-bits", "5"])


# ---- calibration study and report ---------------------------------------------------------------

def test_overfit_warning_compares_off_domain_damage_with_the_mix():
    from qforge.eval.study import degradation, overfit_warnings

    fp = {"wiki": 10.0, "chat": 10.0, "code": 10.0}
    ppl = {"chat": {"wiki": 30.0, "chat": 10.5, "code": 25.0},      # great in-domain, ruins the rest
           "wiki": {"wiki": 11.0, "chat": 11.5, "code": 11.2},
           "mix": {"wiki": 11.2, "chat": 11.2, "code": 11.2}}
    deg = degradation(fp, ppl, list(fp))
    assert deg["chat"]["in_domain"] == pytest.approx(0.05) and deg["chat"]["off_domain"] == pytest.approx(1.75)
    assert deg["mix"]["in_domain"] is None and deg["mix"]["off_domain"] == pytest.approx(0.12)
    warnings = overfit_warnings(deg, 3.0)
    assert len(warnings) == 1 and "chat" in warnings[0]


def test_cli_study_fills_the_matrix_and_report_reads_a_run(tiny_llama_dir, tmp_path, capsys, wiki_excerpt):
    out = tmp_path / "study"
    assert cli(["-q", "study", "calibration", str(tiny_llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "-1",
                "--domains", "wiki,code", "--nsamples", "4", "--calib-seqlen", "32", "--eval-seqlen", "64",
                "--max-windows", "1", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert set(study["ppl"]) == {"wiki", "code", "mix"}
    assert all(set(r) == {"wiki", "code"} and all(math.isfinite(v) and v > 1 for v in r.values())
               for r in study["ppl"].values())
    assert (out / "study.png").stat().st_size > 1000 and "off-domain" in capsys.readouterr().out
    assert cli(["-q", "study", "calibration", str(tiny_llama_dir), "--method", "rtn"]) == 2    # nothing to study

    run = tmp_path / "run"
    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "-1",
                "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32", "--out", str(run)]) == 0
    assert cli(["-q", "report", str(run), "--eval", "--dataset", "wiki", "--eval-seqlen", "64", "--max-windows", "1"]) == 0
    page = (run / "report" / "report.md").read_text()
    for heading in ("## Settings", "## Calibration", "## Size", "## Perplexity", "## Per-layer quantization error"):
        assert heading in page
    assert "| wiki |" in page and (run / "report" / "layer_error.png").is_file()
    assert qforge.load(str(run)).quantized                                # the report did not disturb the run
    assert cli(["-q", "report", str(tmp_path)]) == 2
