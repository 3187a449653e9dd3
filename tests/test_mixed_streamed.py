"""Mixed precision of a model larger than RAM: the streamed measurement gives the in-memory one's numbers, one
block in memory at a time, and either resumes the other's file."""
import json

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.mixed import measure_model
from qforge.mixed.streamed import span_end
from qforge.models.arch import arch_spec, get_blocks
from qforge.models.streaming import BlockLoader
from tiny_models import tiny_model

CFG = QuantizeConfig(method="gptq")


def _saved_dir(tmp_path, tokenizer, model_type):
    d = tmp_path / model_type
    tiny_model(model_type, seed=3).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _samples(vocab, n=4, length=40):
    return [torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _streamed(src, monkeypatch, cfg=None):
    """A skeleton of `src`, and the list of block indices its loader reads (one block in memory at a time)."""
    m = qforge.load(str(src), cfg, stream=True)
    blocks = get_blocks(m.model, arch_spec(m.model))
    loads, load = [], BlockLoader.load

    def one_at_a_time(self, i, block):
        assert not any(BlockLoader.materialized(b) for b in blocks), "a block was still in memory"
        loads.append(i)
        load(self, i, block)

    monkeypatch.setattr(BlockLoader, "load", one_at_a_time)
    return m, loads


def _assert_same(got, want):
    assert set(got["layers"]) == set(want["layers"]) and got["blocks_done"] == want["blocks_done"]
    for name, d in want["layers"].items():
        for o, w in zip(got["layers"][name]["options"], d["options"], strict=True):
            assert {k: o[k] for k in ("bits", "group_size", "sym", "stored_bits", "probed")} == \
                   {k: w[k] for k in ("bits", "group_size", "sym", "stored_bits", "probed")}
            assert o["rel_err"] == pytest.approx(w["rel_err"], rel=1e-4), name
            assert o["err"] == pytest.approx(w["err"], rel=1e-4, abs=1e-12), (name, o, w)


# gemma4_text: blocks 2 and 3 read the keys and values blocks 0 and 1 leave, so every probe variant keeps its own
@pytest.mark.parametrize("model_type", ["llama", "gemma", "mixtral", "gemma4_text"])
def test_a_streamed_measurement_gives_the_in_memory_numbers(tmp_path, tiny_tokenizer, monkeypatch, model_type):
    src = _saved_dir(tmp_path, tiny_tokenizer, model_type)
    samples = _samples(len(tiny_tokenizer))
    want = measure_model(qforge.load(str(src)).model, samples, tmp_path / "mem.json", CFG, "gptq", (2, 4),
                         show_progress=False, probe_samples=2)
    assert any(o["err"] > 0 for d in want["layers"].values() for o in d["options"])
    m, loads = _streamed(src, monkeypatch)
    n = len(get_blocks(m.model, arch_spec(m.model)))
    got = measure_model(m.model, samples, tmp_path / "one.json", CFG, "gptq", (2, 4), show_progress=False,
                        probe_samples=2, weights=m.blocks, probe_memory=1)      # one block per span: n sweeps
    _assert_same(got, want)
    assert loads == [j for start in range(n) for j in range(start, n)]
    assert json.loads((tmp_path / "one.json").read_text()) == got
    loads.clear()
    got = measure_model(m.model, samples, tmp_path / "all.json", CFG, "gptq", (2, 4), show_progress=False,
                        probe_samples=2, weights=m.blocks)                      # every block in one sweep
    _assert_same(got, want)
    assert loads == list(range(n))


def test_a_streamed_measurement_resumes_either_passes_file(tmp_path, tiny_tokenizer, monkeypatch):
    src = _saved_dir(tmp_path, tiny_tokenizer, "llama")
    samples = _samples(len(tiny_tokenizer))
    full = measure_model(qforge.load(str(src)).model, samples, tmp_path / "m.json", CFG, "gptq", (2, 4),
                         show_progress=False, probe_samples=2)
    part = dict(full, blocks_done=1, layers={n: d for n, d in full["layers"].items() if ".0." in n})
    marker = next(iter(part["layers"].values()))["options"][0]
    marker["err"] = 123.0                                   # block 0 is not measured again
    (tmp_path / "p.json").write_text(json.dumps(part))
    m, loads = _streamed(src, monkeypatch)
    resumed = measure_model(m.model, samples, tmp_path / "p.json", CFG, "gptq", (2, 4), show_progress=False,
                            probe_samples=2, weights=m.blocks)
    assert loads == [0, 1]                                  # block 0 only to walk the fp model to block 1
    assert next(iter(resumed["layers"].values()))["options"][0]["err"] == 123.0
    marker["err"] = full["layers"][next(iter(part["layers"]))]["options"][0]["err"]
    _assert_same(resumed, full)


def test_spans_hold_as_many_blocks_as_the_probe_memory_takes():
    assert span_end([3, 3, 3, 3], 0, 10, 60) == 2
    assert span_end([3, 3, 3, 3], 2, 10, 60) == 4
    assert span_end([3, 3, 3, 3], 1, 10, 1) == 2          # one block at least, whatever the budget
    assert span_end([3, 3, 3, 3], 0, 10, 10 ** 9) == 4


def test_mixed_precision_streams_end_to_end(tmp_path, tiny_tokenizer, monkeypatch, wiki_excerpt):
    """--bpw with --stream: measured, planned and quantized one block at a time, to the in-memory run's codes."""
    src = _saved_dir(tmp_path, tiny_tokenizer, "llama")
    cfg = QuantizeConfig(method="gptq", bpw=3.0, bpw_format="gptq", measurement=str(tmp_path / "m.json"))
    ref = qforge.load(str(src), cfg)
    ref.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    m, loads = _streamed(src, monkeypatch, QuantizeConfig(**{**cfg.to_dict(), "measurement": str(tmp_path / "s.json")}))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "out.partial", probe_memory=1)
    n = len(get_blocks(m.model, arch_spec(m.model)))
    assert loads == [j for s in range(n) for j in range(s, n)] + list(range(n))   # a sweep per block, then quantized
    assert m.result.allocation.grids == ref.result.allocation.grids
    out = m.save(tmp_path / "q")
    from qforge.checkpoint import read_layers
    got, want = read_layers(out), ref.result.layers
    assert set(got) == set(want)
    for name, q in want.items():
        assert torch.equal(got[name].codes, q.codes), name
    verified = QuantizeConfig(**{**cfg.to_dict(), "verify_samples": 2})
    ref = qforge.load(str(src), verified)
    ref.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    m = qforge.load(str(src), verified, stream=True)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "v.partial")
    assert m.result.allocation.grids == ref.result.allocation.grids
    got, want = m.result.allocation.verification["blocks"], ref.result.allocation.verification["blocks"]
    assert got.keys() == want.keys() and len(want) == n
    assert [c["worst_kl"] for c in got.values()] == pytest.approx([c["worst_kl"] for c in want.values()], rel=1e-4)
    with pytest.raises(QForgeError, match="search runs the whole model"):
        qforge.load(str(src), QuantizeConfig(method="gptq", bpw=3.0, search_generations=2), stream=True).quantize(
            wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "s.partial")


