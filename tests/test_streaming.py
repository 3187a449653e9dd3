"""Streamed runs (models larger than RAM): one block in memory at a time, the same output as an in-memory run."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.checkpoint import read_layers
from qforge.cli.main import main
from qforge.models.arch import arch_spec, get_blocks
from qforge.models.streaming import BlockLoader, load_streamed
from tiny_models import CONFIGS, tiny_model
from tiny_models import saved_tensors as _tensors


def _saved_dir(tmp_path, tokenizer, model_type):
    d = tmp_path / model_type
    tiny_model(model_type, seed=3).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", QuantizeConfig(method="gptq", bits=3, group_size=32, act_order=True)),
    ("gemma", QuantizeConfig(method="awq+gptq", bits=4, group_size=16, awq_grid=4)),   # tied lm_head
    # Gemma 4's vision-language model (its vision tower kept as is): per-layer inputs; blocks 2 and 3 read the keys
    # and values blocks 0 and 1 leave
    ("gemma4", QuantizeConfig(method="awq+gptq", bits=4, group_size=16, awq_grid=4)),
    ("opt", QuantizeConfig(method="rtn", bits=4, group_size=32, sym=False)),
    ("mixtral", QuantizeConfig(method="gptq", bits=4, group_size=32)),      # per-expert keys, fused on load
    ("qwen3_moe", QuantizeConfig(method="awq+gptq", bits=3, group_size=16, awq_grid=4)),   # its own expert keys
    ("phi3", QuantizeConfig(method="awq", bits=4, group_size=32, awq_grid=4)),         # fused q|k|v, gate|up
    ("deepseek_v3", QuantizeConfig(method="awq+gptq", bits=4, group_size=16, awq_grid=4)),  # MLA; dense, MoE blocks
    ("qwen2_moe", QuantizeConfig(method="gptq", bits=4, group_size=32)),    # shared expert, its gate unquantized
    ("bloom", QuantizeConfig(method="gptq", bits=4, group_size=32)),        # blocks return tuples
    ("falcon_two_norms", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),   # ln_attn, ln_mlp
    # experts stored fused [experts, in, out], packed one module each; GPT-OSS: interleaved gate/up with biases
    ("llama4_text", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),
    ("gpt_oss", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),
    ("qwen3_next", QuantizeConfig(method="gptq", bits=4, group_size=32)),   # Gated DeltaNet, gated attention; experts
    ("lfm2_moe", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),   # conv, attention; experts
    # Mamba-2; experts stored 3-D (block_sparse_moe.input_linear), packed one module each; a shared MLP
    ("granitemoehybrid", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),
    ("nemotron_h", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),   # one mixer a block
    ("nemotron_h_latent", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),   # experts, no gate
    ("falcon_h1", QuantizeConfig(method="gptq", bits=4, group_size=32)),    # Mamba-2 beside attention
    ("qwen3_5_moe_text", QuantizeConfig(method="awq+gptq", bits=4, group_size=32, awq_grid=4)),   # Gated DeltaNet
])
def test_a_streamed_run_writes_what_an_in_memory_run_does(tmp_path, tiny_tokenizer, monkeypatch, model_type, cfg,
                                                          wiki_calibration):
    src = _saved_dir(tmp_path, tiny_tokenizer, model_type)
    ref = qforge.load(str(src), cfg)
    ref.quantize(wiki_calibration)
    ref.save(tmp_path / "ref")

    m = qforge.load(str(src), cfg, stream=True)
    blocks = get_blocks(m.model, arch_spec(m.model))
    assert not any(BlockLoader.materialized(b) for b in blocks)
    loads = []
    load = BlockLoader.load

    def one_at_a_time(self, i, block):
        assert not any(BlockLoader.materialized(b) for b in blocks), "a block was still in memory"
        assert m.model.get_input_embeddings().weight.device.type == "meta", "the embeddings were still in memory"
        loads.append(i)
        load(self, i, block)

    monkeypatch.setattr(BlockLoader, "load", one_at_a_time)
    m.quantize(wiki_calibration, resume=tmp_path / "out.partial")
    assert loads == list(range(len(blocks)))
    assert all(q.codes.device.type == "meta" for q in m.result.layers.values())   # values are on disk only
    fmt = "gptq" if cfg.method != "rtn" else "compressed-tensors"
    early = m.export(tmp_path / "packed-early", fmt)          # before save(): packed from the run state
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
    ref.export(tmp_path / "ref-packed", fmt)
    sizes = m.export(tmp_path / "packed", fmt)
    want = _tensors(tmp_path / "ref-packed")
    conf = (lambda d: json.loads((d / "config.json").read_text())["quantization_config"])
    for d in ("packed", "packed-early"):
        got = _tensors(tmp_path / d)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), d
        assert conf(tmp_path / "ref-packed") == conf(tmp_path / d)
    assert sizes["quantized_weights"] == early["quantized_weights"] == ref.storage()["quantized_weights"]


def test_a_streamed_run_resumes_after_its_last_saved_block(tmp_path, tiny_llama_dir, monkeypatch, wiki_excerpt):
    cfg = QuantizeConfig(method="gptq", bits=3, group_size=32)
    ref = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    ref.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "ref.partial")
    ref.save(tmp_path / "ref")
    load = BlockLoader.load

    def stop_at_1(self, i, block):
        if i == 1:
            raise KeyboardInterrupt
        load(self, i, block)

    monkeypatch.setattr(BlockLoader, "load", stop_at_1)
    m = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    with pytest.raises(KeyboardInterrupt):
        m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "q.partial")
    monkeypatch.undo()
    assert json.loads((tmp_path / "q.partial" / "state.json").read_text())["blocks_done"] == 1
    m = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "q.partial")
    out = m.save(tmp_path / "q")
    want, got = _tensors(tmp_path / "ref"), _tensors(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_streaming_refuses_what_it_cannot_do(tmp_path, tiny_tokenizer, tiny_llama_dir, wiki_excerpt):
    foreign = _saved_dir(tmp_path, tiny_tokenizer, "llama")          # a key no transform turns into a parameter
    state = load_file(str(foreign / "model.safetensors"))
    state["model.layers.1.mlp.gate.weight"] = state.pop("model.layers.1.mlp.gate_proj.weight")
    save_file(state, str(foreign / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QForgeError, match="not the model's parameter names.*model.layers.1.mlp.gate_proj.weight"):
        load_streamed(str(foreign))
    with pytest.raises(QForgeError, match="give resume=DIR"):
        qforge.load(str(tiny_llama_dir), QuantizeConfig(method="rtn"), stream=True).quantize(None)
    with pytest.raises(QForgeError, match="search runs the whole model .* does not stream"):
        searched = QuantizeConfig(method="gptq", bpw=3.5, search_generations=2)
        qforge.load(str(tiny_llama_dir), searched, stream=True).quantize(wiki_excerpt, nsamples=2, seqlen=32,
                                                                         resume=tmp_path / "p")
    m = qforge.load(str(tiny_llama_dir), QuantizeConfig(method="rtn"), stream=True)
    m.quantize(None, resume=tmp_path / "rtn.partial")
    m.drop_run_state()
    assert not (tmp_path / "rtn.partial").exists()
    with pytest.raises(QForgeError, match="blocks are gone"):
        m.export(tmp_path / "x")
    with pytest.raises(QForgeError, match="run state dropped"):
        m.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()

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


def test_stream_from_the_command_line(tmp_path, tiny_llama_dir, capsys, wiki_excerpt):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--stream", "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32", "--out", str(out),
                 "--format", "gptq"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (tmp_path / "q-gptq" / "config.json").is_file()
    assert main(["-q", "export", str(out), "--stream", "--format", "awq", "--out", str(tmp_path / "awq")]) == 0
    assert main(["-q", "export", str(out), "--format", "awq", "--out", str(tmp_path / "awq-mem")]) == 0
    want, got = _tensors(tmp_path / "awq-mem"), _tensors(tmp_path / "awq")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_packed_only_from_the_command_line(tmp_path, tiny_llama_dir, capsys, wiki_excerpt):
    """--packed-only: the packed checkpoint alone at --out, as the two-step run exports it; no run state left."""
    args = ["-q", "quantize", str(tiny_llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--calib", wiki_excerpt, "--nsamples", "4", "--calib-seqlen", "32", "--format", "gptq"]
    assert main(args + ["--out", str(tmp_path / "two-step")]) == 0
    for mode in (["--stream"], []):
        out = tmp_path / f"only{''.join(mode)}"
        assert main(args + mode + ["--packed-only", "--out", str(out)]) == 0
        assert not (tmp_path / f"{out.name}.partial").exists() and not (tmp_path / f"{out.name}-gptq").exists()
        assert not (out / "qforge_config.json").exists()                   # not a dense qforge output
        want, got = _tensors(tmp_path / "two-step-gptq"), _tensors(out)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), mode
        record = json.loads((out / "qforge_export.json").read_text())
        assert record["qforge_config"]["method"] == "gptq" and record["format"] == "gptq"
        assert qforge.load(str(out)).packed_format == "gptq"
    capsys.readouterr()
    assert main(args[:-2] + ["--packed-only", "--out", str(tmp_path / "x")]) == 2
    assert "name one" in capsys.readouterr().err
    assert main(args + ["--packed-only", "--export-out", str(tmp_path / "y"), "--out", str(tmp_path / "x")]) == 2
    assert "drop --export-out" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _allocation(model, fmt="gptq"):
    """A hand-made mixed allocation over every block linear of `model`: 2, 3, 4 and 8 bits in turn."""
    from qforge.mixed import Allocation
    from qforge.mixed.schemes import scheme_bits
    from qforge.models.arch import named_block_linears
    from qforge.solvers import Grid

    layers = {}
    for k, (name, (_, ref)) in enumerate(named_block_linears(model, arch_spec(model)).items()):
        grid = Grid((2, 3, 4, 8)[k % 4], (16, 32, -1)[k % 3], k % 2 == 0)
        shape = tuple(ref.weight.shape)
        layers[name] = {"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym, "err": 0.1,
                        "stored_bits": scheme_bits(shape, grid, fmt), "numel": shape[0] * shape[1]}
    return Allocation(3.5, fmt, layers)


def test_a_streamed_run_takes_a_mixed_allocation(tmp_path, tiny_llama_dir, wiki_excerpt):
    """Mixed precision streams with an allocation planned beforehand: the codes of the in-memory run, the
    allocation carried into the output and every export; a search is refused (it runs the whole model)."""
    cfg = QuantizeConfig(method="gptq", act_order=True)
    ref = qforge.load(str(tiny_llama_dir), cfg)
    alloc = _allocation(ref.model)
    ref.quantize(wiki_excerpt, nsamples=4, seqlen=32, allocation=alloc)
    m = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    m.check_export("gptq", alloc)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, allocation=alloc, resume=tmp_path / "s.partial")
    early = m.export(tmp_path / "early", "gptq")
    out = m.save(tmp_path / "s")
    got = read_layers(out)
    assert len({q.grid for q in got.values()}) > 3
    for name, q in ref.result.layers.items():
        assert q.grid == alloc.grids[name] == got[name].grid and torch.equal(q.codes, got[name].codes), name
    ref.export(tmp_path / "ref-packed", "gptq")
    sizes = qforge.load(str(out), stream=True).export(tmp_path / "late", "gptq")
    want = _tensors(tmp_path / "ref-packed")
    for d in ("early", "late"):
        got = _tensors(tmp_path / d)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), d
        assert json.loads((tmp_path / d / "allocation.json").read_text())["layers"] == alloc.layers, d
    assert sizes["bits_per_weight"] == early["bits_per_weight"] == pytest.approx(alloc.bpw, rel=1e-12)
    assert qforge.load(str(out)).result.allocation.layers == alloc.layers
    searched = QuantizeConfig(method="gptq", search_generations=2, measurement=str(tmp_path / "m.json"))
    with pytest.raises(QForgeError, match="search without stream, then quantize streamed"):
        qforge.load(str(tiny_llama_dir), searched, stream=True).quantize(
            wiki_excerpt, nsamples=2, seqlen=32, allocation=alloc, resume=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_streamed_export_keeps_shards_under_the_size_limit(tmp_path, tiny_llama_dir, capsys):
    from qforge.utils.shards import INDEX

    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tiny_llama_dir), "--stream", "--method", "rtn", "--out", str(out)]) == 0
    limit = 40_000
    assert main(["-q", "export", str(out), "--stream", "--format", "gptq", "--max-shard-size", "40KB",
                 "--out", str(tmp_path / "small")]) == 0
    assert main(["-q", "export", str(out), "--format", "gptq", "--out", str(tmp_path / "whole")]) == 0
    shards = sorted((tmp_path / "small").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "small" / INDEX).read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    for f in shards:
        t = load_file(str(f))
        assert sum(v.numel() * v.element_size() for v in t.values()) <= limit or len(t) == 1, f.name
    assert [f.name for f in (tmp_path / "whole").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "whole" / INDEX).exists()
    want, got = _tensors(tmp_path / "whole"), _tensors(tmp_path / "small")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not list((tmp_path / "small").glob(".shard-*"))                     # every temporary name resolved
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        a, b = (qforge.load(str(tmp_path / d)).model(ids).logits for d in ("whole", "small"))
    assert torch.equal(a, b)
    capsys.readouterr()
    with pytest.raises(SystemExit):                                             # argparse's usage error
        main(["-q", "export", str(out), "--format", "gptq", "--max-shard-size", "4 lots", "--out", str(tmp_path / "bad")])
    assert "4GB, 500MB, 2GiB" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_converted_checkpoint_keys_stream_as_from_pretrained_loads_them(tmp_path, tiny_tokenizer):
    """Mixtral's per-expert keys go through transformers' own transforms one block at a time: 12 experts are
    stacked in their natural order (0, 1, ..., 11; not the string order 0, 1, 10, 11, 2, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **{**CONFIGS["mixtral"],
                                                                              "num_local_experts": 12}))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / "moe"
    net.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    assert "model.layers.0.block_sparse_moe.experts.11.w1.weight" in load_file(str(d / "model.safetensors"))
    want = AutoModelForCausalLM.from_pretrained(str(d)).state_dict()
    lm, loader = load_streamed(str(d))
    for i, block in enumerate(get_blocks(lm.model, arch_spec(lm.model))):
        loader.load(i, block)
        for name, t in block.state_dict().items():
            assert torch.equal(t, want[f"model.layers.{i}.{name}"]), (i, name)
        loader.release(block)


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
    assert lm.model.get_input_embeddings().weight.device.type == "meta"      # read only when needed
    with torch.no_grad(), loader.outside(lm.model):
        assert torch.equal(lm.model(ids).logits, net(ids).logits)
        assert lm.model.get_input_embeddings().weight is lm.model.get_output_embeddings().weight
    assert lm.model.get_input_embeddings().weight is lm.model.get_output_embeddings().weight
    assert lm.model.get_input_embeddings().weight.device.type == "meta"      # and dropped again


