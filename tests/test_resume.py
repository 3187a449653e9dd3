"""An interrupted calibrated run resumes after its last finished block and gives the uninterrupted result."""
import json

import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.runstate import BlockStore


def _run(tiny_llama_dir, cfg, resume=None):
    m = qforge.load(str(tiny_llama_dir), cfg)
    m.quantize("builtin:wiki", nsamples=4, seqlen=32, resume=resume)
    return m


@pytest.mark.parametrize("cfg", [QuantizeConfig(method="gptq", bits=3, group_size=32),
                                 QuantizeConfig(method="awq+gptq", bits=3, group_size=32, awq_grid=4),
                                 QuantizeConfig(method="awq", group_size=32, awq_grid=4, compute_dtype="float32")])
def test_an_interrupted_run_resumes_to_the_same_result(tiny_llama_dir, tmp_path, monkeypatch, cfg):
    ref = _run(tiny_llama_dir, cfg)
    save = BlockStore.save

    def save_then_stop(self, i, *args):
        save(self, i, *args)
        if i == 0:
            raise KeyboardInterrupt                       # as if the user pressed Ctrl-C after block 0

    monkeypatch.setattr(BlockStore, "save", save_then_stop)
    state = tmp_path / "q.partial"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama_dir, cfg, state)
    monkeypatch.undo()
    assert (state / "block_0.safetensors").is_file() and not (state / "block_1.safetensors").exists()

    restored = []
    restore = BlockStore.restore
    monkeypatch.setattr(BlockStore, "restore", lambda self, i, block: restored.append(i) or restore(self, i, block))
    m = _run(tiny_llama_dir, cfg, state)
    assert restored == [0]                                # block 0 restored, not solved again
    assert m.result.layers.keys() == ref.result.layers.keys()
    for n, q in ref.result.layers.items():
        r = m.result.layers[n]
        assert torch.equal(r.codes, q.codes) and torch.equal(r.scales, q.scales), n
        assert torch.equal(r.zeros, q.zeros) and torch.equal(r.g_idx, q.g_idx) and r.info == q.info, n
    for (k, a), b in zip(ref.model.state_dict().items(), m.model.state_dict().values()):
        assert torch.equal(a, b), k                       # AWQ's folded norms included
    assert {i: a.alphas for i, a in m.result.awq.items()} == {i: a.alphas for i, a in ref.result.awq.items()}
    m.save(tmp_path / "q")
    assert not state.exists()                             # the output holds it all now


def test_a_run_state_of_other_settings_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    state = tmp_path / "s"
    _run(tiny_llama_dir, QuantizeConfig(method="gptq", group_size=32), state)   # not saved: the state stays
    assert (state / "state.json").is_file()
    with pytest.raises(QForgeError, match="another run.*config"):
        _run(tiny_llama_dir, QuantizeConfig(method="gptq", group_size=64), state)
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(method="gptq", group_size=32))
    with torch.no_grad():
        next(m.model.parameters()).mul_(2)                # as if another checkpoint were at the same path
    with pytest.raises(QForgeError, match="another run.*weights"):
        m.quantize("builtin:wiki", nsamples=4, seqlen=32, resume=state)
    (state / "state.json").write_text("{")
    with pytest.raises(QForgeError, match="corrupt"):
        _run(tiny_llama_dir, QuantizeConfig(method="gptq", group_size=32), state)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(QForgeError, match="not a qforge run state"):
        _run(tiny_llama_dir, QuantizeConfig(method="gptq", group_size=32), other)
    assert (other / "notes.txt").read_text() == "mine"


def test_the_cli_says_how_to_resume_and_cleans_up(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from qforge.cli.main import main

    argv = ["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--group-size", "32", "--calib",
            "builtin:wiki", "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "q")]
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


def test_an_interrupted_measurement_says_it_resumes(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in `qforge measure` after a block: the file holds the finished blocks and the message says so."""
    from qforge.cli.main import main
    from qforge.mixed import measure as measure_mod

    meas = tmp_path / "m.json"
    argv = ["-q", "measure", str(tiny_llama_dir), "--calib", "builtin:wiki", "--nsamples", "4", "--seqlen", "32",
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
