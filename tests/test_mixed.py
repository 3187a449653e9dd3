"""Mixed precision: the knapsack optimiser, exact storage costs, the measurement (proxy, resume), the
quantize pass with per-layer grids and its exports."""
from __future__ import annotations

import itertools
import json
import logging
import math

import pytest
import torch

import qforge
from qforge.cli.main import main as cli
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.mixed import Option, allocate, candidate_grids, load_measurement, measure_model, plan, scheme_bits
from qforge.mixed.measure import output_error
from qforge.mixed.plan import restate_costs
from qforge.capture import capture_block_inputs
from qforge.capture.blocks import make_batches
from qforge.models.arch import arch_spec, block_linears, get_blocks
from qforge.solvers import Grid
from tiny_models import CONFIGS, VOCAB, tiny_model


def random_instance(seed, n_layers=4, n_opts=4):
    g = torch.Generator().manual_seed(seed)
    layers = {f"l{i}": [Option(f"o{j}", int(torch.randint(2, 40, (1,), generator=g)),
                               float(torch.rand(1, generator=g))) for j in range(n_opts)] for i in range(n_layers)}
    return layers, {n: 1 for n in layers}


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exact_optimum_on_integer_costs(seed):
    layers, numel = random_instance(seed)
    target = 60 / len(layers)                        # budget 60 bits, one unit per bit
    chosen = allocate(layers, numel, target, resolution=60)
    assert sum(o.bits for o in chosen.values()) <= 60
    feasible = [c for c in itertools.product(*layers.values()) if sum(o.bits for o in c) <= 60]
    best = min(sum(o.err for o in c) for c in feasible)
    assert sum(o.err for o in chosen.values()) == pytest.approx(best, abs=1e-12)


def test_allocation_refuses_an_impossible_target_and_spends_more_bits_for_less_error():
    layers, numel = random_instance(0)
    with pytest.raises(QForgeError, match="below the cheapest"):
        allocate(layers, numel, 1.0)
    errs = [sum(o.err for o in allocate(layers, numel, t).values()) for t in (12, 18, 25, 40)]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]


def test_output_error_proxy_is_the_relative_output_error():
    X, W = torch.randn(300, 32), torch.randn(16, 32)
    W_hat = W + 0.1 * torch.randn_like(W)
    H = 2 * X.t() @ X / X.shape[0]
    direct = ((X @ (W - W_hat).t()).pow(2).sum() / (X @ W.t()).pow(2).sum()).item()
    assert output_error(W, W_hat, H) == pytest.approx(direct, rel=1e-4)


def test_candidates_use_whole_groups_and_formats_bits():
    assert {g.group_size for g in candidate_grids(96, "gptq")} == {32, -1}
    assert {g.bits for g in candidate_grids(576, "gptq")} == {2, 3, 4, 8}
    assert 5 in {g.bits for g in candidate_grids(576, "compressed-tensors")}
    # gptq stores zeros and g_idx whatever the grid: asymmetric costs the same; compressed-tensors charges for zeros
    assert scheme_bits((64, 576), Grid(4, 64, True), "gptq") == scheme_bits((64, 576), Grid(4, 64, False), "gptq")
    assert scheme_bits((64, 576), Grid(4, 64, True), "compressed-tensors") < \
        scheme_bits((64, 576), Grid(4, 64, False), "compressed-tensors")