# gemma2: logit soft-capping, tied head; gpt_oss: attention sinks, expert biases; gemma4: a vision-language model
# whose forward reads the input embeddings' pad row (the head pass leaves them out) for its per-layer inputs
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "opt", "mixtral", "gpt_oss", "lfm2", "granitemoehybrid",
                                        "falcon_h1", "gemma4"])
def test_a_streamed_evaluation_gives_the_in_memory_perplexity(tmp_path, tiny_tokenizer, model_type):
    from qforge.eval.datasets import load_eval_text
    from qforge.eval.perplexity import perplexity, token_nll, token_windows
    from qforge.eval.streamed import streamed_token_nll

    src = _saved_dir(tmp_path, tiny_tokenizer, model_type)
    ref = qforge.load(str(src))
    lm, loader = load_streamed(str(src))
    windows = token_windows(tiny_tokenizer, load_eval_text("wiki"), 48, 5)
    want = token_nll(ref.model, windows, batch_size=2, show_progress=False)
    got = streamed_token_nll(lm.model, loader, windows, batch_size=2, show_progress=False)
    assert torch.equal(got, want)                 # the same operations on the same values
    assert lm.model.get_input_embeddings().weight.device.type == "meta"
    assert not any(BlockLoader.materialized(b) for b in get_blocks(lm.model, arch_spec(lm.model)))
    text = load_eval_text("news")
    a = perplexity(ref.model, tiny_tokenizer, text, 32, 3, show_progress=False)
    b = perplexity(lm.model, tiny_tokenizer, text, 32, 3, show_progress=False, weights=loader)
    assert b["ppl"] == a["ppl"] and b["windows"] == a["windows"] == 3


