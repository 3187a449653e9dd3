"""Tiny random models of every architecture family in qforge's table, built from configs."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
CONFIGS = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=64),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=16),
    "gemma3_text": dict(_COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=512),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves norms at 1 and biases at 0; perturb everything so tests see real structure
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def saved_tensors(d) -> dict[str, torch.Tensor]:
    """Every dense tensor of the saved model directory `d` (all its safetensors files but qforge's codes)."""
    from safetensors.torch import load_file

    t = {}
    for f in sorted(d.glob("*.safetensors")):
        if not f.name.startswith("qforge_quant"):
            t.update(load_file(str(f)))
    return t
