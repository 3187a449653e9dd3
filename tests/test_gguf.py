"""GGUF files read a tensor at a time (models/gguf.py): the dense conversion and streaming straight from the file
give what transformers' own GGUF loading gives, bit for bit."""
import json

import numpy as np
import pytest
import torch

import qforge
from qforge import QForgeError, QuantizeConfig
from qforge.models.arch import arch_spec, get_blocks
from qforge.models.gguf import GGUFTensors
from qforge.models.loading import cache_root, resolve_model
from qforge.models.streaming import BlockLoader, load_streamed
from gguf_files import random_qwen3_moe, smollm2_blocks, tiny_family_gguf
from tiny_models import saved_tensors

MAKERS = {"llama": smollm2_blocks, "qwen3_moe": random_qwen3_moe}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _transformers_model(gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)


@pytest.mark.parametrize("model_type", list(MAKERS))
def test_the_dense_conversion_is_what_transformers_loads(tmp_path, cache, monkeypatch, model_type):
    from qforge.models import gguf as gguf_module

    gguf = MAKERS[model_type](tmp_path / f"{model_type}.gguf")
    write_dense = gguf_module.write_dense
    monkeypatch.setattr(gguf_module, "write_dense", lambda p, out: write_dense(p, out, max_shard_bytes=400_000))
    d = resolve_model(str(gguf))
    assert d.parent == cache_root() / "dense"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2                  # shards of at most 400 kB (or one tensor)

    ref = _transformers_model(gguf)
    got = qforge.load(str(gguf)).model
    assert got.config.model_type == model_type
    want, have = ref.state_dict(), got.state_dict()
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():      # equal weights; MoE's expert sums may run in another order, so not bit for bit
        torch.testing.assert_close(ref(ids).logits, got(ids).logits, rtol=0, atol=1e-5)


# tiny_models key -> the GGUF architecture its family is written as (llama.cpp's names), and config fields
# transformers does not read from such a file, at the values it assumes (Qwen3's head width, Falcon's MLP width,
# GPT-2's positions: the real models' values)
FAMILIES = {"qwen2": ("qwen2", {}), "qwen3": ("qwen3", {"head_dim": 128}), "mistral": ("llama", {}),
            "gemma2": ("gemma2", {}), "gemma3_text": ("gemma3", {}), "phi3": ("phi3", {}),
            "falcon_parallel": ("falcon", {"ffn_hidden_size": 256}), "stablelm": ("stablelm", {}),
            "starcoder2": ("starcoder2", {}), "nemotron": ("nemotron", {}), "bloom": ("bloom", {}),
            "gpt2": ("gpt2", {"n_positions": 1024})}


@pytest.mark.parametrize("key", list(FAMILIES))
def test_gguf_files_of_other_families_read_as_transformers_reads_them(tmp_path, cache, key):
    """Every family transformers reads from GGUF and qforge's table holds (beyond the real SmolLM2 file and
    Qwen3-MoE above): the dense conversion and a streamed run's blocks hold what transformers' own GGUF loading
    makes of the file, through its per-architecture transforms (Llama's q/k permutation, Gemma's and Nemotron's
    norm offsets, Bloom's fused q|k|v, GPT-2's Conv1D)."""
    arch, overrides = FAMILIES[key]
    gguf = tiny_family_gguf(tmp_path / f"{key}.gguf", key, arch, **overrides)
    want = _transformers_model(gguf).state_dict()
    got = qforge.load(str(gguf)).model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    lm, loader = load_streamed(str(gguf))
    spec = arch_spec(lm.model)
    for i, block in enumerate(get_blocks(lm.model, spec)):
        with loader.loaded(i, block):
            assert all(torch.equal(t, want[f"{spec.blocks}.{i}.{k}"]) for k, t in block.state_dict().items())