def test_a_streamed_run_is_evaluated_from_its_saved_output(tmp_path, tiny_llama_dir, capsys, wiki_excerpt):
    cfg = QuantizeConfig(method="gptq", bits=3, group_size=32)
    ref = qforge.load(str(tiny_llama_dir), cfg)
    ref.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    m = qforge.load(str(tiny_llama_dir), cfg, stream=True)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "q.partial")
    with pytest.raises(QForgeError, match="call save\\(\\) first"):
        qforge.evaluate(m, ["wiki"], seqlen=32, max_windows=2)
    m.save(tmp_path / "q")
    want = qforge.evaluate(ref, ["wiki"], seqlen=32, max_windows=2)[0]
    got = qforge.evaluate(m, ["wiki"], seqlen=32, max_windows=2)[0]
    assert got["ppl"] == want["ppl"]
    fp = qforge.evaluate(str(tiny_llama_dir), ["wiki"], seqlen=32, max_windows=2, stream=True)[0]
    assert abs(fp["ppl"] / got["ppl"] - 1) > 1e-4              # the quantized weights, not the source's
    with pytest.raises(QForgeError, match="perplexity only"):
        qforge.evaluate(str(tmp_path / "q"), ["wiki"], seqlen=32, max_windows=2, stream=True, reference=ref)
    assert main(["-q", "eval", str(tmp_path / "q"), "--stream", "--dataset", "wiki", "--seqlen", "32",
                 "--max-windows", "2", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())[0]["ppl"] == want["ppl"]


@pytest.mark.parametrize("fmt,model_type", [("gptq", "llama"), ("compressed-tensors", "llama"), ("awq", "llama"),
                                            ("gptq", "mixtral")])     # experts stored one module each
def test_a_packed_checkpoint_is_evaluated_block_by_block(tmp_path, tiny_tokenizer, fmt, model_type, wiki_excerpt):
    src = _saved_dir(tmp_path, tiny_tokenizer, model_type)
    m = qforge.load(str(src), QuantizeConfig(method="gptq" if fmt != "awq" else "awq", bits=4, group_size=32,
                                             awq_grid=4))
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    m.export(tmp_path / fmt, fmt)
    want = qforge.evaluate(str(tmp_path / fmt), ["wiki", "code"], seqlen=32, max_windows=2)
    streamed = qforge.load(str(tmp_path / fmt), stream=True)
    assert streamed.packed_format == fmt
    assert streamed.model.get_input_embeddings().weight.device.type == "meta"
    got = qforge.evaluate(streamed, ["wiki", "code"], seqlen=32, max_windows=2)
    for a, b in zip(want, got):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-6) and b["windows"] == a["windows"] == 2
    blocks = get_blocks(streamed.model, arch_spec(streamed.model))
    assert not any(BlockLoader.materialized(b) for b in blocks)
    assert all(type(b.self_attn.q_proj).__name__ == "Linear" for b in blocks)   # the meta modules back in place


