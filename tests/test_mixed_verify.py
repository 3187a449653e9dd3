"""Mixed precision's allocation check (mixed/verify.py): each block quantized alone at its allocated schemes,
its KL per validation sequence, and the repair of blocks that cost more than the whole allocation predicts."""
from __future__ import annotations

import pytest
import torch

import qforge
from qforge.capture.blocks import make_batches
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.eval.compare import kl_divergence
from qforge.mixed import measure_model, plan
from qforge.mixed.probe import TailProbe
from qforge.mixed.verify import check_blocks, verified_plan, without_widths
from qforge.models.arch import arch_spec, block_linears, get_blocks
from qforge.pipeline import GPTQSolver, gptq_options, one_pass_stats
from qforge.capture import capture_block_inputs, run_block
from qforge.solvers import gptq
from tiny_models import VOCAB, tiny_model

CFG = QuantizeConfig(method="gptq", bpw=3.0, compute_dtype="float32")


def samples(n=6, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (T,), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model = tiny_model("llama")
    m = measure_model(model, samples(), tmp_path_factory.mktemp("m") / "m.json", CFG, "compressed-tensors",
                      (2, 3, 4), show_progress=False, probe_samples=2)
    return model, m


def test_probe_references_hold_no_autograd_graph(tiny_llama):
    """A reference kept with its graph holds every activation of the forward (23 GB on SmolLM2 at 40 x 512)."""
    probe = TailProbe(tiny_llama, arch_spec(tiny_llama), make_batches(samples(4), 2))
    assert all(r.grad_fn is None and not r.requires_grad for r in probe.ref)


def test_a_block_check_is_that_block_quantized_alone_in_a_full_forward(measured):
    model, m = measured
    a = plan(m, 3.0)
    calib, valid = samples(), samples(3, T=40, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    checks = check_blocks(model, a, calib, valid, CFG)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())        # left as it was
    spec = arch_spec(model)
    blocks = get_blocks(model, spec)
    assert sorted(checks) == list(range(len(blocks)))
    i = 1                                                  # by hand: block 1's linears GPTQ'd on its fp inputs
    inputs = capture_block_inputs(model, spec, make_batches(calib, 8))
    hidden = run_block(blocks[0], inputs.hidden, inputs.for_block(0))
    groups = block_linears(blocks[i], spec)
    stats = one_pass_stats(GPTQSolver(), blocks[i], groups, hidden, inputs.for_block(i), "cpu")
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=v.view(1, -1)).logits[0], -1) for v in valid]
        for g in groups:
            for r in g:
                grid = a.grids[f"model.layers.{i}.{r.name}"]
                r.set_weight(gptq(r.weight.detach().float(), stats[r.name].H, grid, **gptq_options(CFG)).dequantize())
        keep = torch.arange(3, 40, 4)
        want = [float(kl_divergence(rp[keep], torch.log_softmax(model(input_ids=v.view(1, -1)).logits[0], -1)[keep])
                      .mean()) for rp, v in zip(ref, valid)]
        for n, p in model.named_parameters():
            p.copy_(before[n])
    c = checks[i]
    assert len(c.kl) == 3 and min(c.kl) > 0
    assert c.kl == pytest.approx(want, rel=1e-3)
    assert c.predicted == pytest.approx(sum(d["err"] for n, d in a.layers.items() if n.startswith(f"model.layers.{i}.")))
    assert checks[0].schemes != () and all(n.startswith("model.layers.0.") for n, _ in checks[0].schemes)