@pytest.mark.parametrize("model_type", list(MAKERS))
def test_a_split_model_reads_as_the_whole_file(tmp_path, cache, model_type):
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole = MAKERS[model_type](tmp_path / "whole" / "m.gguf", blocks=3)
    first = MAKERS[model_type](tmp_path / "split" / "m.gguf", blocks=3, split_max_tensors=7)
    parts = sorted((tmp_path / "split").glob("m-*-of-*.gguf"))
    assert first == parts[0] and len(parts) >= 3
    want = qforge.load(str(whole)).model
    for named in (parts[0], parts[-1]):                               # any part names the model
        got = qforge.load(str(named)).model
        assert got.config.tie_word_embeddings == want.config.tie_word_embeddings
        assert want.state_dict().keys() == got.state_dict().keys()
        assert all(torch.equal(t, got.state_dict()[k]) for k, t in want.state_dict().items())
    lm, loader = load_streamed(str(parts[1]))
    assert loader.files.parts == parts and {loader.files.where[k] for k in loader.files.where} == \
        {p.name for p in parts}
    block = get_blocks(lm.model, arch_spec(lm.model))[2]
    with loader.loaded(2, block):
        assert all(torch.equal(t, want.state_dict()[f"model.layers.2.{k}"]) for k, t in block.state_dict().items())
    parts[1].unlink()
    with pytest.raises(QForgeError, match=r"split in \d+ files; missing: m-00002-of"):
        resolve_model(str(parts[0]))


def test_the_cache_keeps_one_conversion_per_file(tmp_path, cache):
    import os

    gguf = smollm2_blocks(tmp_path / "s.gguf", blocks=2)
    (tmp_path / "other").mkdir()
    other = smollm2_blocks(tmp_path / "other" / "s.gguf", blocks=2)             # another file of the same name
    old = cache_root() / "dense" / "s-0123456789abcdef"                  # a first-version conversion of "s"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    first, kept = resolve_model(str(gguf)), resolve_model(str(other))
    assert not old.exists()
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))            # reinstalled: a new mtime
    again = resolve_model(str(gguf))
    assert again != first and again.is_dir() and not first.exists()
    assert kept.is_dir() and resolve_model(str(other)) == kept            # another file of the same name stays


def test_a_conversion_in_progress_elsewhere_is_waited_for_not_redone(tmp_path, cache, caplog):
    """Two processes naming one GGUF file at once (two runs, parallel test workers): the second waits on the
    first's lock and takes its conversion instead of converting again and renaming over it."""
    import threading

    import filelock

    gguf = smollm2_blocks(tmp_path / "s.gguf", blocks=2)
    d = resolve_model(str(gguf))
    made = (d / "config.json").stat().st_mtime_ns
    d.rename(tmp_path / "elsewhere")                               # "the other process" has not finished yet
    lock = filelock.FileLock(cache_root() / "locks" / f"{d.name}.lock")
    got = []
    with caplog.at_level("INFO", logger="qforge.models.loading"), lock:
        t = threading.Thread(target=lambda: got.append(resolve_model(str(gguf))))
        t.start()
        for _ in range(200):                                       # until the second caller waits on the lock
            if "another process is converting" in caplog.text:
                break
            t.join(0.05)
        assert "another process is converting" in caplog.text and not got
        (tmp_path / "elsewhere").rename(d)                         # the other process's conversion lands
    t.join(60)
    assert got == [d] and (d / "config.json").stat().st_mtime_ns == made    # taken, not converted again


@pytest.mark.parametrize("model_type,cfg", [
    ("llama", QuantizeConfig(method="gptq", bits=3, group_size=64, act_order=True)),
    ("qwen3_moe", QuantizeConfig(method="gptq", bits=4, group_size=32)),
])
def test_a_gguf_file_streams_without_a_dense_copy(tmp_path, cache, monkeypatch, model_type, cfg, wiki_excerpt):
    gguf = MAKERS[model_type](tmp_path / f"{model_type}.gguf")
    m = qforge.load(str(gguf), cfg, stream=True)
    assert not (cache / "qforge").exists(), "streaming wrote a dense copy"
    blocks = get_blocks(m.model, arch_spec(m.model))
    loads = []
    load = BlockLoader.load

    def one_at_a_time(self, i, block):
        assert not any(BlockLoader.materialized(b) for b in blocks), "a block was still in memory"
        loads.append(i)
        load(self, i, block)

    monkeypatch.setattr(BlockLoader, "load", one_at_a_time)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32, resume=tmp_path / "out.partial")
    assert loads == list(range(len(blocks)))
    out = m.save(tmp_path / "streamed")
    m.export(tmp_path / "streamed-gptq", "gptq")
    assert not (cache / "qforge").exists()
    monkeypatch.undo()

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    ref = qforge.load(str(gguf), cfg)                          # converted to the dense cache, then in memory
    ref.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    ref.save(tmp_path / "ref")
    ref.export(tmp_path / "ref-gptq", "gptq")
    for mine, theirs in ((out, tmp_path / "ref"), (tmp_path / "streamed-gptq", tmp_path / "ref-gptq")):
        want, got = saved_tensors(theirs), saved_tensors(mine)
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), mine.name