def test_a_pass_reads_only_the_outside_weights_it_needs(tmp_path, tiny_tokenizer):
    """The capture pass reads no lm_head, the evaluation's head pass no embeddings (untied: two big matrices
    of a large vocabulary); tied embeddings are one tensor and always load."""
    def devices(model):
        return (model.get_input_embeddings().weight.device.type, model.get_output_embeddings().weight.device.type)

    lm, loader = load_streamed(str(_saved_dir(tmp_path, tiny_tokenizer, "llama")))
    assert not lm.model.config.tie_word_embeddings
    with loader.outside(lm.model, without="head"):
        assert devices(lm.model) == ("cpu", "meta") and lm.model.model.norm.weight.device.type == "cpu"
    with loader.outside(lm.model, without="embeddings"):
        assert devices(lm.model) == ("meta", "cpu")
    with loader.outside(lm.model):
        assert devices(lm.model) == ("cpu", "cpu")
    assert devices(lm.model) == ("meta", "meta")
    with pytest.raises(ValueError, match="without"), loader.outside(lm.model, without="lm_head"):
        pass
    tied, tied_loader = load_streamed(str(_saved_dir(tmp_path, tiny_tokenizer, "gemma")))
    with tied_loader.outside(tied.model, without="head"):
        assert devices(tied.model) == ("cpu", "cpu")


