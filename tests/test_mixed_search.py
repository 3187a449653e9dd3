"""Mixed precision's evolutionary search (mixed/search.py): level switches that keep the budget, an elitist loop
that only ever lowers the judged KL, and a model-backed judge whose cached prefix gives a full forward's KL."""
from __future__ import annotations

import random

import pytest
import torch

from qforge.capture.blocks import make_batches
from qforge.config import QuantizeConfig
from qforge.eval.compare import kl_divergence
from qforge.mixed import measure_model, plan
from qforge.mixed.plan import Allocation
from qforge.mixed.search import ModelJudge, evolve, mutate, pareto_levels, searched_allocation
from qforge.models.arch import arch_spec, block_linears, get_blocks
from tiny_models import VOCAB, tiny_model

CFG = QuantizeConfig(method="gptq", bpw=3.0, compute_dtype="float32")


def samples(n=6, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (T,), generator=g) for _ in range(n)]


def test_pareto_levels_drop_options_a_cheaper_one_beats():
    opts = [{"stored_bits": b, "err": e} for b, e in [(30, 0.5), (20, 1.0), (25, 1.2), (40, 0.1), (40, 0.4), (35, 0.5)]]
    assert pareto_levels(opts) == [1, 0, 3]          # 25 bits is worse than 20; 35 no better than 30; 40/0.4 loses


def _costs(seed, n=12, levels=4):
    rng = random.Random(seed)
    return {f"l{i}": sorted(rng.sample(range(10, 60), levels)) for i in range(n)}


@pytest.mark.parametrize("seed", range(5))
def test_a_level_switch_moves_levels_by_one_and_keeps_the_budget(seed):
    costs = _costs(seed)
    assign = {n: 1 for n in costs}
    budget = sum(c[1] for c in costs.values()) + 3
    rng = random.Random(seed)
    found = [ch for ch in (mutate(costs, assign, budget, rng) for _ in range(50)) if ch]
    assert len(found) > 25                 # None only when the raised linears outweigh every possible lowering
    for ch in found:
        assert all(abs(v - assign[n]) == 1 for n, v in ch.items())
        assert any(v > assign[n] for n, v in ch.items())
        assert sum(costs[n][ch.get(n, assign[n])] for n in costs) <= budget
    top = {n: len(c) - 1 for n, c in costs.items()}
    assert mutate(costs, top, float("inf"), rng) is None                   # nothing left to raise
    low = {n: 0 for n in costs}
    assert mutate(costs, low, sum(c[0] for c in costs.values()), rng) is None   # raising needs a lowering


class PairJudge:
    """An objective an additive optimiser misjudges: each linear's error, plus a penalty for neighbours that
    are both at level 0 (errors that compound)."""

    def __init__(self, errs, assign):
        self.errs, self.assign, self.calls = errs, dict(assign), 0

    def _f(self, a):
        names = sorted(a)
        pairs = sum(a[x] == 0 and a[y] == 0 for x, y in zip(names, names[1:]))
        return sum(self.errs[n][a[n]] for n in names) + 0.5 * pairs

    def score(self, changes, full):
        self.calls += 1
        return self._f({**self.assign, **changes})

    def accept(self, changes):
        self.assign.update(changes)