def test_streamed_mixed_precision_from_the_command_line(tmp_path, tiny_tokenizer, capsys, wiki_excerpt):
    from qforge.cli.main import main

    src = _saved_dir(tmp_path, tiny_tokenizer, "llama")
    calib = ["--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "32", "--candidate-bits", "2,4"]
    assert main(["-q", "measure", str(src), "--out", str(tmp_path / "mem.json"), *calib]) == 0
    assert main(["-q", "measure", str(src), "--stream", "--probe-memory", "1KB", "--out", str(tmp_path / "s.json"),
                 *calib]) == 0
    _assert_same(json.loads((tmp_path / "s.json").read_text()), json.loads((tmp_path / "mem.json").read_text()))
    assert "summed KL" in capsys.readouterr().out
    assert main(["-q", "quantize", str(src), "--stream", "--method", "gptq", "--bpw", "3", "--measurement",
                 str(tmp_path / "s.json"), "--verify-samples", "2", "--probe-memory", "1KB", "--calib", wiki_excerpt,
                 "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "q"), "--bpw-units", "fused"]) == 0
    alloc = json.loads((tmp_path / "q" / "allocation.json").read_text())
    assert alloc["bpw"] <= 3
    from qforge.models.families import ARCHS
    from qforge.models.fused import fused_sets

    sets = fused_sets(ARCHS["llama"], alloc["layers"])                 # streamed, checked: each set on one scheme
    assert any(len(ms) > 1 for ms in sets.values())
    for members in sets.values():
        assert len({tuple(alloc["layers"][n][k] for k in ("bits", "group_size", "sym")) for n in members}) == 1
    with pytest.raises(SystemExit):
        main(["-q", "measure", str(src), "--stream", "--probe-memory", "lots", "--out", str(tmp_path / "x.json")])


def test_a_streamed_block_check_gives_the_in_memory_numbers(tmp_path, tiny_tokenizer, monkeypatch):
    """mixed/verify.check_blocks streamed: one variant per checked block, all in one sweep (or one per sweep),
    the in-memory checks' per-sequence KLs; validation sequences of two lengths."""
    from qforge.mixed import plan
    from qforge.mixed.verify import check_blocks

    src = _saved_dir(tmp_path, tiny_tokenizer, "llama")
    vocab = len(tiny_tokenizer)
    calib, valid = _samples(vocab), _samples(vocab, 2, 48) + _samples(vocab, 3, 40)[1:]
    model = qforge.load(str(src)).model
    a = plan(measure_model(model, calib, tmp_path / "m.json", CFG, "gptq", (2, 4), show_progress=False,
                           probe_samples=2), 3.0)
    want = check_blocks(model, a, calib, valid, CFG)
    m, loads = _streamed(src, monkeypatch)
    n = len(get_blocks(m.model, arch_spec(m.model)))
    for probe_memory, sweeps in [(1 << 30, [list(range(n))]), (1, [list(range(s, n)) for s in range(n)])]:
        loads.clear()
        got = check_blocks(m.model, a, calib, valid, CFG, weights=m.blocks, probe_memory=probe_memory)
        assert loads == [j for sweep in sweeps for j in sweep]
        assert sorted(got) == sorted(want)
        for i, c in want.items():
            assert got[i].schemes == c.schemes and got[i].predicted == c.predicted
            assert got[i].kl == pytest.approx(c.kl, rel=1e-4, abs=1e-12)
    loads.clear()
    got = check_blocks(m.model, a, calib, valid, CFG, only={1}, weights=m.blocks)
    assert sorted(got) == [1] and got[1].kl == pytest.approx(want[1].kl, rel=1e-4, abs=1e-12)
    assert loads == [0, 1]                                  # block 0 only to walk the fp model to block 1


def test_a_rotated_measurement_streams_and_is_what_quantize_rotate_reads(tmp_path, tiny_tokenizer, caplog,
                                                                         wiki_excerpt):
    from qforge.cli.main import main

    src = _saved_dir(tmp_path, tiny_tokenizer, "llama")
    calib = ["--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "32", "--candidate-bits", "2,4"]
    rotate = ["--rotate", "hadamard", "--rotation-seed", "3"]
    for name, extra in (("plain", []), ("mem", rotate), ("s", [*rotate, "--stream", "--probe-memory", "1KB"])):
        assert main(["-q", "measure", str(src), "--out", str(tmp_path / f"{name}.json"), *calib, *extra]) == 0
    plain, mem, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "mem", "s"))
    _assert_same(streamed, mem)
    assert mem["rotation"] == ["hadamard", 3] and "rotation" not in plain
    errs = (lambda m: [o["err"] for d in m["layers"].values() for o in d["options"]])
    assert errs(mem) != pytest.approx(errs(plain), rel=1e-3)             # the rotated weights were measured
    q = ["-q", "quantize", str(src), "--method", "gptq", "--bpw", "3", "--measurement", str(tmp_path / "s.json"),
         "--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "32"]
    caplog.clear()
    assert main([*q, *rotate, "--out", str(tmp_path / "q")]) == 0
    assert "measured with other GPTQ settings" not in caplog.text
    assert main([*q, "--out", str(tmp_path / "q-plain")]) == 0
    assert "(rotation differ)" in caplog.text
