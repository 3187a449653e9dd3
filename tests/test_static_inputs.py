"""Static input scales (act_static): W8A8 and FP8 W8A8 whose linears quantize every token's input with one scale
calibrated at quantization time (llm-compressor's `dynamic: false` activations), through config, pipeline, saved
output, run state, compressed-tensors export and loading, and evaluation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.eval import load_eval_text, perplexity
from qforge.eval.simulate import quantized_activations
from qforge.formats import compressed_tensors as ct
from qforge.models.arch import linear_modules
from qforge.solvers import Grid, InputScheme, rtn
from qforge.solvers.grid import FP8_MAX, to_e4m3
from qforge.solvers.input_scale import RATIOS, clip_errors, fake_quant_static, qmax

STATIC = dict(bits=8, group_size=-1, act_bits=8, act_static=True)


def test_static_scales_need_quantized_inputs_and_calibration():
    with pytest.raises(QForgeError, match="needs act_bits 8"):
        QuantizeConfig(method="rtn", bits=8, group_size=-1, act_static=True)
    assert QuantizeConfig(method="rtn", **STATIC).needs_calibration           # RTN observes the inputs
    assert not QuantizeConfig(method="rtn", bits=8, group_size=-1, act_bits=8).needs_calibration


def test_fake_quant_static_rounds_on_the_fixed_scale_and_saturates():
    torch.manual_seed(0)
    x = torch.randn(6, 40) * 3
    s = torch.tensor([0.02])                                   # 127 * 0.02 = 2.54 < max|x|: some inputs saturate
    y = fake_quant_static(x, s)
    codes = y / s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.min() >= -128 and codes.max() <= 127 and (codes.abs() >= 127).any()
    inside = x.abs() < 2.5
    assert torch.all((y - x)[inside].abs() <= s / 2 + 1e-6)
    f = fake_quant_static(x, s, fp8=True)                      # E4M3 of x / s, saturating at 448
    torch.testing.assert_close(f, to_e4m3(x / s).float() * s, rtol=0, atol=0)
    assert f.abs().max() <= FP8_MAX * s + 1e-6


@pytest.mark.parametrize("fp8", [False, True])
def test_static_layers_round_trip_with_their_input_scale(fp8):
    torch.manual_seed(0)
    q = rtn(torch.randn(24, 32), Grid(8, -1, True, fp8))
    static = InputScheme(8, fp8, static=True)
    with pytest.raises(QForgeError, match="input_scale"):
        ct.pack(q, torch.float32, static)                      # static without a calibrated scale
    q.input_scale = torch.tensor([0.0123])
    t = ct.pack(q, torch.float16, static)
    assert t["input_scale"].dtype == torch.float32 and t["input_scale"].shape == (1,)
    assert "input_scale" not in ct.pack(q, torch.float16, InputScheme(8, fp8))   # dynamic inputs store none
    back = ct.unpack(t, q.grid)
    assert torch.equal(back.input_scale, q.input_scale)
    assert torch.equal(back.codes.view(torch.uint8), q.codes.view(torch.uint8))
    for bad in (torch.tensor([0.0]), torch.tensor([float("nan")]), torch.tensor([0.1, 0.2])):
        with pytest.raises(QForgeError, match="one positive number"):
            ct.unpack({**t, "input_scale": bad}, q.grid)


def test_static_per_tensor_inputs_are_read_and_other_schemes_refused():
    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    dyn = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    static = {**dyn, "dynamic": False, "strategy": "tensor"}
    assert ct.input_acts({"config_groups": {"g": {"weights": w, "input_activations": static}}}) == InputScheme(8, static=True)
    fp8 = {**static, "type": "float"}
    assert ct.input_acts({"config_groups": {"g": {"weights": w, "input_activations": fp8}}}) == InputScheme(8, True, True)
    for bad, msg in (({**static, "strategy": "token"}, "int token static"),
                     ({**static, "symmetric": False}, "asymmetric")):
        with pytest.raises(QForgeError, match=msg):
            ct.input_acts({"config_groups": {"g": {"weights": w, "input_activations": bad}}})
    with pytest.raises(QForgeError, match="different input quantizations"):
        ct.input_acts({"config_groups": {"a": {"weights": w, "input_activations": dyn},
                                         "b": {"weights": w, "input_activations": static}}})


def _observed_absmax(model, samples) -> dict[str, float]:
    """max |x| of every linear's input over the samples, the whole quantized model run at once (no input
    quantization): what the pipeline's block-by-block observation must have found."""
    seen: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, max(seen.get(n, 0.0),
                                                                                     float(a[0].abs().max()))))
             for n, m in linear_modules(model).items()]
    with torch.no_grad():
        model(torch.stack(samples))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method,fp8", [("rtn", False), ("gptq", False), ("gptq", True)])