def test_evolution_lowers_the_judged_error_within_budget_and_repeats_itself():
    costs = {f"l{i}": [10, 20, 30] for i in range(10)}
    errs = {n: [1.0, 0.3, 0.0] for n in costs}
    # the additive optimum at 200 bits (=level 1 everywhere) is also this one's; start from a bad split instead
    start = {n: (0 if i % 2 else 2) for i, n in enumerate(sorted(costs))}
    budget = 200
    runs = []
    for _ in range(2):
        judge = PairJudge(errs, start)
        best, hist = evolve(costs, start, budget, judge, generations=60, offspring=6, survivors=2, seed=3)
        runs.append((best, hist))
        assert all(b <= a for a, b in zip(hist, hist[1:])) and hist[-1] < hist[0]
        assert hist[-1] == pytest.approx(judge._f(best)) and judge.assign == best
        assert sum(costs[n][best[n]] for n in costs) <= budget
    assert runs[0] == runs[1]                                              # deterministic for a seed


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_judge_scores_a_change_as_a_full_forward_of_the_changed_model():
    model = tiny_model("llama")
    spec = arch_spec(model)
    names = {f"{spec.blocks}.{i}.{r.name}": r for i, b in enumerate(get_blocks(model, spec))
             for g in block_linears(b, spec) for r in g}
    g = torch.Generator().manual_seed(0)
    db = {n: [r.weight.detach() + s * r.weight.abs().mean() * torch.randn(r.shape, generator=g)
              for s in (0.4, 0.2, 0.1)] for n, r in names.items()}
    assign = {n: 1 for n in names}
    batches = make_batches(samples(4), 2)
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=b).logits.float(), -1) for b in batches]
    before = _weights(model)
    judge = ModelJudge(model, spec, db, assign, batches, torch.float32)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())     # works on a copy

    def by_hand(a):
        m = tiny_model("llama")
        m.load_state_dict(model.state_dict())
        refs = {f"{spec.blocks}.{i}.{r.name}": r for i, b in enumerate(get_blocks(m, spec))
                for gr in block_linears(b, spec) for r in gr}
        for n, lv in a.items():
            refs[n].set_weight(db[n][lv])
        keep = judge.probe.keep                        # the positions the probe's head sees
        return float(torch.cat([kl_divergence(r[:, keep], torch.log_softmax(m(input_ids=b).logits.float()[:, keep], -1))
                                .mean(-1) for b, r in zip(batches, ref)]).mean())

    with torch.no_grad():
        assert judge.score({}, True) == pytest.approx(by_hand(assign), rel=1e-4)
        last = sorted(names)[-1]
        change = {n: 0 for n in sorted(names) if ".1." in n} | {last: 2}      # changes in block 1 only
        s = judge.score(change, True)
        assert s == pytest.approx(by_hand({**assign, **change}), rel=1e-4)
        assert judge.score({}, True) == pytest.approx(by_hand(assign), rel=1e-4)   # put back after scoring
        judge.accept(change)
        assert judge.score({}, True) == pytest.approx(s, rel=1e-5)                # the cached prefix follows
        first = sorted(n for n in names if ".0." in n)[0]
        assert judge.score({first: 2}, True) == pytest.approx(by_hand({**assign, **change, first: 2}), rel=1e-4)
        screen = judge.score({first: 2}, False)                                    # the first batch only
        assert screen != pytest.approx(judge.score({first: 2}, True), rel=1e-6)


def test_searched_allocation_keeps_the_budget_and_lowers_the_fitness_kl(tmp_path):
    model = tiny_model("llama")
    m = measure_model(model, samples(), tmp_path / "m.json", CFG, "compressed-tensors", (2, 3, 4),
                      show_progress=False, probe_samples=2)
    start = plan(m, 3.0)
    a = searched_allocation(model, m, start, samples(), samples(4, seed=1), CFG, generations=8, offspring=4)
    assert a.bpw <= 3.0 and set(a.layers) == set(start.layers)
    s = a.search
    (r,) = s["runs"]
    assert r["kl_end"] <= r["kl_start"] and len(r["history"]) == 9 and r["sequences"] == 4 and s["generations"] == 8
    for n, d in a.layers.items():               # every pick is a measured option with its measured cost and error
        o = next(o for o in m["layers"][n]["options"]
                 if (o["bits"], o["group_size"], o["sym"]) == (d["bits"], d["group_size"], d["sym"]))
        assert (o["stored_bits"], o["err"]) == (d["stored_bits"], d["err"])
    a.save(tmp_path / "a.json")
    assert Allocation.load(tmp_path / "a.json").search == s
    more = searched_allocation(model, m, Allocation.load(tmp_path / "a.json"), samples(), samples(4, seed=1), CFG,
                               generations=3, offspring=4, seed=1)
    t = more.search                                      # a searched start: the record goes on from it
    assert t["generations"] == 11 and t["runs"][0] == r and [u["seed"] for u in t["runs"]] == [0, 1]
    assert t["runs"][1]["kl_start"] == pytest.approx(r["kl_end"], rel=1e-6)     # same fitness: it goes on from there
    assert t["runs"][1]["kl_end"] <= r["kl_end"] * (1 + 1e-6) and more.bpw <= 3.0
    # other fitness sequences and a wider span: a new run whose KLs are on its own sequences
    wide = searched_allocation(model, m, more, samples(), samples(6, seed=2), CFG, generations=2, offspring=4, span=3)
    u = wide.search["runs"][-1]                          # the seed defaults to the run's index: new mutations
    assert len(wide.search["runs"]) == 3 and (u["sequences"], u["span"], u["seed"]) == (6, 3, 2) and wide.bpw <= 3.0
    assert u["kl_start"] != pytest.approx(t["runs"][1]["kl_end"], rel=1e-3)


