"""Mixed precision over fused sets (models/fused.py): the linears a serving engine runs as one module take one
scheme in the plan, the search and the quantized model, and the gptq export's `dynamic` rules name the fused
module too, so vLLM (which matches rules against its own fused names) reads every set at its scheme."""
from __future__ import annotations

import itertools
import json
import logging
import random
import re

import pytest
import torch

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.mixed import measure_model, plan
from qforge.mixed.search import searched_allocation
from qforge.models.arch import arch_spec, named_block_linears
from qforge.models.fused import engine_module, fused_sets
from tiny_models import VOCAB, tiny_model

CFG = QuantizeConfig(method="gptq", bpw=3.0, compute_dtype="float32")


def samples(n=6, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (T,), generator=g) for _ in range(n)]


def _leaves(members, prefix):
    return sorted(m[len(prefix):] for m in members)


@pytest.mark.parametrize("model_type", ["llama", "cohere", "phi", "qwen2_moe", "deepseek_v3", "gpt_neox"])
def test_fused_sets_are_the_table_groups_under_one_parent_and_a_blocks_experts(model_type):
    model = tiny_model(model_type)
    spec = arch_spec(model)
    names = list(named_block_linears(model, spec))
    sets = fused_sets(spec, names)
    assert sorted(n for m in sets.values() for n in m) == sorted(names)          # every linear in one set
    for members in sets.values():                                                  # a set lies in one block
        assert len({m[len(spec.blocks) + 1:].split(".")[0] for m in members}) == 1
    b0, b1 = f"{spec.blocks}.0.", f"{spec.blocks}.1."
    multi = {u: m for u, m in sets.items() if len(m) > 1}
    if model_type in ("llama", "cohere", "phi"):
        # q/k/v one set; gate/up one set where the MLP has both, even when one table group holds q/k/v and the MLP
        assert _leaves(sets[f"{b0}self_attn.{{q_proj,k_proj,v_proj}}"], f"{b0}self_attn.") == ["k_proj", "q_proj",
                                                                                              "v_proj"]
        has_gate_up = model_type != "phi"                 # Phi's MLP is fc1/fc2
        assert (f"{b0}mlp.{{gate_proj,up_proj}}" in sets) == has_gate_up
        n_blocks = len({n[len(spec.blocks) + 1:].split(".")[0] for n in names})
        assert len(multi) == (2 if has_gate_up else 1) * n_blocks
    elif model_type == "qwen2_moe":
        experts = sets[f"{b1}mlp.experts.*"]                # gate/up and down of every expert: one set
        assert {e.split(".")[-2] for e in experts} == {"gate_up_proj", "down_proj"} and len(experts) % 2 == 0
        assert _leaves(sets[f"{b1}mlp.shared_expert.{{gate_proj,up_proj}}"], f"{b1}mlp.shared_expert.") == \
            ["gate_proj", "up_proj"]
    elif model_type == "deepseek_v3":
        assert _leaves(sets[f"{b0}self_attn.{{q_a_proj,kv_a_proj_with_mqa}}"], f"{b0}self_attn.") == \
            ["kv_a_proj_with_mqa", "q_a_proj"]
        assert f"{b1}mlp.experts.*" in sets
    else:                                                   # GPT-NeoX fuses q|k|v in its checkpoint already
        assert not multi
    with pytest.raises(QForgeError, match="not a block linear"):
        fused_sets(spec, [f"{spec.blocks}.0.no_such_proj"])


