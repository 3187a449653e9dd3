"""An interrupted calibrated run resumes after its last finished block and gives the uninterrupted result."""
import json

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.runstate import BlockStore


def _run(tiny_llama_dir, calib, cfg, resume=None):
    m = qforge.load(str(tiny_llama_dir), cfg)
    m.quantize(calib, nsamples=4, seqlen=32, resume=resume)
    return m


@pytest.mark.parametrize("cfg", [QuantizeConfig(method="gptq", bits=3, group_size=32),
                                 QuantizeConfig(method="awq+gptq", bits=3, group_size=32, awq_grid=4),
                                 QuantizeConfig(method="awq", group_size=32, awq_grid=4, compute_dtype="float32"),
                                 QuantizeConfig(method="gptq", bits=8, group_size=-1, act_bits=8, smoothquant=0.5),
                                 QuantizeConfig(method="gptq", bits=3, group_size=32, gptaq=0.25)])
def test_an_interrupted_run_resumes_to_the_same_result(tiny_llama_dir, tmp_path, monkeypatch, cfg, wiki_excerpt):
    ref = _run(tiny_llama_dir, wiki_excerpt, cfg)
    save = BlockStore.save

    def save_then_stop(self, i, *args):
        save(self, i, *args)
        if i == 0:
            raise KeyboardInterrupt                       # as if the user pressed Ctrl-C after block 0

    monkeypatch.setattr(BlockStore, "save", save_then_stop)
    state = tmp_path / "q.partial"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama_dir, wiki_excerpt, cfg, state)
    monkeypatch.undo()
    assert (state / "block_0.safetensors").is_file() and not (state / "block_1.safetensors").exists()

    restored = []
    restore = BlockStore.restore
    monkeypatch.setattr(BlockStore, "restore", lambda self, i, block: restored.append(i) or restore(self, i, block))
    m = _run(tiny_llama_dir, wiki_excerpt, cfg, state)
    assert restored == [0]                                # block 0 restored, not solved again
    assert m.result.layers.keys() == ref.result.layers.keys()
    for n, q in ref.result.layers.items():
        r = m.result.layers[n]
        assert torch.equal(r.codes, q.codes) and torch.equal(r.scales, q.scales), n
        assert torch.equal(r.zeros, q.zeros) and torch.equal(r.g_idx, q.g_idx) and r.info == q.info, n
    for (k, a), b in zip(ref.model.state_dict().items(), m.model.state_dict().values()):
        assert torch.equal(a, b), k                       # AWQ's folded norms included
    assert {i: a.alphas for i, a in m.result.awq.items()} == {i: a.alphas for i, a in ref.result.awq.items()}
    assert m.result.smoothquant.keys() == ref.result.smoothquant.keys()   # W8A8: block 0's scales restored
    assert all(torch.equal(s, ref.result.smoothquant[k]) for k, s in m.result.smoothquant.items())
    m.save(tmp_path / "q")
    assert not state.exists()                             # the output holds it all now


def test_a_run_state_of_other_settings_is_refused(tiny_llama_dir, tmp_path, monkeypatch, wiki_excerpt):
    state = tmp_path / "s"
    _run(tiny_llama_dir, wiki_excerpt, QuantizeConfig(method="gptq", group_size=32), state)   # not saved: stays
    assert (state / "state.json").is_file()
    with pytest.raises(QForgeError, match="another run.*config"):
        _run(tiny_llama_dir, wiki_excerpt, QuantizeConfig(method="gptq", group_size=64), state)
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(method="gptq", group_size=32))
    with torch.no_grad():
        next(m.model.parameters()).mul_(2)                # as if another checkpoint were at the same path
    with pytest.raises(QForgeError, match="another run.*weights"):
        m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=state)
    (state / "state.json").write_text("{")
    with pytest.raises(QForgeError, match="corrupt"):
        _run(tiny_llama_dir, wiki_excerpt, QuantizeConfig(method="gptq", group_size=32), state)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(QForgeError, match="not a qforge run state"):
        _run(tiny_llama_dir, wiki_excerpt, QuantizeConfig(method="gptq", group_size=32), other)
    assert (other / "notes.txt").read_text() == "mine"