@pytest.mark.parametrize("model_type", list(MAKERS))
def test_the_name_map_is_transformers(tmp_path, model_type):
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from qforge.models.gguf import gguf_config, skeleton

    gguf = MAKERS[model_type](tmp_path / "m.gguf", blocks=3)
    model = skeleton(gguf_config(gguf))
    tensors = GGUFTensors(gguf, model)
    assert tensors.mapping == get_gguf_hf_weights_map(model, tensors.processor)
    assert set(tensors.where) | {"lm_head.weight"} >= set(model.state_dict())


def test_each_streamed_block_is_transformers_block(tmp_path, cache):
    gguf = random_qwen3_moe(tmp_path / "moe.gguf", blocks=3)
    ref = _transformers_model(gguf)
    lm, loader = load_streamed(str(gguf))
    spec = arch_spec(lm.model)
    for i, (block, want) in enumerate(zip(get_blocks(lm.model, spec), get_blocks(ref, spec))):
        with loader.loaded(i, block):
            have = block.state_dict()
            assert have.keys() == want.state_dict().keys()
            assert all(torch.equal(t, want.state_dict()[k]) for k, t in have.items())
        assert not BlockLoader.materialized(block)
    again = GGUFTensors(gguf, lm.model)
    assert again.fingerprint() == loader.fingerprint()
    other = GGUFTensors(random_qwen3_moe(tmp_path / "other.gguf", blocks=2), lm.model)
    assert other.fingerprint() != loader.fingerprint()


def test_a_gguf_file_is_evaluated_block_by_block(tmp_path, cache):
    gguf = smollm2_blocks(tmp_path / "s.gguf", blocks=3)
    kw = dict(datasets=["wiki", "code"], seqlen=64, max_windows=2)
    streamed = qforge.evaluate(str(gguf), stream=True, **kw)
    assert not (cache / "qforge").exists()
    whole = qforge.evaluate(str(gguf), **kw)
    assert [r["ppl"] for r in streamed] == pytest.approx([r["ppl"] for r in whole], rel=1e-5)


def test_an_expert_width_transformers_does_not_read_is_taken_from_the_file(tmp_path, cache):
    from gguf import GGUFReader

    gguf = random_qwen3_moe(tmp_path / "narrow.gguf", expert_width=32)
    assert _transformers_model(gguf).config.moe_intermediate_size == 768       # transformers alone: the default
    model = qforge.load(str(gguf)).model
    assert model.config.moe_intermediate_size == 32
    raw = {t.name: np.array(t.data) for t in GGUFReader(str(gguf)).tensors}
    experts = model.model.layers[1].mlp.experts
    want = np.concatenate([raw["blk.1.ffn_gate_exps.weight"], raw["blk.1.ffn_up_exps.weight"]], axis=1)
    assert np.array_equal(experts.gate_up_proj.detach().numpy(), want)
    assert np.array_equal(experts.down_proj.detach().numpy(), raw["blk.1.ffn_down_exps.weight"])
    lm, loader = load_streamed(str(gguf))
    assert lm.model.config.moe_intermediate_size == 32
    block = get_blocks(lm.model, arch_spec(lm.model))[1]
    with loader.loaded(1, block):
        assert torch.equal(block.mlp.experts.gate_up_proj, experts.gate_up_proj)


def test_convert_from_the_command_line(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from qforge.cli.main import main

    gguf = random_qwen3_moe(tmp_path / "moe.gguf")
    out = tmp_path / "dense"
    assert main(["-q", "convert", str(gguf), "--out", str(out), "--max-shard-size", "1MB"]) == 0
    assert "safetensors file(s)" in capsys.readouterr().out
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    want = _transformers_model(gguf).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    stored = set(saved_tensors(out))                                   # the keys a hub checkpoint stores: one per expert
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in stored
    assert main(["-q", "convert", str(gguf), "--out", str(out)]) == 2             # exists: refused
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "convert", str(out), "--out", str(tmp_path / "x")]) == 2   # not a GGUF file
    assert "not a .gguf file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    types = qforge.load(str(out), stream=True).source_types                # kept beside the conversion
    assert types["model.layers.1.mlp.experts.gate_up_proj"] == "F32"
    half = tmp_path / "bf16"
    assert main(["-q", "convert", str(gguf), "--out", str(half), "--dtype", "bfloat16"]) == 0
    got = AutoModelForCausalLM.from_pretrained(str(half)).state_dict()
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()) for k in want)