def test_static_scales_are_the_quantized_models_input_maxima(method, fp8, tiny_llama_dir, wiki_excerpt, tmp_path):
    # fp32 passes: the maxima bf16 passes ("auto" where the CPU multiplies bf16) observe are bf16's, within 0.4%
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method=method, fp8=fp8, compute_dtype="float32", **STATIC))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    scales = m.input_scales
    assert scales is not None and scales.keys() == m.result.layers.keys()
    absmax = _observed_absmax(m.model, m.calibration.samples)
    for name, s in scales.items():                   # q/k/v (gate/up) read one input: one scale
        assert float(s) * (FP8_MAX if fp8 else 127) == pytest.approx(absmax[name], rel=1e-5)
    layer0 = {n.rsplit(".", 1)[1]: float(s) for n, s in scales.items() if ".layers.0." in n}
    assert layer0["q_proj"] == layer0["k_proj"] == layer0["v_proj"] != layer0["o_proj"]

    out = m.save(tmp_path / "out")
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert (acts["dynamic"], acts["strategy"], acts["type"]) == (False, "tensor", "float" if fp8 else "int")
    packed, saved = qforge.load(tmp_path / "ct"), qforge.load(out)
    for other in (packed, saved):
        assert other.act_bits == 8 and other.act_fp8 == fp8
        assert all(torch.equal(other.input_scales[n], s) for n, s in scales.items())
    rows = {k: qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0] for k, q in
            (("memory", m), ("saved", saved), ("packed", packed))}
    assert all(r["act_static"] for r in rows.values())
    ppl = {k: r["ppl"] for k, r in rows.items()}
    assert ppl["saved"] == pytest.approx(ppl["memory"], rel=1e-6)
    assert ppl["packed"] == pytest.approx(ppl["memory"], rel=1e-5)
    # the static scales are what the evaluation used: per-token scales on the same weights score otherwise
    text = load_eval_text("wiki")
    with quantized_activations(packed.model, InputScheme(8, fp8=fp8), set(packed.result.layers)):
        dynamic = perplexity(packed.model, packed.tokenizer, text, 64, 2)["ppl"]
    assert abs(dynamic - ppl["packed"]) > 1e-5 * ppl["packed"]


def test_clip_errors_prefer_clipping_a_lone_outlier():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[3, 7] = 200.0                                   # one token's outlier sets max |x|: a step of 1.6 for the rest
    err = clip_errors(x, x.abs().max())
    assert err.shape == (len(RATIOS),) and RATIOS[int(err.argmin())] < 1 and err.min() < 0.9 * err[0]
    x[3, 7] = 0.0
    assert err.min() > 100 * clip_errors(x, x.abs().max()).min()   # without it, a fine step for all
    for fp8 in (False, True):                         # the errors are those of fake_quant_static at each scale
        k = 5
        want = (fake_quant_static(x, x.abs().max() * RATIOS[k] / qmax(fp8), fp8) - x).pow(2).sum()
        assert float(clip_errors(x, x.abs().max(), fp8)[k]) == pytest.approx(float(want), rel=1e-6)