def test_the_cli_says_how_to_resume_and_cleans_up(tiny_llama_dir, tmp_path, monkeypatch, capsys, wiki_excerpt):
    from qforge.cli.main import main

    argv = ["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--group-size", "32", "--calib",
            wiki_excerpt, "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "q")]
    save = BlockStore.save

    def save_then_stop(self, i, *args):
        save(self, i, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(BlockStore, "save", save_then_stop)
    assert main(argv) == 130
    assert "the same command resumes" in capsys.readouterr().err
    assert (tmp_path / "q.partial" / "block_0.safetensors").is_file() and not (tmp_path / "q").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    assert (tmp_path / "q" / "qforge_quant.safetensors").is_file() and not (tmp_path / "q.partial").exists()


def test_an_interrupted_measurement_says_it_resumes(tiny_llama_dir, tmp_path, monkeypatch, capsys, wiki_excerpt):
    """Ctrl-C in `qforge measure` after a block: the file holds the finished blocks and the message says so."""
    from qforge.cli.main import main
    from qforge.mixed import measure as measure_mod

    meas = tmp_path / "m.json"
    argv = ["-q", "measure", str(tiny_llama_dir), "--calib", wiki_excerpt, "--nsamples", "4", "--seqlen", "32",
            "--candidate-bits", "4", "--out", str(meas)]
    write = measure_mod._write_atomic

    def write_then_stop(path, data):
        write(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(measure_mod, "_write_atomic", write_then_stop)
    assert main(argv) == 130
    assert f"saved in {meas}" in capsys.readouterr().err
    assert json.loads(meas.read_text())["blocks_done"] == 1
    monkeypatch.undo()
    assert main(argv) == 0
    assert json.loads(meas.read_text())["blocks_done"] == json.loads(meas.read_text())["n_blocks"]


@pytest.mark.parametrize("model_type,skip", [("llama", "*.0.mlp.up_proj"),
                                             ("mixtral", "*.0.mlp.experts.gate_up_proj.1"),   # fused 3-D experts
                                             ("gpt2", "*.0.mlp.c_proj")])                    # Conv1D: [in, out]
def test_the_run_state_keeps_codes_not_the_weights_they_rebuild(tmp_path, tiny_tokenizer, model_type, skip,
                                                                 wiki_excerpt):
    from qforge.models.arch import arch_spec, get_blocks
    from safetensors import safe_open
    from tiny_models import tiny_model

    d = tmp_path / model_type
    tiny_model(model_type, seed=1).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    m = qforge.load(str(d), QuantizeConfig(method="gptq", bits=4, group_size=16, skip=(skip,)))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "s")
    block = get_blocks(m.model, arch_spec(m.model))[0]
    with safe_open(str(tmp_path / "s" / "block_0.safetensors"), "pt") as f:
        stored = {k[len("state."):] for k in f.keys() if k.startswith("state.")}
        rebuilt = json.loads(f.metadata()["rebuilt"])
    assert rebuilt and stored.isdisjoint(rebuilt) and stored | set(rebuilt) == set(block.state_dict())
    skipped = {"llama": "mlp.up_proj.weight", "mixtral": "mlp.experts.gate_up_proj", "gpt2": "mlp.c_proj.weight"}
    assert skipped[model_type] in stored           # an unquantized linear (or a partly quantized expert tensor)
    state, *_ = m._store.read(0)                 # rebuilt from the codes: the block exactly as it was solved
    assert state.keys() == block.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())


def test_a_weight_that_differs_from_its_codes_stays_in_the_run_state(tiny_llama_dir, wiki_excerpt):
    from qforge.models.arch import arch_spec, get_blocks
    from qforge.runstate import rebuildable_weights

    m = _run(tiny_llama_dir, wiki_excerpt, QuantizeConfig(method="gptq", group_size=32))
    prefix = "model.layers.0."
    layers = {n: q for n, q in m.result.layers.items() if n.startswith(prefix)}
    block = get_blocks(m.model, arch_spec(m.model))[0]
    assert "self_attn.o_proj.weight" in rebuildable_weights(block, layers, prefix)
    with torch.no_grad():
        block.self_attn.o_proj.weight[0, 0] += 1e-6
    got = rebuildable_weights(block, layers, prefix)
    assert "self_attn.o_proj.weight" not in got and "self_attn.q_proj.weight" in got