def test_cli_quantize_searches_when_asked_and_saves_what_it_found(tiny_llama_dir, tmp_path, capsys, wiki_excerpt):
    import json

    from qforge.cli.main import main as cli

    common = ["--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "64", "--compute-dtype", "float32"]
    assert cli(["-q", "measure", str(tiny_llama_dir), "--out", str(tmp_path / "m.json"), "--candidate-bits", "2,3,4",
                *common]) == 0
    assert cli(["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bpw", "3.0", "--measurement",
                str(tmp_path / "m.json"), "--search-generations", "3", "--search-samples", "2",
                "--search-offspring", "3", "--out", str(tmp_path / "q"), *common]) == 0
    alloc = json.loads((tmp_path / "q" / "allocation.json").read_text())
    (run,) = alloc["search"]["runs"]
    assert alloc["bpw"] <= 3.0 and alloc["search"]["generations"] == 3 and run["sequences"] == 2
    assert run["kl_end"] <= run["kl_start"] and run["span"] == 2
    assert json.loads((tmp_path / "q" / "qforge_config.json").read_text())["search_generations"] == 3
    # a saved searched allocation is a stage: the next run continues its search
    again = ["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--allocation", str(tmp_path / "q" /
             "allocation.json"), "--search-generations", "2", "--search-samples", "2", "--search-offspring", "3",
             "--out", str(tmp_path / "q2"), *common]
    capsys.readouterr()
    assert cli(again) == 2 and "needs the measurement it was planned from" in capsys.readouterr().err
    assert cli([*again, "--measurement", str(tmp_path / "m.json"), "--search-span", "1"]) == 0
    more = json.loads((tmp_path / "q2" / "allocation.json").read_text())
    first, then = more["search"]["runs"]
    assert more["search"]["generations"] == 5 and first == run and then["span"] == 1
    assert then["kl_end"] <= run["kl_end"] * (1 + 1e-6) and more["bpw"] <= 3.0
    # the API continues a given allocation's search too, with no --bpw in the config
    import qforge

    cfg = QuantizeConfig(method="gptq", compute_dtype="float32", measurement=str(tmp_path / "m.json"),
                         search_generations=1, search_samples=2, search_offspring=2)
    m = qforge.load(tiny_llama_dir, cfg)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=64, allocation=Allocation.load(tmp_path / "q2" / "allocation.json"))
    assert m.result.allocation.search["generations"] == 6 and m.result.allocation.bpw <= 3.0


def test_bad_search_settings_are_refused(tiny_llama_dir):
    from qforge.errors import QForgeError

    with pytest.raises(QForgeError, match="search_offspring must be a whole number >= 1"):
        QuantizeConfig(method="gptq", bpw=3.0, search_offspring=0)
    with pytest.raises(QForgeError, match="search_generations must be a whole number >= 0"):
        QuantizeConfig(method="gptq", bpw=3.0, search_generations=-1)
    with pytest.raises(QForgeError, match="search_span must be a whole number >= 1"):
        QuantizeConfig(method="gptq", bpw=3.0, search_span=0)
    import qforge

    with pytest.raises(QForgeError, match="give bpw or an allocation"):
        qforge.load(tiny_llama_dir, QuantizeConfig(method="gptq", search_generations=2)).quantize(samples())