def test_engine_module_is_the_name_vllm_gives_the_fused_module():
    assert engine_module("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn.qkv_proj"
    assert engine_module("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_up_proj"
    assert engine_module("model.layers.3.mlp.shared_expert.gate_proj") == \
        "model.layers.3.mlp.shared_expert.gate_up_proj"
    assert engine_module("model.layers.0.self_attn.kv_a_proj_with_mqa") == "model.layers.0.self_attn.fused_qkv_a_proj"
    assert engine_module("model.layers.1.mlp.experts.7.down_proj") == "model.layers.1.mlp.experts"
    assert engine_module("model.layers.1.block_sparse_moe.experts.0.w1") == "model.layers.1.block_sparse_moe.experts"
    assert engine_module("model.layers.3.self_attn.o_proj") is None
    assert engine_module("model.layers.3.mlp.down_proj") is None


def _random_measurement(seed, units):
    rng = random.Random(seed)
    schemes = [(2, 32), (3, 64), (3, 32), (4, 64), (4, -1), (8, -1)]
    layers = {}
    for members in units.values():
        for n in members:
            numel = rng.choice([64, 96]) * 64
            layers[n] = {"shape": [numel // 64, 64], "options": [
                {"bits": b, "group_size": g, "sym": True, "stored_bits": numel * b + rng.randint(0, 64 * 16),
                 "err": rng.random() * 2.0 ** -b} for b, g in schemes]}
    return {"format": "compressed-tensors", "layers": layers}


@pytest.mark.parametrize("seed", range(4))
def test_a_plan_over_units_gives_each_unit_one_scheme_and_is_the_exact_optimum(seed):
    units = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
    m = _random_measurement(seed, units)
    numel = {n: d["shape"][0] * d["shape"][1] for n, d in m["layers"].items()}
    target = 3.6
    a = plan(m, target, units=units, pc_min_bits=0)
    assert a.bpw <= target
    for members in units.values():
        assert len({(a.layers[n]["bits"], a.layers[n]["group_size"]) for n in members}) == 1
    options = {n: {(o["bits"], o["group_size"]): o for o in d["options"]} for n, d in m["layers"].items()}
    schemes = list(options["q"])
    best = float("inf")                                   # every tied assignment that fits, by brute force
    for pick in itertools.product(schemes, repeat=len(units)):
        chosen = {n: options[n][s] for s, members in zip(pick, units.values()) for n in members}
        if sum(o["stored_bits"] for o in chosen.values()) <= target * sum(numel.values()):
            best = min(best, sum(o["err"] for o in chosen.values()))
    assert a.total_err == pytest.approx(best, rel=1e-9)   # the DP's cost grid loses nothing on these costs
    free = plan(m, target, pc_min_bits=0)                 # per linear: never worse, as it has more choices
    assert free.total_err <= a.total_err + 1e-12 and free.bpw <= target


def test_a_unit_whose_linears_share_no_scheme_or_a_linear_in_no_unit_is_refused():
    m = _random_measurement(0, {"qkv": ("q", "k")})
    m["layers"]["k"]["options"] = [o for o in m["layers"]["k"]["options"] if o["bits"] == 8]
    m["layers"]["q"]["options"] = [o for o in m["layers"]["q"]["options"] if o["bits"] != 8]
    with pytest.raises(QForgeError, match="share no measured scheme"):
        plan(m, 6.0, units={"qkv": ("q", "k")})
    with pytest.raises(QForgeError, match="is allocated but in no allocation unit"):
        plan(m, 6.0, units={"qkv": ("q",)})


def test_a_search_over_units_moves_each_unit_as_one(tmp_path):
    model = tiny_model("llama")
    spec = arch_spec(model)
    m = measure_model(model, samples(), tmp_path / "m.json", CFG, "compressed-tensors", (2, 3, 4),
                      show_progress=False, probe_samples=2)
    units = fused_sets(spec, m["layers"])
    start = plan(m, 3.0, units=units)
    a = searched_allocation(model, m, start, samples(), samples(4, seed=1), CFG, generations=6, offspring=4,
                            units=units)
    assert a.bpw <= 3.0 and set(a.layers) == set(start.layers)
    (run,) = a.search["runs"]
    assert run["kl_end"] <= run["kl_start"]
    for members in units.values():
        assert len({(a.layers[n]["bits"], a.layers[n]["group_size"], a.layers[n]["sym"]) for n in members}) == 1
    untied = plan(m, 3.0)
    if any(len({(untied.layers[n]["bits"], untied.layers[n]["group_size"]) for n in ms}) > 1 for ms in units.values()):
        with pytest.raises(QForgeError, match="ties them"):
            searched_allocation(model, m, untied, samples(), samples(4, seed=1), CFG, generations=1, units=units)


def test_bpw_units_fused_ties_the_quantized_model_and_names_the_fused_modules_in_dynamic(tiny_llama_dir, tmp_path,
                                                                                        caplog):
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, bpw_units="fused",
                                                   measurement=str(tmp_path / "m.json")))
    m.quantize(samples())
    with caplog.at_level(logging.WARNING, logger="qforge.export"):
        m.export(tmp_path / "x", "gptq")
    assert "vLLM fuses" not in caplog.text
    spec = arch_spec(m.model)
    layers = m.result.layers
    sets = fused_sets(spec, layers)
    assert all(len({layers[n].grid for n in members}) == 1 for members in sets.values())
    tied = [ms for ms in sets.values() if len(ms) > 1]
    assert tied and len({q.grid for q in layers.values()}) > 1
    # the per-linear plan of the same measurement splits some set here: tying is what changed it
    untied = plan(json.loads((tmp_path / "m.json").read_text()), 3.5, units=None).grids
    assert any(len({untied[n] for n in ms}) > 1 for ms in tied)
    per_linear = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5,
                                                            measurement=str(tmp_path / "m.json")))
    per_linear.quantize(samples())                          # the default, on the same measurement: the per-linear plan
    assert per_linear.result.allocation.grids == untied
    for n, q in layers.items():
        want = (q.grid.bits, q.grid.group_size, q.grid.sym)
        assert _vllm_grid(tmp_path / "x", n) == want, n
        if engine_module(n):                                # the fused module vLLM builds reads the same rule
            assert _vllm_grid(tmp_path / "x", engine_module(n)) == want, n
    back = qforge.load(tmp_path / "x")                      # qforge (and GPTQModel) still read every module
    assert {n: q.grid for n, q in back.result.layers.items()} == {n: q.grid for n, q in layers.items()}