def test_a_multimodal_llama4_checkpoint_streams_as_its_text_model(tmp_path, tiny_tokenizer, wiki_excerpt):
    """Llama 4's released checkpoints are multimodal (`llama4`: the text model under `language_model.`, a vision
    tower beside it); AutoModelForCausalLM reads them as the text model, and so does a streamed run (the prefix
    handled as from_pretrained does, the vision tensors left unread): the same codes as in memory."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    src = tmp_path / "scout"
    Llama4ForConditionalGeneration(Llama4Config(text_config=dict(CONFIGS["llama4_text"]), vision_config=vision)
                                   ).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    _streams_as_its_text_model(src, "llama4_text", tmp_path, wiki_excerpt)


def _streams_as_its_text_model(src, text_type: str, tmp_path, calib: str):
    """`src` loads as its `text_type` model, and a streamed run of it writes the in-memory run's codes."""
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32)
    ref = qforge.load(str(src), cfg)
    assert ref.model.config.model_type == text_type
    ref.quantize(calib, nsamples=4, seqlen=32)
    m = qforge.load(str(src), cfg, stream=True)
    m.quantize(calib, nsamples=4, seqlen=32, resume=tmp_path / "run")
    out = m.save(tmp_path / "out")
    assert read_layers(out).keys() == ref.result.layers.keys()
    for n, q in read_layers(out).items():
        assert torch.equal(q.codes, ref.result.layers[n].codes), n


def test_a_multimodal_qwen3_5_checkpoint_streams_as_its_text_model(tmp_path, tiny_tokenizer, wiki_excerpt):
    """Qwen3.5's released checkpoints are vision-language models (`qwen3_5_moe`, the text decoder under
    model.language_model.); transformers' AutoModelForCausalLM reads them as the text model, and so does a
    streamed run, to the same codes."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8)
    torch.manual_seed(0)
    src = tmp_path / "qwen3_5"
    AutoModelForImageTextToText.from_config(AutoConfig.for_model(
        "qwen3_5_moe", text_config=dict(CONFIGS["qwen3_5_moe_text"]), vision_config=vision)).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    _streams_as_its_text_model(src, "qwen3_5_moe_text", tmp_path, wiki_excerpt)