def samples(n=6, length=48):
    return [torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_measurement_resumes_after_the_last_finished_block(tiny_llama, tmp_path):
    cfg = QuantizeConfig(method="gptq")
    full = measure_model(tiny_llama, samples(), tmp_path / "m.json", cfg, "gptq", (2, 4), show_progress=False)
    assert full["blocks_done"] == 2 and all(len(d["options"]) >= 4 for d in full["layers"].values())
    for d in full["layers"].values():                 # fewer bits -> larger error, per layer
        by_bits = {o["bits"]: o["err"] for o in d["options"] if o["group_size"] == -1 and o["sym"]}
        assert by_bits[2] > by_bits[4]
    # an interrupted run: block 0 finished (with a marker), block 1 not
    part = dict(full, blocks_done=1, layers={n: d for n, d in full["layers"].items() if ".0." in n})
    marker = next(iter(part["layers"].values()))["options"][0]
    marker["err"] = 123.0
    (tmp_path / "p.json").write_text(json.dumps(part))
    with pytest.raises(QForgeError, match="unfinished"):
        load_measurement(tmp_path / "p.json")
    (tmp_path / "old.json").write_text(json.dumps(dict(full, version=1)))
    with pytest.raises(QForgeError, match="older qforge"):
        load_measurement(tmp_path / "old.json")
    resumed = measure_model(tiny_llama, samples(), tmp_path / "p.json", cfg, "gptq", (2, 4), show_progress=False)
    assert resumed["blocks_done"] == 2 and set(resumed["layers"]) == set(full["layers"])
    assert next(iter(resumed["layers"].values()))["options"][0]["err"] == 123.0       # not measured again
    n1 = next(n for n in full["layers"] if ".1." in n)
    assert resumed["layers"][n1] == full["layers"][n1]
    with pytest.raises(QForgeError, match="other settings"):
        measure_model(tiny_llama, samples(), tmp_path / "p.json", cfg, "compressed-tensors", (2, 4),
                      show_progress=False)
    for bad, match in [("[1, 2", "cannot read measurement"), ("[1, 2]", "not a qforge measurement")]:
        (tmp_path / "bad.json").write_text(bad)                       # refused, and left as it was
        with pytest.raises(QForgeError, match=match):
            measure_model(tiny_llama, samples(), tmp_path / "bad.json", cfg, "gptq", (2, 4), show_progress=False)
        assert (tmp_path / "bad.json").read_text() == bad


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_tail_probe_is_the_full_models_kl(model_type):
    """Running only the blocks from the last one on (its cached fp input handed over) gives the KL a full
    forward gives, on every architecture in the table."""
    from qforge.eval.compare import compare_logits
    from qforge.mixed.probe import TailProbe

    model = tiny_model(model_type)
    spec = arch_spec(model)
    batches = make_batches(samples(4), 2)
    probe = TailProbe(model, spec, batches, stride=3)
    last = len(get_blocks(model, spec)) - 1
    with torch.no_grad():
        ref = [model(input_ids=b).logits for b in batches]
        hidden = capture_block_inputs(model, spec, batches).hidden       # [B, T, hidden] entering block 0
        hidden_last = _fp_inputs_of(model, spec, batches, last)
        assert probe.kl(last, hidden_last) == pytest.approx(0.0, abs=1e-7)
        assert probe.kl(0, hidden) == pytest.approx(0.0, abs=1e-7)
        lin = block_linears(get_blocks(model, spec)[last], spec)[-1][0]   # the block's last linear
        W = lin.weight.detach().clone()
        lin.set_weight(W + 0.2 * W.abs().mean() * torch.randn_like(W))
        try:
            got = probe.kl(last, hidden_last)
            keep = probe.keep
            want = torch.cat([compare_logits(model(input_ids=b).logits[:, keep].flatten(0, 1),
                                             r[:, keep].flatten(0, 1), b[:, keep].flatten())["kl"]
                              for b, r in zip(batches, ref)]).mean()
        finally:
            lin.set_weight(W)
    assert got > 1e-8 and got == pytest.approx(float(want), rel=1e-3)


def _fp_inputs_of(model, spec, batches, i):
    """What block i receives in a plain forward, by a pre-hook."""
    from qforge.models.arch import get_blocks

    seen = []
    h = get_blocks(model, spec)[i].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    try:
        for b in batches:
            model(input_ids=b)
    finally:
        h.remove()
    return seen


def test_loglog_interpolation_passes_through_probes_and_extends_their_slopes():
    from qforge.mixed.probe import interpolate_loglog

    pts = [(1.0, 1e-3), (10.0, 1e-2), (100.0, 1.0)]          # slope 1, then 2
    for x, y in pts:
        assert interpolate_loglog(x, pts) == pytest.approx(y)
    assert interpolate_loglog(math.sqrt(10), pts) == pytest.approx(math.sqrt(10) * 1e-3)
    assert interpolate_loglog(1000.0, pts) == pytest.approx(100.0)          # slope 2 continued
    assert interpolate_loglog(0.1, pts) == pytest.approx(1e-4)               # slope 1 continued
    assert interpolate_loglog(5.0, [(1.0, 2.0)]) == pytest.approx(10.0)      # one probe: proportional
    steep = [(1.0, 1.0), (2.0, 1e6)]
    assert interpolate_loglog(4.0, steep) == pytest.approx(1e6 * 2 ** 3)    # slope clamped to 3 outside


def test_measured_error_is_the_end_to_end_kl_at_the_probes_and_monotone_between(tiny_llama, tmp_path):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    m = measure_model(tiny_llama, samples(), tmp_path / "m.json", QuantizeConfig(method="gptq"), "gptq", (2, 3, 4, 8),
                      show_progress=False)
    for name, d in m["layers"].items():
        probed = sorted((o["rel_err"], o["err"]) for o in d["options"] if o["probed"])
        assert sorted(o["bits"] for o in d["options"] if o["probed"]) == [2, 3, 4]
        assert all(math.isfinite(o["err"]) and o["err"] >= 0 for o in d["options"])
        if all(a[1] < b[1] for a, b in zip(probed, probed[1:])):         # increasing probes: monotone reading
            by_err = sorted((o["rel_err"], o["err"]) for o in d["options"])
            assert all(a[1] <= b[1] * (1 + 1e-9) for a, b in zip(by_err, by_err[1:])), name
        assert max(o["err"] for o in d["options"] if o["bits"] == 8) < \
            min(o["err"] for o in d["options"] if o["bits"] == 2), name
        for g in (32, -1):                              # the layer's own error falls with every bit
            rel = [next(o["rel_err"] for o in d["options"] if (o["bits"], o["group_size"], o["sym"]) == (b, g, True))
                   for b in (2, 3, 4, 8)]
            assert rel == sorted(rel, reverse=True) and rel[-1] < rel[0] / 100, name
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())   # the model is left as it was
    # every option's layer error is GPTQ's on the untouched weight (probes must not leak into later schemes)
    from qforge.pipeline import GPTQSolver, one_pass_stats
    from qforge.solvers import gptq

    spec = arch_spec(tiny_llama)
    block = get_blocks(tiny_llama, spec)[0]
    inputs = capture_block_inputs(tiny_llama, spec, make_batches(samples(), 8))
    groups = block_linears(block, spec)
    stats = one_pass_stats(GPTQSolver(), block, groups, inputs.hidden, inputs.for_block(0), "cpu")
    for ref in (r for g in groups for r in g):
        W, H = ref.weight.detach().clone(), stats[ref.name].H
        for o in m["layers"][f"{spec.blocks}.0.{ref.name}"]["options"]:
            W_hat = gptq(W, H, Grid(o["bits"], o["group_size"], o["sym"]), group_aware=True,
                         scale_search=True).dequantize()
            assert o["rel_err"] == pytest.approx(output_error(W, W_hat, H), rel=1e-4), (ref.name, o)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_mixed_quantize_hits_the_budget_and_its_export_stores_exactly_that(fmt, tiny_llama_dir, tmp_path):
    cfg = QuantizeConfig(method="gptq", bpw=3.5, bpw_format=fmt, measurement=str(tmp_path / "m.json"))
    m = qforge.load(tiny_llama_dir, cfg)
    m.quantize(samples())
    alloc = m.result.allocation
    assert alloc.bpw <= 3.5 and len({q.grid for q in m.result.layers.values()}) > 1
    for name, q in m.result.layers.items():
        assert q.grid == alloc.grids[name]
    sizes = m.export(tmp_path / "x", fmt)
    assert sizes["bits_per_weight"] == pytest.approx(alloc.bpw, rel=1e-12)   # predicted == read off the files
    back = qforge.load(tmp_path / "x")
    for name, q in m.result.layers.items():
        r = back.result.layers[name]
        assert r.grid == q.grid and torch.equal(r.codes, q.codes), name
    if fmt == "gptq":
        qc = json.loads((tmp_path / "x" / "quantize_config.json").read_text())
        assert qc["dynamic"] and all(k.startswith("+:") for k in qc["dynamic"])
    m.save(tmp_path / "out")
    assert (tmp_path / "out" / "allocation.json").is_file() and (tmp_path / "out" / "allocation.png").is_file()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe"])
