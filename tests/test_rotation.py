"""Rotated quantization (QuaRot; SpinQuant's R1 and R2 untrained): the Hadamard constructions, the rotation of every
kind of RMSNorm family in the table keeping its function, the refusals, and a rotated model quantized, saved,
exported and loaded again."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import qforge
from qforge.config import QuantizeConfig
from qforge.errors import QForgeError
from qforge.smoothing import rotate
from qforge.smoothing.rotate import rotate_model
from qforge.solvers.hadamard import hadamard, hadamard_core, paley, rotation, rotation_factors, sylvester
from tiny_models import VOCAB, tiny_model


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 60, 148, 576, 896, 3072])
def test_hadamard_matrices_have_orthogonal_rows_of_signs(n):
    H = hadamard(n)
    assert torch.equal(H.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_widths_take_paley_cores_or_are_refused():
    assert hadamard_core(576) == (17, 16)          # SmolLM2: Paley II (17 = 1 mod 4), order 36, times 16
    assert hadamard_core(3072) == (11, 256)        # Paley I (11 = 3 mod 4), order 12, times 256
    assert hadamard_core(4096) == (1, 4096)
    assert hadamard_core(14) is None and hadamard_core(688) is None      # 2 x 7; 16 x 43
    with pytest.raises(QForgeError, match="no Hadamard construction"):
        hadamard(14)
    with pytest.raises(QForgeError, match="odd prime"):
        paley(9)
    with pytest.raises(QForgeError, match="power of two"):
        sylvester(12)
    with pytest.raises(QForgeError, match="rotation must be one of"):
        rotation(64, "spin", 0)
    with pytest.raises(QForgeError, match="rotation must be one of"):
        QuantizeConfig(rotation="spin")


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("n", [64, 576, 688, 7])
def test_rotations_are_orthogonal_and_drawn_from_their_seed(kind, n):
    R = rotation(n, kind, 0)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(rotation(n, kind, 0), R) and not torch.equal(rotation(n, kind, 1), R)
    if kind == "hadamard" and hadamard_core(n) is not None:        # a signed Hadamard matrix: entries ±1/√n
        assert torch.allclose(R.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("n", [12, 576, 688, 7, 2048])
def test_a_factored_rotation_applies_its_dense_matrix(kind, n):
    kr = rotation_factors(n, kind, 4)
    R = kr.dense()
    assert torch.equal(R, rotation(n, kind, 4)) and kr.n == n
    if kind == "hadamard":          # Paley core (12, 576), random core (688 = 43·16, 7), Sylvester in two (2048)
        assert len(kr.factors) == {12: 1, 576: 2, 688: 2, 7: 1, 2048: 2}[n]
    x, W = torch.randn(3, 5, n, dtype=torch.float64), torch.randn(n, 4, 2, dtype=torch.float64)
    assert torch.allclose(kr.right(x), x @ R, atol=1e-12)
    assert torch.allclose(kr.transposed_left(W), (R.T @ W.reshape(n, -1)).reshape(W.shape), atol=1e-12)
    for dtype in (torch.float32, torch.bfloat16):                   # fp32 arithmetic, the input's dtype out
        y = kr.right(x.to(dtype))
        assert y.dtype == dtype and torch.allclose(y.double(), x.to(dtype).double() @ R, rtol=1e-2, atol=1e-2)


def _logits(m, tokens):
    with torch.no_grad():
        return m(input_ids=tokens).logits


# dense, Gemma's (1 + w) norms, MoE (fused experts, shared experts, routers), MLA, hybrids, parallel blocks
@pytest.mark.parametrize("key", ["llama", "qwen3", "gemma", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss",
                                 "llama4_text", "nemotron_h", "lfm2", "cohere2_moe", "falcon_h1"])
def test_rotation_keeps_each_familys_function(key):
    m = tiny_model(key)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    state = {n: p.clone() for n, p in m.state_dict().items()}
    before = _logits(m, tokens)
    record = rotate_model(m, "hadamard", seed=3)
    after = _logits(m, tokens)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    changed = {n for n, p in m.state_dict().items() if n not in state or not torch.equal(p, state[n])}
    assert any("embed" in n for n in changed) and sum(".1." in n for n in changed) >= 3    # every block rotated
    assert record["kind"] == "hadamard" and record["max_logit_change"] <= 1e-4


def test_output_gated_attention_keeps_its_values_unrotated():
    m = tiny_model("qwen3_5_text")                 # o_proj reads the values times a gate from q_proj: R2 is undone
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(m, tokens)
    record = rotate_model(m)
    assert not record["values"] and record["head_dim"] is None
    assert (_logits(m, tokens) - before).abs().max() <= 1e-4 * before.abs().max()


def test_rotation_spreads_an_outlier_channel():
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 5] *= 50                   # one massive residual channel
        m.model.layers[0].mlp.down_proj.weight[5] *= 50

    def peak(w):
        return (w.abs().amax() / w.pow(2).mean().sqrt()).item()
    before = [peak(m.model.embed_tokens.weight), peak(m.model.layers[0].mlp.down_proj.weight)]
    rotate_model(m)
    after = [peak(m.model.embed_tokens.weight), peak(m.model.layers[0].mlp.down_proj.weight)]
    assert all(a < b / 3 for a, b in zip(after, before))


def test_a_tied_head_is_untied_and_the_norms_fold_into_their_readers():
    m = tiny_model("gemma")                                        # tied, and RMSNorm scaling by (1 + w)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    r1_only = copy.deepcopy(m)
    rotate_model(r1_only, "orthogonal", values=False)
    record = rotate_model(m, "orthogonal")
    assert record["untied_head"] and record["values"] and record["head_dim"] == 16
    assert not m.config.tie_word_embeddings
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    norms = [m.model.norm] + [n for b in m.model.layers for n in (b.input_layernorm, b.post_attention_layernorm)]
    assert all(torch.equal(n.weight, torch.zeros_like(n.weight)) for n in norms)
    # R2 rotates v_proj's rows within each head (and o_proj's columns): per head, the same weight norm
    v, v1 = m.model.layers[0].self_attn.v_proj.weight, r1_only.model.layers[0].self_attn.v_proj.weight
    assert not torch.allclose(v, v1, atol=1e-3)
    assert torch.allclose(v.view(-1, 16, 64).norm(dim=(1, 2)), v1.view(-1, 16, 64).norm(dim=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize("key,msg", [("gemma2", "no linear group reads"), ("olmo2", "no norm that the table"),
                                     ("opt", "needs RMSNorm"), ("phi", "needs RMSNorm")])
def test_models_rotation_would_change_are_refused_untouched(key, msg):
    m = tiny_model(key)
    state = {n: p.clone() for n, p in m.state_dict().items()}
    with pytest.raises(QForgeError, match=msg):
        rotate_model(m)
    assert all(torch.equal(p, state[n]) for n, p in m.state_dict().items())


def test_a_rotation_that_would_move_the_outputs_is_refused_untouched(monkeypatch):
    m = tiny_model("llama")
    state = {n: p.clone() for n, p in m.state_dict().items()}
    monkeypatch.setattr(rotate, "_write", lambda ref, R: None)     # as if the table missed the residual writers
    with pytest.raises(QForgeError, match=r"changed its outputs .*\(block 0; nothing was changed\)"):
        rotate_model(m)
    assert all(torch.equal(p, state[n]) for n, p in m.state_dict().items())
    monkeypatch.undo()
    monkeypatch.setattr(rotate.Rotation, "rotate_outside", lambda self, model: None)   # the blocks alone: logits move
    with pytest.raises(QForgeError, match="changed its outputs .* now changed; load it again"):
        rotate_model(m)


@pytest.fixture
def tied_llama_dir(tmp_path, tiny_tokenizer):
    m = tiny_model("llama", tie_word_embeddings=True)
    d = tmp_path / "tied-llama"
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def test_rotated_gptq_saves_exports_and_loads_again(tied_llama_dir, wiki_excerpt, tmp_path):
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, rotation="hadamard", rotation_seed=5)
    m = qforge.load(tied_llama_dir, cfg)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    assert m.result.rotation["untied_head"] and m.result.rotation["hadamard"] == {"paley_prime": 1, "sylvester": 64}
    out = m.save(tmp_path / "out")
    assert json.loads((out / "qforge_config.json").read_text())["rotation"] == "hadamard"
    assert json.loads((out / "run_record.json").read_text())["rotation"]["seed"] == 5
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    m.export(tmp_path / "gptq", "gptq", dtype=torch.float32)
    saved, packed = qforge.load(out), qforge.load(tmp_path / "gptq")
    assert torch.equal(saved.model.lm_head.weight, m.model.lm_head.weight)
    ppl = [qforge.evaluate(x, "wiki", seqlen=64, max_windows=2)[0]["ppl"] for x in (m, saved, packed)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5) and ppl[2] == pytest.approx(ppl[0], rel=1e-4)
    plain = qforge.load(tied_llama_dir, QuantizeConfig(method="gptq", bits=4, group_size=32))
    plain.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    assert not torch.equal(plain.model.model.layers[0].mlp.down_proj.weight,
                           m.model.model.layers[0].mlp.down_proj.weight)


def test_rotation_from_the_command_line(tied_llama_dir, tmp_path, capsys):
    from qforge.cli.main import main

    out = tmp_path / "q"
    assert main(["-q", "quantize", str(tied_llama_dir), "--method", "rtn", "--rotate", "orthogonal",
                 "--rotation-seed", "2", "--out", str(out)]) == 0
    assert "sym, rotated (orthogonal) in" in capsys.readouterr().out
    saved = json.loads((out / "qforge_config.json").read_text())
    assert saved["rotation"] == "orthogonal" and saved["rotation_seed"] == 2


def test_simulated_quantization_of_a_rotated_model(tiny_llama_dir, capsys):
    from qforge.cli.main import main
    from qforge.config import SimulationConfig

    def ppl(**sim):
        return qforge.evaluate(str(tiny_llama_dir), "wiki", seqlen=64, max_windows=2,
                               simulate=SimulationConfig(**sim))[0]["ppl"]
    fp = ppl()
    assert ppl(rotation="hadamard") == pytest.approx(fp, rel=1e-4)          # the rotation alone changes nothing
    w4a4 = dict(weight_bits=4, act_bits=4)
    assert ppl(**w4a4, rotation="hadamard") != pytest.approx(ppl(**w4a4), rel=1e-3)
    assert SimulationConfig(**w4a4, rotation="orthogonal").label == "W4A4 rotated (orthogonal)"
    assert main(["-q", "eval", str(tiny_llama_dir), "--dataset", "wiki", "--eval-seqlen", "32", "--max-windows", "1",
                 "--w-bits", "4", "--act-bits", "4", "--rotate", "hadamard"]) == 0
    assert "simulated W4A4 rotated (hadamard)" in capsys.readouterr().out
    m = qforge.load(tiny_llama_dir, QuantizeConfig(method="rtn"))
    m.quantize(None)
    with pytest.raises(QForgeError, match="already quantized: rotation"):
        qforge.evaluate(m, "wiki", seqlen=64, max_windows=1, simulate=SimulationConfig(rotation="hadamard"))


def test_awq_scales_are_reused_only_on_the_same_rotation(tiny_llama_dir, wiki_excerpt, tmp_path):
    from qforge.mixed.measure import settings_mismatch, solver_settings

    rotated = QuantizeConfig(method="awq", bits=4, group_size=32, rotation="hadamard", rotation_seed=1)
    m = qforge.load(tiny_llama_dir, rotated)
    m.quantize(wiki_excerpt, nsamples=4, seqlen=32)
    out = m.save(tmp_path / "awq")
    again = qforge.load(tiny_llama_dir, QuantizeConfig(**{**rotated.to_dict(), "awq_from": str(out)}))
    again.quantize(None)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(again.result.layers[name].codes, m.result.layers[name].codes)
    for other in (dict(rotation=None), dict(rotation_seed=2)):
        cfg = QuantizeConfig(**{**rotated.to_dict(), **other, "awq_from": str(out)})
        with pytest.raises(QForgeError, match="searched on the model rotated as"):
            qforge.load(tiny_llama_dir, cfg).quantize(None)
    gptq = QuantizeConfig(method="gptq", rotation="hadamard")
    assert settings_mismatch(solver_settings(gptq), QuantizeConfig(method="gptq")) == ["rotation"]


@pytest.mark.parametrize("model_type,tied,cfg,first_of_each", [
    ("llama", True, QuantizeConfig(method="gptq", bits=4, group_size=32, rotation="hadamard", rotation_seed=2), [0]),
    ("qwen3_moe", False, QuantizeConfig(method="awq+gptq", bits=4, group_size=16, awq_grid=4, rotation="hadamard"),
     [0]),
    # gated attention: R2 dropped by the streamed check as by the in-memory one; a linear-attention block before
    ("qwen3_next", False, QuantizeConfig(method="rtn", bits=4, group_size=32, rotation="orthogonal"), [0, 1]),
    # MLA; a dense block, then MoE ones
    ("deepseek_v3", False, QuantizeConfig(method="gptq", bits=4, group_size=16, rotation="hadamard"), [0, 1]),
])
def test_a_streamed_rotation_writes_what_an_in_memory_one_does(tmp_path, tiny_tokenizer, wiki_calibration,
                                                               monkeypatch, model_type, tied, cfg, first_of_each):
    from qforge.models.arch import arch_spec, get_blocks
    from qforge.models.streaming import BlockLoader
    from tiny_models import saved_tensors

    src = tmp_path / model_type
    tiny_model(model_type, seed=3, tie_word_embeddings=tied).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    ref = qforge.load(str(src), cfg)
    ref.quantize(wiki_calibration)
    ref.save(tmp_path / "ref")

    m = qforge.load(str(src), cfg, stream=True)
    blocks = get_blocks(m.model, arch_spec(m.model))
    loads, load = [], BlockLoader.load
    monkeypatch.setattr(BlockLoader, "load", lambda self, i, block: (loads.append(i), load(self, i, block)))
    m.quantize(wiki_calibration, resume=tmp_path / "state")
    checked = loads[:len(loads) - len(blocks)]         # the check reads the first block of each structure only
    assert loads[len(checked):] == list(range(len(blocks))) and checked == first_of_each
    assert m.result.rotation == {**ref.result.rotation, "max_logit_change": m.result.rotation["max_logit_change"]}
    assert m.result.rotation["max_logit_change"] < 1e-4
    early = m.export(tmp_path / "gptq-early", "gptq")     # fp16, from the run state: the outside weights rotated
    out = m.save(tmp_path / "out")                        # as they are read (in fp32, then cast)
    want, got = saved_tensors(tmp_path / "ref"), saved_tensors(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    packed_ref, packed = ref.export(tmp_path / "ref-gptq", "gptq"), m.export(tmp_path / "gptq", "gptq")
    assert packed == packed_ref == early
    want = saved_tensors(tmp_path / "ref-gptq")
    for d in ("gptq", "gptq-early"):
        got = saved_tensors(tmp_path / d)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), d
    streamed = qforge.evaluate(str(out), "wiki", seqlen=32, max_windows=2, stream=True)[0]["ppl"]
    assert streamed == pytest.approx(qforge.evaluate(ref, "wiki", seqlen=32, max_windows=2)[0]["ppl"], rel=1e-5)


def test_a_streamed_rotation_that_would_move_the_outputs_changes_nothing(tied_llama_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(rotate, "_write", lambda ref, R: None)     # as if the table missed the residual writers
    m = qforge.load(tied_llama_dir, QuantizeConfig(method="rtn", rotation="hadamard"), stream=True)
    with pytest.raises(QForgeError, match=r"changed its outputs .*\(block 0; nothing was changed\)"):
        m.quantize(None, resume=tmp_path / "state")
    assert m.blocks.rotation is None and m.model.config.tie_word_embeddings
