import pytest
import torch
from torch import nn

from qforge import QForgeError, QuantizeConfig
from qforge.capture import capture_block_inputs, run_block
from qforge.capture.blocks import make_batches
from qforge.models.arch import (ARCHS, ArchSpec, SmoothMapping, arch_spec, block_linears, get_blocks, linear_ref,
                                 untracked_linears)
from qforge.pipeline import quantize_model
from tiny_models import CONFIGS, VOCAB, table_key, tiny_model

ALL = sorted(CONFIGS)


def test_every_table_entry_has_a_tiny_model():
    assert {table_key(k) for k in CONFIGS} == set(ARCHS)
    assert all(table_key(k) == k for k in CONFIGS if k in ARCHS)
    assert table_key("falcon_parallel") == "falcon_parallel" and table_key("falcon_two_norms") == "falcon"


@pytest.mark.parametrize("model_type", ALL)
def test_table_covers_every_linear_of_the_block(model_type):
    m = tiny_model(model_type)
    spec = arch_spec(m)
    for block in get_blocks(m, spec):
        groups = block_linears(block, spec)
        assert all(groups) and untracked_linears(block, spec) == []
        for ref in (r for g in groups for r in g):
            assert ref.weight.dim() == 2


@pytest.mark.parametrize("model_type", ALL)
def test_captured_block_inputs_replay_the_model(model_type):
    """Running the blocks one by one on captured inputs reproduces the model's own hidden states (text tokens: a
    vision-language model swaps its image/audio placeholders, the last ids here, for pad before its text decoder,
    which the capture runs directly)."""
    m = tiny_model(model_type)
    spec = arch_spec(m)
    ids = torch.randint(0, VOCAB - 8, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture_block_inputs(m, spec, make_batches(list(ids), batch_size=2))
    hidden = inputs.hidden
    torch.testing.assert_close(torch.cat(hidden), ref[0])
    blocks = get_blocks(m, spec)
    for i, block in enumerate(blocks[:-1]):  # the last entry of hidden_states is after the final norm
        hidden = run_block(block, hidden, inputs.for_block(i))
        torch.testing.assert_close(torch.cat(hidden), ref[i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ALL)
def test_rtn_quantizes_every_linear_onto_its_grid(model_type):
    m = tiny_model(model_type)
    cfg = QuantizeConfig(bits=4, group_size=32)
    result = quantize_model(m, cfg, show_progress=False)
    spec = arch_spec(m)
    n_linears = sum(len(g) for b in get_blocks(m, spec) for g in block_linears(b, spec))
    assert len(result.layers) == n_linears
    for name, q in result.layers.items():
        assert torch.equal(linear_ref(m, name).weight, q.dequantize())
    with torch.no_grad():
        out = m(input_ids=torch.randint(0, VOCAB, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_lm_head_and_embeddings_stay_unquantized(tiny_llama):
    emb = tiny_llama.get_input_embeddings().weight.clone()
    head = tiny_llama.lm_head.weight.clone()
    quantize_model(tiny_llama, QuantizeConfig(bits=2, group_size=16), show_progress=False)
    assert torch.equal(emb, tiny_llama.get_input_embeddings().weight)
    assert torch.equal(head, tiny_llama.lm_head.weight)


def test_skip_patterns_leave_modules_alone(tiny_llama):
    w = tiny_llama.model.layers[1].mlp.down_proj.weight.clone()
    res = quantize_model(tiny_llama, QuantizeConfig(skip=("*.1.mlp.down_proj",)), show_progress=False)
    assert "model.layers.1.mlp.down_proj" not in res.layers
    assert torch.equal(w, tiny_llama.model.layers[1].mlp.down_proj.weight)


def test_unknown_architecture_names_what_to_add():
    class Weird(nn.Module):
        class config:  # noqa: N801
            model_type = "weirdformer"

    with pytest.raises(QForgeError, match=r"weirdformer.*qforge/models/families.py"):
        arch_spec(Weird())


def test_a_table_entry_naming_unknown_linears_is_refused():
    with pytest.raises(QForgeError, match="mlp.missing"):
        ArchSpec(blocks="model.layers", groups=(("self_attn.q_proj",),), optional=frozenset({"mlp.missing"}))
    with pytest.raises(QForgeError, match="mlp.down_proj"):
        ArchSpec(blocks="model.layers", groups=(("mlp.up_proj",),),
                 smooth=(SmoothMapping("mlp.up_proj", ("mlp.down_proj",)),))


def test_blocks_of_two_kinds_each_get_their_own_linears():
    """DeepSeek V3's first block is dense, the next MoE with shared experts: each resolves the table's optional
    names it holds; a required name a block lacks is still an error."""
    m = tiny_model("deepseek_v3")
    spec = arch_spec(m)
    dense, moe = (block_linears(b, spec) for b in get_blocks(m, spec))
    names = [{r.name for g in groups for r in g} for groups in (dense, moe)]
    assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= names[0] and not any("expert" in n for n in names[0])
    assert "mlp.gate_proj" not in names[1] and {"mlp.shared_experts.down_proj", "mlp.experts.down_proj.3"} <= names[1]
    assert len(dense) < len(moe)                                     # the empty expert groups dropped
    del get_blocks(m, spec)[1].self_attn.kv_b_proj
    with pytest.raises(QForgeError, match="kv_b_proj"):
        block_linears(get_blocks(m, spec)[1], spec)