def test_the_mse_observer_picks_the_least_error_ratio_of_the_models_inputs(tiny_llama_dir, wiki_excerpt):
    with pytest.raises(QForgeError, match="needs act_static"):
        QuantizeConfig(method="rtn", bits=8, group_size=-1, act_bits=8, act_observer="mse")
    with pytest.raises(QForgeError, match="act_observer must be one of"):
        QuantizeConfig(method="rtn", act_observer="p99", **STATIC)
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="rtn", act_observer="mse", compute_dtype="float32",
                                                   **STATIC))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    inputs: dict[str, list] = {}
    hooks = [mod.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].flatten(0, -2)))
             for n, mod in linear_modules(m.model).items()]
    with torch.no_grad():
        m.model(torch.stack(m.calibration.samples))
    for h in hooks:
        h.remove()
    clipped = 0
    for name, s in m.input_scales.items():
        x = torch.cat(inputs[name])
        err = clip_errors(x, x.abs().max())
        picked = float(s) * 127 / float(x.abs().max())             # the ratio the pipeline chose
        k = min(range(len(RATIOS)), key=lambda j: abs(RATIOS[j] - picked))
        assert abs(RATIOS[k] - picked) < 1e-4
        assert float(err[k]) <= float(err.min()) * (1 + 1e-4)
        clipped += RATIOS[k] < 1
    assert clipped > 0


def test_static_scales_stream_and_resume(tiny_llama_dir, wiki_excerpt, tmp_path):
    """The scales live in the run state with their block: a streamed run (every block saved, then read back) gives
    the in-memory run's scales and checkpoint."""
    from runs import streamed_and_in_memory

    a, b = streamed_and_in_memory(tiny_llama_dir, QuantizeConfig(method="gptq", smoothquant=0.5, **STATIC),
                                  wiki_excerpt, tmp_path)
    assert a.input_scales.keys() == b.input_scales.keys()
    assert all(torch.equal(a.input_scales[n], s) for n, s in b.input_scales.items())
    ppl = [qforge.evaluate(q, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for q in (a, b)]
    assert ppl[0] == ppl[1]


def test_static_inputs_from_the_command_line(tiny_llama_dir, wiki_excerpt, tmp_path, capsys):
    from qforge.cli.main import main

    out, packed = tmp_path / "q", tmp_path / "ct"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--method", "rtn", "--bits", "8", "--group-size", "-1",
                 "--fp8", "--act-bits", "8", "--act-static", "--calib", wiki_excerpt, "--nsamples", "4",
                 "--calib-seqlen", "32", "--out", str(out), "--format", "compressed-tensors",
                 "--export-out", str(packed)]) == 0
    assert "FP8 W8A8 (static input scales)" in capsys.readouterr().out
    assert json.loads((out / "qforge_config.json").read_text())["act_static"] is True
    again = tmp_path / "again"                                  # the saved output exports the same checkpoint
    assert main(["-q", "export", str(out), "--format", "compressed-tensors", "--out", str(again)]) == 0
    a, b = load_file(packed / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert sum(k.endswith(".input_scale") for k in a) == 14
    assert main(["-q", "eval", str(packed), "--dataset", "wiki", "--seqlen", "32", "--max-windows", "2"]) == 0
    assert "quantized to fp8 with static scales" in capsys.readouterr().out
    assert main(["quantize", str(tiny_llama_dir), "--bits", "8", "--group-size", "-1", "--act-static",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "needs act_bits 8" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_static_checkpoint_without_its_input_scales_is_refused_on_loading(tiny_llama_dir, wiki_excerpt, tmp_path):
    import shutil

    from safetensors.torch import save_file

    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="rtn", **STATIC))
    m.quantize(wiki_excerpt, nsamples=2, seqlen=32)
    m.export(tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    shutil.copytree(tmp_path / "ct", tmp_path / "bad")
    t = load_file(tmp_path / "ct" / "model.safetensors")
    gone = next(k for k in t if k.endswith(".input_scale"))
    save_file({k: v for k, v in t.items() if k != gone}, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(QForgeError, match="store no input_scale"):
        qforge.load(tmp_path / "bad")
    # the config rules: stored scales under a dynamic scheme are not used
    cfg_file = tmp_path / "ct" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(dynamic=True, strategy="token")
    cfg_file.write_text(json.dumps(cfg))
    dynamic = qforge.load(tmp_path / "ct")
    assert dynamic.act_bits == 8 and dynamic.input_scales is None