def test_mixed_precision_on_blocks_of_two_kinds(model_type, tiny_tokenizer, tmp_path):
    """A dense first block and a MoE block with shared experts (and DeepSeek's latent attention): the measurement
    covers each block's own linears, every expert included, and the packed export of the allocation loads back."""
    src = tmp_path / model_type
    tiny_model(model_type, seed=2).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    cfg = QuantizeConfig(method="gptq", bpw=3.5, measurement=str(tmp_path / "m.json"))
    m = qforge.load(str(src), cfg)
    m.quantize(samples())
    alloc = m.result.allocation
    spec = arch_spec(m.model)
    blocks = get_blocks(m.model, spec)
    want = {f"{spec.blocks}.{i}.{r.name}" for i, b in enumerate(blocks) for g in block_linears(b, spec) for r in g}
    assert set(alloc.grids) == set(m.result.layers) == want
    assert any(".experts." in n for n in want) and any(n.startswith(f"{spec.blocks}.0.mlp.gate_proj") for n in want)
    assert alloc.bpw <= 3.5 and len(set(alloc.grids.values())) > 1
    sizes = m.export(tmp_path / "x", "gptq")
    assert sizes["bits_per_weight"] == pytest.approx(alloc.bpw, rel=1e-12)
    back = qforge.load(tmp_path / "x")
    assert {n: q.grid for n, q in back.result.layers.items() if ".experts." not in n} == \
        {n: g for n, g in alloc.grids.items() if ".experts." not in n}
    # a fused expert's gate/up is stored as two modules (two g_idx): the measurement costs it so, in either format
    meas = load_measurement(tmp_path / "m.json")
    name = next(n for n in meas["layers"] if n.endswith(".experts.gate_up_proj.0"))
    d = meas["layers"][name]
    rows = (d["shape"][0] // 2,) * 2
    assert d["stored_rows"] == list(rows)
    for fmt, m_ in (("gptq", meas), ("compressed-tensors", restate_costs(meas, "compressed-tensors"))):
        for o in m_["layers"][name]["options"]:
            grid = Grid(o["bits"], o["group_size"], o["sym"])
            assert o["stored_bits"] == 2 * scheme_bits((rows[0], d["shape"][1]), grid, fmt) > \
                scheme_bits(tuple(d["shape"]), grid, fmt)


def test_a_measurement_serves_another_format_with_that_formats_costs(tiny_llama_dir, tmp_path):
    meas = tmp_path / "m.json"
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, measurement=str(meas)))   # gptq costs
    m.quantize(samples())
    measured = load_measurement(meas)
    ct = restate_costs(measured, "compressed-tensors")
    assert ct["format"] == "compressed-tensors" and measured["format"] == "gptq"
    for name, d in measured["layers"].items():
        pairs = list(zip(d["options"], ct["layers"][name]["options"]))
        assert len(pairs) == len(d["options"]) and all(o["err"] == c["err"] for o, c in pairs)
        assert all(c["stored_bits"] < o["stored_bits"] for o, c in pairs)     # no g_idx in compressed-tensors
    back = restate_costs(ct, "gptq")
    assert back["layers"] == measured["layers"]                               # recounted, not remembered
    opt = {"group_size": 64, "sym": True, "err": 0.1, "stored_bits": 1}          # widths gptq cannot store
    five = {"format": None, "layers": {"a": {"shape": [64, 128], "options": [{**opt, "bits": 5}, {**opt, "bits": 4}]},
                                       "b": {"shape": [64, 128], "options": [{**opt, "bits": 6}]}}}
    with pytest.raises(QForgeError, match="b: none of its measured widths"):
        restate_costs(five, "gptq")
    del five["layers"]["b"]
    assert [o["bits"] for o in restate_costs(five, "gptq")["layers"]["a"]["options"]] == [4]
    other = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, measurement=str(meas),
                                                       bpw_format="compressed-tensors"))
    other.quantize(samples())
    alloc = other.result.allocation
    assert alloc.format == "compressed-tensors" and alloc.bpw <= 3.5
    assert alloc.total_err <= m.result.allocation.total_err     # every scheme is cheaper: gptq's choice still fits
    sizes = other.export(tmp_path / "x", "compressed-tensors")
    assert sizes["bits_per_weight"] == pytest.approx(alloc.bpw, rel=1e-12)