def test_a_moe_blocks_experts_take_one_scheme_and_vllms_experts_module_reads_it(tiny_tokenizer, tmp_path):
    src = tmp_path / "moe"
    tiny_model("qwen2_moe", seed=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    m = qforge.load(str(src), QuantizeConfig(method="gptq", bpw=3.5, bpw_units="fused",
                                             measurement=str(tmp_path / "m.json")))
    m.quantize(samples())
    layers = m.result.layers
    experts = [ms for u, ms in fused_sets(arch_spec(m.model), layers).items() if u.endswith("experts.*")]
    assert experts and all(len({layers[n].grid for n in ms}) == 1 for ms in experts)
    # the export: a block's experts at a scheme other than the base reach vLLM's experts module through their rules
    from qforge.pipeline import quantize_model
    from qforge.solvers import Grid

    r = qforge.load(str(src), QuantizeConfig(method="rtn", bits=4, group_size=64))
    r.result = quantize_model(r.model, r.config, None, grids={n: Grid(4, 32, True) for n in experts[0]},
                              show_progress=False)
    r.export(tmp_path / "x", "gptq")
    stored = qforge.load(tmp_path / "x").result.layers        # per-expert modules, as the checkpoint stores them
    fused = {engine_module(n) for n in stored if engine_module(n) and engine_module(n).endswith(".experts")}
    assert len(fused) == 1 and _vllm_grid(tmp_path / "x", fused.pop()) == (4, 32, True)
    assert sum(_vllm_grid(tmp_path / "x", n) == (4, 32, True) for n in stored) == 3 * len(experts[0]) // 2


def _vllm_grid(out, module):
    """vLLM's reading of a gptq checkpoint's scheme for `module`: the first "+:" rule that matches, else the base."""
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for pattern, fields in qc.get("dynamic", {}).items():
        if re.match(pattern.removeprefix("+:"), module):
            return fields["bits"], fields["group_size"], fields["sym"]
    return qc["bits"], qc["group_size"], qc["sym"]


def test_an_export_whose_fused_set_splits_is_said_not_to_load_in_vllm(tiny_llama_dir, tmp_path, caplog):
    from qforge.pipeline import quantize_model
    from qforge.solvers import Grid

    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="rtn", bits=4, group_size=64))
    k = "model.layers.0.self_attn.k_proj"
    m.result = quantize_model(m.model, m.config, None, grids={k: Grid(4, 32, True)}, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="qforge.export"):
        m.export(tmp_path / "x", "gptq")
    assert "vLLM fuses" in caplog.text and "model.layers.0.self_attn.qkv_proj" in caplog.text
    assert _vllm_grid(tmp_path / "x", k) == (4, 32, True)
    assert _vllm_grid(tmp_path / "x", "model.layers.0.self_attn.qkv_proj") == (4, 64, True)   # no rule claims it


def test_bpw_units_is_validated_and_on_the_cli():
    with pytest.raises(QForgeError, match="bpw_units must be one of fused, linear"):
        QuantizeConfig(method="gptq", bpw=3.0, bpw_units="block")
    from qforge.cli.main import build_parser

    a = build_parser().parse_args(["quantize", "m", "--out", "o", "--bpw", "3.0", "--bpw-units", "fused"])
    assert a.bpw_units == "fused" and QuantizeConfig().bpw_units == "linear"
    assert build_parser().parse_args(["quantize", "m", "--out", "o", "--bpw", "3.0"]).bpw_units == "linear"