@pytest.mark.parametrize("stream", [False, True])
def test_quantizing_on_the_files_own_grid_is_flagged(tmp_path, cache, caplog, stream):
    gguf = smollm2_blocks(tmp_path / "s.gguf", blocks=2)       # linears Q4_1: 4-bit, groups of 32
    flagged = {}
    for bits, group in [(4, 32), (8, 16), (4, 64), (3, 32), (4, -1)]:
        m = qforge.load(str(gguf), QuantizeConfig(method="rtn", bits=bits, group_size=group), stream=stream)
        assert set(m.source_types.values()) == {"Q8_0", "Q4_1", "F32"}
        caplog.clear()
        m.quantize(resume=tmp_path / f"r{bits}{group}{stream}" if stream else None)
        flagged[bits, group] = [r.getMessage() for r in caplog.records if "artificially small" in r.getMessage()]
        if (bits, group) == (4, 32):
            out = m.save(tmp_path / "flagged")
    assert [k for k, v in flagged.items() if v] == [(4, 32), (8, 16)]
    assert "tensors 14 as Q4_1 (4-bit, groups of 32)" in flagged[4, 32][0]         # 7 linears x 2 blocks
    record = json.loads((out / "run_record.json").read_text())                    # the output says so too
    assert record["source_types"] == {"Q4_1": 14, "F32": 5, "Q8_0": 1}            # + norms, embeddings
    assert record["source_warnings"] == flagged[4, 32]
    from qforge.analysis.report import build_report

    (tmp_path / "report").mkdir()
    page = build_report(out, tmp_path / "report").read_text()
    assert "stored the tensors as Q4_1 x 14, F32 x 5, Q8_0 x 1" in page and "artificially small" in page


def test_bad_gguf_files_are_clear_errors_and_leave_no_cache(tmp_path, cache, monkeypatch, wiki_excerpt):
    # metadata that does not describe the tensors (head width 8, tensors of 16)
    narrow = random_qwen3_moe(tmp_path / "narrow.gguf", metadata={"attention.key_length": 8})
    with pytest.raises(QForgeError, match=r"q_proj.weight is \[64, 64\] in the file but \[32, 64\]"):
        resolve_model(str(narrow))
    with pytest.raises(QForgeError, match="in the file but"):
        qforge.load(str(narrow), QuantizeConfig(method="rtn"), stream=True).quantize(wiki_excerpt, nsamples=2, seqlen=16,
                                                       resume=tmp_path / "r.partial")
    # a NaN weight
    from gguf import GGUFReader

    bad = random_qwen3_moe(tmp_path / "nan.gguf")
    data = next(t for t in GGUFReader(str(bad), "r+").tensors if t.name == "blk.1.attn_q.weight").data
    data[0, 0] = np.nan
    data.flush()
    with pytest.raises(QForgeError, match="NaN"):
        resolve_model(str(bad))
    # a truncated file
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(random_qwen3_moe(tmp_path / "whole.gguf").read_bytes()[:100_000])
    with pytest.raises(QForgeError, match="could not read GGUF"):
        resolve_model(str(cut))
    with pytest.raises(QForgeError, match="could not read GGUF"):
        load_streamed(str(cut))
    # an architecture transformers does not read from GGUF
    from gguf_files import _write

    foreign = _write(tmp_path / "foreign.gguf", "rwkv6", [], [("token_embd.weight", np.ones((4, 4), np.float32), None)])
    with pytest.raises(QForgeError, match="could not read GGUF.*not supported"):
        resolve_model(str(foreign))
    with pytest.raises(QForgeError, match="could not read GGUF.*not supported"):
        load_streamed(str(foreign))
    dense = cache / "qforge" / "dense"
    assert not dense.exists() or not any(dense.iterdir())