def test_more_bits_give_lower_measured_error_and_output_error(tiny_llama_dir, tmp_path, caplog):
    meas = tmp_path / "m.json"
    errs = []
    with caplog.at_level(logging.WARNING, logger="qforge.api"):
        for bpw in (3.0, 5.0):                 # the second run reuses the first one's measurement
            m = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=bpw, measurement=str(meas)))
            m.quantize(samples())
            errs.append(m.result.allocation.total_err)
    assert "other GPTQ settings" not in caplog.text
    assert errs[0] > errs[1]
    assert plan(load_measurement(meas), 5.0).layers == m.result.allocation.layers      # deterministic
    with caplog.at_level(logging.WARNING, logger="qforge.api"):   # reused for another solver: said, not silent
        other = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=5.0, measurement=str(meas),
                                                           scale_search=False))
        other.quantize(samples())
    assert "other GPTQ settings (scale_search differ)" in caplog.text


def test_a_measurement_without_a_path_leaves_no_temporary_files(tiny_llama_dir, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))      # where mkdtemp / TemporaryDirectory write
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=4.0))
    m.quantize(samples())
    assert m.result.allocation.bpw <= 4.0
    assert list(scratch.iterdir()) == []


def _option(bits, group, err, numel=64 * 64):
    cost = numel * bits + (64 * 16 if group == -1 else 64 * (64 // group) * 16)     # codes + fp16 scales
    return {"bits": bits, "group_size": group, "sym": True, "stored_bits": cost, "err": err}


def test_low_per_channel_schemes_are_taken_only_when_the_budget_needs_them(caplog):
    # 2b per channel is the cheapest and, per its measured error, the best buy: plan() avoids it while the
    # target can be met without it, and allows it (with a warning) when it cannot
    options = [_option(2, -1, 0.10), _option(2, 32, 0.09), _option(3, -1, 0.02), _option(3, 32, 0.015)]
    meas = {"format": "compressed-tensors", "layers": {f"l{i}": {"shape": [64, 64], "options": options}
                                                       for i in range(4)}}
    widths = lambda a: sorted((d["bits"], d["group_size"]) for d in a.layers.values())      # noqa: E731
    assert (2, -1) in widths(plan(meas, 2.6, pc_min_bits=0))
    a = plan(meas, 2.6)
    assert (2, -1) not in widths(a) and a.bpw <= 2.6
    with caplog.at_level(logging.WARNING, logger="qforge.mixed.plan"):
        b = plan(meas, 2.3)                     # 2b g32 costs 2.5 bpw: only 2b per channel fits
    assert (2, -1) in widths(b) and b.bpw <= 2.3 and "needs per-channel schemes below 3 bits" in caplog.text


def test_bad_mixed_settings_are_refused():
    with pytest.raises(QForgeError, match="needs method gptq"):
        QuantizeConfig(method="rtn", bpw=3.0)
    with pytest.raises(QForgeError, match="from 2.0 to 8.0"):
        QuantizeConfig(method="gptq", bpw=1.5)


def test_cli_measure_then_quantize_to_a_budget(tiny_llama_dir, tmp_path, capsys, wiki_excerpt):
    common = ["--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "64"]
    assert cli(["-q", "measure", str(tiny_llama_dir), "--out", str(tmp_path / "m.json"), "--candidate-bits", "2,3,4,8",
                *common]) == 0
    assert "summed KL, nats/token" in capsys.readouterr().out
    assert cli(["-q", "measure", str(tiny_llama_dir), "--out", str(tmp_path / "m16.json"), "--compute-dtype",
                "bfloat16", *common]) == 2                                     # refused, not silently ignored
    assert "runs in float32" in capsys.readouterr().err and not (tmp_path / "m16.json").exists()
    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bpw", "3.0", "--measurement",
                str(tmp_path / "m.json"), "--out", str(tmp_path / "q"), "--format", "gptq", *common]) == 0
    out = capsys.readouterr().out
    assert "mixed precision" in out and "model.layers.1.mlp.down_proj" in out
    alloc = json.loads((tmp_path / "q" / "allocation.json").read_text())
    rec = json.loads((tmp_path / "q-gptq" / "qforge_export.json").read_text())
    assert rec["bits_per_weight"] == pytest.approx(alloc["bpw"], rel=1e-12) and alloc["bpw"] <= 3.0
    # the saved allocation is a stage the CLI reuses: same schemes, same codes, no measurement
    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--allocation", str(tmp_path / "q" /
                "allocation.json"), "--out", str(tmp_path / "q2"), "--format", "gptq", *common]) == 0
    assert json.loads((tmp_path / "q2" / "allocation.json").read_text())["layers"] == alloc["layers"]
    first, again = (qforge.load(tmp_path / d).result.layers for d in ("q-gptq", "q2-gptq"))
    assert all(torch.equal(first[n].codes, again[n].codes) and first[n].grid == again[n].grid for n in first)
    assert not (tmp_path / "q2.measurement.json").exists()
    # the export carries the allocation too: from memory, from the saved output, and as --packed-only's one output
    assert json.loads((tmp_path / "q-gptq" / "allocation.json").read_text())["layers"] == alloc["layers"]
    assert qforge.load(tmp_path / "q").result.allocation.layers == alloc["layers"]
    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--allocation", str(tmp_path / "q" /
                "allocation.json"), "--out", str(tmp_path / "p"), "--format", "gptq", "--packed-only", *common]) == 0
    assert json.loads((tmp_path / "p" / "allocation.json").read_text())["layers"] == alloc["layers"]


