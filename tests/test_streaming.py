"""Streamed runs (models larger than RAM): one block in memory at a time, the same output as an in-memory run."""
import json

import pytest
import torch
from safetensors.torch import load_file

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.checkpoint import read_layers
from qforge.cli.main import main
from qforge.models.arch import arch_spec, get_blocks
from qforge.models.streaming import BlockLoader, load_streamed
from tiny_models import tiny_model


def _tensors(d):
    t = {}
    for f in sorted(d.glob("*.safetensors")):
        if not f.name.startswith("qforge_quant"):
            t.update(load_file(str(f)))
    return t


def _saved_dir(tmp_path, tokenizer, model_type):
    d = tmp_path / model_type
    tiny_model(model_type, seed=3).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", QuantizeConfig(method="gptq", bits=3, group_size=32, act_order=True)),
    ("gemma", QuantizeConfig(method="awq+gptq", bits=4, group_size=16, awq_grid=4)),   # tied lm_head
    ("opt", QuantizeConfig(method="rtn", bits=4, group_size=32, sym=False)),
])
def test_a_streamed_run_writes_what_an_in_memory_run_does(tmp_path, tiny_tokenizer, monkeypatch, model_type, cfg):
    src = _saved_dir(tmp_path, tiny_tokenizer, model_type)
    ref = qforge.load(str(src), cfg)
    ref.quantize("builtin:wiki", nsamples=4, seqlen=32)
    ref.save(tmp_path / "ref")

    m = qforge.load(str(src), cfg, stream=True)
    blocks = get_blocks(m.model, arch_spec(m.model))
    assert not any(BlockLoader.materialized(b) for b in blocks)
    loads = []
    load = BlockLoader.load

    def one_at_a_time(self, i, block):
        assert not any(BlockLoader.materialized(b) for b in blocks), "a block was still in memory"
        loads.append(i)
        load(self, i, block)

    monkeypatch.setattr(BlockLoader, "load", one_at_a_time)
    m.quantize("builtin:wiki", nsamples=4, seqlen=32, resume=tmp_path / "out.partial")
    assert loads == list(range(len(blocks)))
    assert all(q.codes.device.type == "meta" for q in m.result.layers.values())   # values are on disk only
    out = m.save(tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) == len(blocks) + 1

    want, got = _tensors(tmp_path / "ref"), _tensors(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    ql, qs = read_layers(tmp_path / "ref"), read_layers(out)
    assert ql.keys() == qs.keys() == ref.result.layers.keys()
    for n in ql:
        for f in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(ql[n], f), getattr(qs[n], f)), (n, f)
    assert m.storage() == ref.storage()

    # the streamed output loads like any other, and packs block by block to the same checkpoint
    back = qforge.load(str(out))
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, ref.model(ids).logits)
    fmt = "gptq" if cfg.method != "rtn" else "compressed-tensors"
    ref.export(tmp_path / "ref-packed", fmt)
    sizes = m.export(tmp_path / "packed", fmt)
    want, got = _tensors(tmp_path / "ref-packed"), _tensors(tmp_path / "packed")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    conf = (lambda d: json.loads((d / "config.json").read_text())["quantization_config"])
    assert conf(tmp_path / "ref-packed") == conf(tmp_path / "packed")
    assert sizes["quantized_weights"] == ref.storage()["quantized_weights"]


def test_a_streamed_run_resumes_after_its_last_saved_block(tmp_path, tiny_llama_dir, monkeypatch):
    cfg = QuantizeConfig(method="gptq", bits=3, group_size=32)
    ref = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    ref.quantize("builtin:wiki", nsamples=4, seqlen=32, resume=tmp_path / "ref.partial")
    ref.save(tmp_path / "ref")
    load = BlockLoader.load

    def stop_at_1(self, i, block):
        if i == 1:
            raise KeyboardInterrupt
        load(self, i, block)

    monkeypatch.setattr(BlockLoader, "load", stop_at_1)
    m = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    with pytest.raises(KeyboardInterrupt):
        m.quantize("builtin:wiki", nsamples=4, seqlen=32, resume=tmp_path / "q.partial")
    monkeypatch.undo()
    assert json.loads((tmp_path / "q.partial" / "state.json").read_text())["blocks_done"] == 1
    m = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    m.quantize("builtin:wiki", nsamples=4, seqlen=32, resume=tmp_path / "q.partial")
    out = m.save(tmp_path / "q")
    want, got = _tensors(tmp_path / "ref"), _tensors(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_streaming_refuses_what_it_cannot_do(tmp_path, tiny_tokenizer, tiny_llama_dir):
    mixtral = _saved_dir(tmp_path, tiny_tokenizer, "mixtral")     # per-expert keys, fused on load
    with pytest.raises(QForgeError, match="not the model's parameter names"):
        load_streamed(str(mixtral))
    with pytest.raises(QForgeError, match="give resume=DIR"):
        qforge.load(str(tiny_llama_dir), QuantizeConfig(method="rtn"), stream=True).quantize(None)
    with pytest.raises(QForgeError, match="does not stream yet"):
        qforge.load(str(tiny_llama_dir), QuantizeConfig(method="gptq", bpw=3.5), stream=True).quantize(
            "builtin:wiki", nsamples=2, seqlen=32, resume=tmp_path / "p")
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(method="rtn"), stream=True)
    m.quantize(None, resume=tmp_path / "rtn.partial")
    with pytest.raises(QForgeError, match="save\\(\\) first"):
        m.export(tmp_path / "x")

    junk = _saved_dir(tmp_path, tiny_tokenizer, "llama")
    (junk / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QForgeError, match="could not read the checkpoint index"):
        load_streamed(str(junk))

    bad = tmp_path / "nan"                                        # a NaN deep inside a block: named when read
    net = tiny_model("llama")
    with torch.no_grad():
        net.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    net.save_pretrained(bad)
    tiny_tokenizer.save_pretrained(bad)
    m = qforge.load(str(bad), QuantizeConfig(method="rtn"), stream=True)
    with pytest.raises(QForgeError, match="model.layers.1.mlp.down_proj.weight"):
        m.quantize(None, resume=tmp_path / "nan.partial")


def test_stream_from_the_command_line(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--stream", "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--nsamples", "4", "--calib-seqlen", "32", "--out", str(out),
                 "--format", "gptq"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (tmp_path / "q-gptq" / "config.json").is_file()
    assert main(["-q", "export", str(out), "--stream", "--format", "awq", "--out", str(tmp_path / "awq")]) == 0
    assert main(["-q", "export", str(out), "--format", "awq", "--out", str(tmp_path / "awq-mem")]) == 0
    want, got = _tensors(tmp_path / "awq-mem"), _tensors(tmp_path / "awq")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_tied_embeddings_stored_under_the_head_name_stream(tmp_path, tiny_tokenizer):
    """safetensors' save_model (qforge's GGUF conversion) may keep lm_head.weight and drop the embeddings."""
    from safetensors.torch import save_file

    net = tiny_model("gemma", seed=5)
    d = tmp_path / "head-only"
    net.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if k != "model.embed_tokens.weight"}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    lm, loader = load_streamed(str(d))
    for i, b in enumerate(get_blocks(lm.model, arch_spec(lm.model))):
        loader.load(i, b)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, net(ids).logits)
    assert lm.model.get_input_embeddings().weight is lm.model.get_output_embeddings().weight