def test_a_block_above_the_limit_is_raised_and_the_budget_replanned(measured):
    model, m = measured
    target = 3.0
    a = plan(m, target)
    calib = samples()
    checks = check_blocks(model, a, calib, calib, CFG)
    ranked = sorted(checks.values(), key=lambda c: c.worst, reverse=True)
    worst = ranked[0]
    # a limit between the worst block and the next one: exactly that block is flagged
    tolerance = (worst.worst + ranked[1].worst) / 2 / a.total_err
    assert worst.worst > ranked[1].worst
    v = verified_plan(model, m, target, calib, calib, CFG, tolerance=tolerance, rounds=1)
    low = min(s[0] for _, s in worst.schemes)
    lows = [n for n, s in worst.schemes if s[0] == low]
    assert v.bpw <= target and v.verification["raised"]
    assert set(v.verification["raised"]) <= set(lows) and v.verification["raised"]
    for n in v.verification["raised"]:
        assert v.layers[n]["bits"] > low, n                               # no option at the failing width left
    assert set(v.verification["blocks"]) == {str(i) for i in checks}
    assert v.verification["limit"] == pytest.approx(tolerance * v.total_err)
    # only checking (no repair rounds): the same allocation as plan(), with what was found recorded
    only = verified_plan(model, m, target, calib, calib, CFG, tolerance=tolerance, rounds=0)
    assert only.layers == a.layers and only.verification["raised"] == {}
    assert only.verification["blocks"][str(worst.block)]["worst_kl"] == pytest.approx(worst.worst, rel=1e-6)
    # a generous limit: nothing to repair, plan()'s allocation
    assert verified_plan(model, m, target, calib, calib, CFG, tolerance=1e6).layers == a.layers


def test_a_repair_over_fused_sets_raises_whole_sets_and_keeps_them_on_one_scheme(measured):
    from qforge.models.fused import fused_sets

    model, m = measured
    units = fused_sets(arch_spec(model), m["layers"])
    calib = samples()
    a = plan(m, 3.0, units=units)
    worst = max(c.worst for c in check_blocks(model, a, calib, calib, CFG).values())
    v = verified_plan(model, m, 3.0, calib, calib, CFG, tolerance=0.999 * worst / a.total_err, rounds=1, units=units)
    raised = v.verification["raised"]
    assert raised and v.bpw <= 3.0
    for members in units.values():
        assert len({(v.layers[n]["bits"], v.layers[n]["group_size"], v.layers[n]["sym"]) for n in members}) == 1
        assert all(n in raised for n in members) or not any(n in raised for n in members)   # a set is raised whole
    assert any(len(members) > 1 and members[0] in raised for members in units.values())


def test_a_repair_that_does_not_fit_the_budget_keeps_the_allocation(measured, caplog):
    model, m = measured
    layers = m["layers"].values()
    cheapest = sum(min(o["stored_bits"] for o in d["options"]) for d in layers) / sum(
        d["shape"][0] * d["shape"][1] for d in layers)
    target = cheapest * 1.002                    # the lowest widths everywhere, no room to raise one linear
    a = plan(m, target)
    calib = samples()
    v = verified_plan(model, m, target, calib, calib, CFG, tolerance=1e-9, rounds=2)   # every block flagged
    assert v.layers == a.layers and v.verification["raised"] == {} and v.bpw <= target
    assert "does not fit" in caplog.text


def test_without_widths_removes_only_the_named_layers_options(measured):
    _, m = measured
    name = next(iter(m["layers"]))
    cut = without_widths(m, {name: 2})
    assert all(o["bits"] > 2 for o in cut["layers"][name]["options"])
    assert all(cut["layers"][n] == d for n, d in m["layers"].items() if n != name)
    assert any(o["bits"] == 2 for o in m["layers"][name]["options"])     # the measurement itself is untouched


def test_quantize_to_a_budget_checks_its_allocation_when_asked(tiny_llama_dir, tmp_path):
    meas = str(tmp_path / "m.json")
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, measurement=meas, verify_samples=3))
    m.quantize(samples())
    v = m.result.allocation.verification
    assert v["sequences"] == 3 and len(v["blocks"]) == 2 and m.result.allocation.bpw <= 3.5
    m.save(tmp_path / "out")
    assert qforge.mixed.Allocation.load(tmp_path / "out" / "allocation.json").verification == v
    off = qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", bpw=3.5, measurement=meas))   # off by default
    off.quantize(samples())
    assert off.result.allocation.verification is None
    with pytest.raises(QForgeError, match="verify_samples"):
        QuantizeConfig(method="gptq", bpw=3.0, verify_samples=-1)


def test_cli_says_what_the_check_found(tiny_llama_dir, tmp_path, capsys, wiki_excerpt):
    from qforge.cli.main import main as cli

    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bpw", "3.5", "--verify-samples", "2",
                "--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "64", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "checked 2 blocks alone on 2 calibration sequences: worst block" in out