def test_a_bad_or_foreign_allocation_is_refused(tiny_llama_dir, tmp_path, capsys):
    from qforge.mixed import Allocation

    bad = tmp_path / "bad.json"
    bad.write_text('{"target_bpw": 3, "layers": {"model.layers.0.mlp.up_proj": {"bits": 1, "group_size": 64, '
                   '"sym": true, "stored_bits": 10, "numel": 10}}}')
    with pytest.raises(QForgeError, match="not a qforge allocation: no valid scheme for model.layers.0.mlp.up_proj"):
        Allocation.load(bad)
    bad.write_text('{"target_bpw": 3, "layers": ')
    with pytest.raises(QForgeError, match="not a qforge allocation"):
        Allocation.load(bad)
    foreign = Allocation(3.0, "gptq", {"model.layers.7.mlp.up_proj": {"bits": 3, "group_size": 64, "sym": True,
                                                                      "stored_bits": 10, "numel": 10}})
    with pytest.raises(QForgeError, match="names 1 layer.s. this model does not have"):
        qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq")).quantize(samples(), allocation=foreign)
    with pytest.raises(QForgeError, match="needs method gptq"):
        qforge.load(tiny_llama_dir, QuantizeConfig(method="rtn")).quantize(samples(), allocation=foreign)
    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bpw", "3", "--allocation", str(bad),
                "--out", str(tmp_path / "q")]) != 0
    assert "give it or --bpw, not both" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_candidate_bits_limit_the_allocation_and_what_a_new_measurement_measures(tiny_llama_dir, tmp_path):
    meas = tmp_path / "m48.json"
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=5.0, bpw_bits=(4, 8), measurement=str(meas)))
    m.quantize(samples())
    assert {q.grid.bits for q in m.result.layers.values()} == {4, 8} and m.result.allocation.bpw <= 5.0
    measured = load_measurement(meas)
    assert measured["bits"] == [4, 8]
    assert {o["bits"] for d in measured["layers"].values() for o in d["options"]} == {4, 8}
    full = tmp_path / "full.json"                       # a measurement of every width, reused: cut to the allowed ones
    qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, measurement=str(full))).quantize(samples())
    four = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=5.5, bpw_bits=(4,), measurement=str(full)))
    four.quantize(samples())                            # (64-wide tiny linears: 4 bits per channel cost 4.8 bpw)
    assert {q.grid.bits for q in four.result.layers.values()} == {4} and four.result.allocation.bpw <= 5.5
    three = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, bpw_bits=(3,), measurement=str(meas)))
    with pytest.raises(QForgeError, match="measured at 4, 8 bits, none of the allowed 3"):
        three.quantize(samples())
    with pytest.raises(QForgeError, match="bpw_bits must be bit widths from 2 to 8"):
        QuantizeConfig(method="gptq", bpw=3.0, bpw_bits=(9,))
    from qforge.cli.main import build_parser

    assert build_parser().parse_args(["quantize", "m", "--out", "o", "--candidate-bits", "4,8"]).candidate_bits == (4, 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "--out", "o", "--candidate-bits", "four"])
