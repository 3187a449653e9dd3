"""Tiny random models of every architecture family in qforge's table, built from configs."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
_NO_IDS = dict(_COMMON, pad_token_id=None, bos_token_id=None, eos_token_id=None)  # defaults past the tiny vocabulary
_MLA = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1, kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1)
# Mamba-2 widths whose in_proj rows (2·128 + 2·d_state + heads = 288) pack in groups of 32
_MAMBA2 = dict(mamba_n_heads=16, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=32)
_GRANITE_H = dict(_COMMON, **_MAMBA2, intermediate_size=32, shared_intermediate_size=96,
                  layer_types=["linear_attention", "attention"], position_embedding_type="rope")
_NEMOTRON_H = dict({k: v for k, v in _COMMON.items() if k != "num_hidden_layers"}, head_dim=16, mamba_num_heads=16,
                   mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=32)     # blocks: layers_block_type's
_NEMOTRON_H_MOE = dict(_NEMOTRON_H, layers_block_type=["linear_attention", "full_attention", "moe"], n_routed_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
                       n_group=1, topk_group=1)
_QWEN3_5 = dict(head_dim=16, layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                linear_value_head_dim=4, linear_num_key_heads=2, linear_num_value_heads=16)
_FALCON = dict(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512)
CONFIGS = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=64),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=16),
    "gemma3_text": dict(_COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
    # Gemma 3's vision-language checkpoints: the text decoder above, a one-layer SigLIP vision tower
    "gemma3": dict(text_config=dict(_COMMON, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                    layer_types=["sliding_attention", "full_attention"]),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8),
                   mm_tokens_per_image=4, image_token_index=VOCAB - 3, boi_token_index=VOCAB - 2,
                   eoi_token_index=VOCAB - 1),
    # Gemma 4, small models' wiring: per-layer inputs; blocks 0/1 sliding/full attention (full: k as v), blocks 2/3
    # reuse their keys and values
    "gemma4_text": dict(_COMMON, num_hidden_layers=4, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                        sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 2,
                        attention_k_eq_v=True, num_kv_shared_layers=2, hidden_size_per_layer_input=32,
                        vocab_size_per_layer_input=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2),
    # Gemma 4's vision-language checkpoints: the text decoder above, with routed experts too (the table entry is
    # another object, whose mappings must all fit), and a one-layer vision tower
    "gemma4": dict(text_config=dict(_COMMON, num_hidden_layers=4, head_dim=16, global_head_dim=32,
                                    num_global_key_value_heads=1, sliding_window=32,
                                    layer_types=["sliding_attention", "full_attention"] * 2, attention_k_eq_v=True,
                                    num_kv_shared_layers=2, hidden_size_per_layer_input=32,
                                    vocab_size_per_layer_input=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                    enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=16, patch_size=8),
                   audio_config=None, image_token_id=VOCAB - 3, boi_token_id=VOCAB - 2, eoi_token_id=VOCAB - 1,
                   video_token_id=VOCAB - 4, boa_token_id=VOCAB - 5, eoa_token_index=VOCAB - 6,
                   audio_token_id=VOCAB - 7),
    # Gemma 4 MoE (26B-A4B's wiring): routed experts beside the dense MLP, no per-layer inputs or shared keys
    "gemma4_text_moe": dict(_COMMON, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=32,
                            layer_types=["sliding_attention", "full_attention"], attention_k_eq_v=True,
                            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
                            moe_intermediate_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=512),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    "granite": dict(_COMMON, num_key_value_heads=4), "helium": dict(_COMMON, head_dim=16), "smollm3": dict(_NO_IDS),
    "ernie4_5": dict(_COMMON, head_dim=16),
    "seed_oss": dict(_COMMON, head_dim=16), "stablelm": dict(_COMMON),
    "olmo": dict(_COMMON), "olmo2": dict(_COMMON), "exaone4": dict(_COMMON, head_dim=16),
    "cohere": dict(_COMMON), "cohere2": dict(_COMMON, head_dim=16, layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(_COMMON, partial_rotary_factor=0.5),
    "gptj": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8),
    "starcoder2": dict(_COMMON),
    "gpt_bigcode": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "bloom": dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
    "nemotron": dict(_COMMON, head_dim=16), "arcee": dict(_COMMON), "apertus": dict(_COMMON, head_dim=16),
    "phi3": dict(_NO_IDS, num_key_value_heads=4),          # as many kv heads as heads: v -> o_proj folds
    "glm": dict(_NO_IDS, head_dim=16), "glm4": dict(_NO_IDS, head_dim=16),
    # MoE: block 0 dense, block 1 routed + shared experts
    "qwen2_moe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, mlp_only_layers=[0]),
    "ernie4_5_moe": dict(_NO_IDS, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1,
                         moe_num_shared_experts=1),
    "glm4_moe": dict(_NO_IDS, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     first_k_dense_replace=1, n_group=1, topk_group=1),
    "deepseek_v3": dict(_NO_IDS, **_MLA, q_lora_rank=32),           # as many kv heads as heads, as DeepSeek's
    "deepseek_v2": dict(_NO_IDS, **_MLA, q_lora_rank=None),  # V2-Lite: one q_proj
    "olmoe": dict(_COMMON, num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    # experts stored [experts, in, out]: Llama 4 (block 0 dense, block 1 routed + shared, inputs scaled by the
    # router), GPT-OSS (interleaved gate/up with biases, attention sinks)
    "llama4_text": dict(_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128,
                        interleave_moe_layer_step=2, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    # a hybrid: block 0 a short convolution, block 1 attention
    "lfm2": dict(_COMMON, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
    # Qwen3-Next: block 0 Gated DeltaNet and a dense MLP, block 1 gated attention, routed + shared experts (16 value
    # heads: in_proj_ba has two rows a head, and packs in groups of 32)
    "qwen3_next": dict(_COMMON, head_dim=16, layer_types=["linear_attention", "full_attention"], mlp_only_layers=[0],
                       linear_key_head_dim=16, linear_value_head_dim=4, linear_num_key_heads=2,
                       linear_num_value_heads=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64),
    # LFM2-MoE: block 0 convolution and a dense feed_forward, block 1 attention and routed experts
    "lfm2_moe": dict(_COMMON, layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32),
    # Granite 4.0-H: block 0 Mamba-2, block 1 attention; routed experts beside a shared MLP, or the shared MLP alone
    "granitemoehybrid": dict(_GRANITE_H, num_local_experts=4, num_experts_per_tok=2),
    "granitemoehybrid_dense": dict(_GRANITE_H, num_local_experts=0),
    "bamba": dict(_COMMON, **_MAMBA2, attn_layer_indices=[1]),       # block 0 Mamba-2, block 1 attention
    # Qwen3.5: block 0 Gated DeltaNet, block 1 gated attention; a dense MLP, or routed + shared experts everywhere
    "qwen3_5_text": dict(_COMMON, **_QWEN3_5),
    "qwen3_5_moe_text": dict(_COMMON, **_QWEN3_5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64),
    "ministral": dict(_COMMON, head_dim=16), "ministral3": dict(_COMMON, head_dim=16),
    "hunyuan_v1_dense": dict(_COMMON, head_dim=16), "olmo3": dict(_COMMON, head_dim=16),
    "vaultgemma": dict(_COMMON, head_dim=16, query_pre_attn_scalar=16),
    "jais2": dict(_COMMON, head_dim=16), "nanochat": dict(_COMMON, head_dim=16, num_key_value_heads=4),
    # MoE: block 0 dense where the family has dense first blocks, block 1 routed (+ shared) experts
    "exaone_moe": dict(_NO_IDS, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       first_k_dense_replace=1, num_shared_experts=1, n_group=1, topk_group=1),
    "solar_open": dict(_NO_IDS, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       n_shared_experts=1, n_group=1, topk_group=1),
    "mimo_v2_flash": dict(_NO_IDS, head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, n_group=1, topk_group=1),
    "hunyuan_v1_moe": dict(_NO_IDS, head_dim=16, num_experts=4, moe_topk=2, moe_intermediate_size=32),
    "minimax_m2": dict(_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64),
    "granite_swa": dict(_NO_IDS, sliding_window=32),
    "granitemoe_swa": dict(_NO_IDS, num_local_experts=4, num_experts_per_tok=2, sliding_window=32),
    "cwm": dict(_COMMON, head_dim=16, sliding_window=32, bos_token_id=1, eos_token_id=2, max_position_embeddings=16384),
    "mellum": dict(_NO_IDS, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   sliding_window=32),
    "youtu": dict(_NO_IDS, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=32,
                  qk_nope_head_dim=16, v_head_dim=16),
    "glm4_moe_lite": dict(_NO_IDS, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=32,
                          qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, n_shared_experts=1, mlp_layer_types=["dense", "sparse"]),
    "hy_v3": dict(_NO_IDS, head_dim=16, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                  moe_intermediate_size=32, mlp_layer_types=["dense", "sparse"]),
    "laguna": dict(_NO_IDS, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=64, mlp_layer_types=["dense", "sparse"], sliding_window=32),
    "dots1": dict(_NO_IDS, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  n_shared_experts=1, first_k_dense_replace=1),
    "afmoe": dict(_NO_IDS, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  num_shared_experts=1, num_dense_layers=1, global_attn_every_n_layers=2, sliding_window=32),
    "flex_olmo": dict(_NO_IDS, num_experts=4, num_experts_per_tok=2),
    # Cohere2-MoE: block 0 a dense MLP, block 1 routed experts (+ a shared expert, RMSNorm; or alone, LayerNorm),
    # each in parallel with attention
    "cohere2_moe": dict(_NO_IDS, head_dim=16, intermediate_size=32, prefix_dense_intermediate_size=96, num_experts=4,
                        num_experts_per_tok=2, num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                        layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-5),
    "cohere2_moe_routed": dict(_NO_IDS, head_dim=16, intermediate_size=32, prefix_dense_intermediate_size=96,
                               num_experts=4, num_experts_per_tok=2, num_shared_experts=0,
                               mlp_layer_types=["dense", "sparse"],
                               layer_types=["sliding_attention", "full_attention"]),
    # Nemotron-H: one mixer per block (Mamba-2, attention, squared-ReLU MLP)
    "nemotron_h": dict(_NEMOTRON_H, layers_block_type=["linear_attention", "full_attention", "mlp"]),
    # Nemotron 3: Mamba-2, attention, MoE (routed experts without a gate, shared experts) blocks; the latent variant
    # runs the experts between fc1/fc2_latent_proj
    "nemotron_h_moe": dict(_NEMOTRON_H_MOE, moe_latent_size=None),
    "nemotron_h_latent": dict(_NEMOTRON_H_MOE, moe_latent_size=32,
                              layers_block_type=["linear_attention", "full_attention", "mlp", "moe"]),
    # Jamba: block 0 Mamba-1 and a dense MLP, block 1 attention and routed experts (x_proj's dt_rank + 2·d_state = 32
    # rows pack)
    "jamba": dict(_COMMON, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=4, num_experts_per_tok=2, mamba_dt_rank=16, mamba_d_state=8, use_mamba_kernels=False),
    # Falcon-H1: Mamba-2 beside attention in every block, µP multipliers that are not 1
    "falcon_h1": dict(_COMMON, head_dim=16, mamba_d_ssm=128, mamba_n_heads=16, mamba_d_state=8, mamba_chunk_size=32,
                      mamba_rms_norm=True, attention_in_multiplier=0.7, ssm_in_multiplier=1.3, key_multiplier=0.8,
                      attention_out_multiplier=0.6, ssm_out_multiplier=1.4, mlp_multipliers=[0.5, 2.0],
                      ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05]),
    "gpt_oss": dict(_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "rope_theta": 150000.0, "original_max_position_embeddings": 16}),
    # Falcon's three block wirings: sequential norms (RW, ALiBi), one norm for parallel attention and MLP
    # (7B: multi-query), two parallel norms (40B/180B: grouped kv heads)
    "falcon": dict(_FALCON, parallel_attn=False, multi_query=False, alibi=True),
    "falcon_parallel": dict(_FALCON, parallel_attn=True, multi_query=True),
    "falcon_two_norms": dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2),
}
# CONFIGS keys that are not model types: another wiring of a family (a VARIANTS entry picks its table entry)
_MODEL_TYPE = {"falcon_parallel": "falcon", "falcon_two_norms": "falcon", "granitemoehybrid_dense": "granitemoehybrid",
               "nemotron_h_moe": "nemotron_h", "nemotron_h_latent": "nemotron_h", "cohere2_moe_routed": "cohere2_moe",
               "gemma4_text_moe": "gemma4_text"}


def tiny_config(key: str, **overrides):
    """CONFIGS[key] with `overrides`; a vision-language model's go to its text decoder's config."""
    base = CONFIGS[key]
    if "text_config" in base:
        base = dict(base, text_config={**base["text_config"], **overrides})
        overrides = {}
    return AutoConfig.for_model(_MODEL_TYPE.get(key, key), **{**base, **overrides})


def table_key(key: str) -> str:
    """The ARCHS entry qforge picks for the tiny model CONFIGS[key]."""
    from qforge.models.families import VARIANTS

    config = tiny_config(key)
    return VARIANTS[config.model_type](config) if config.model_type in VARIANTS else config.model_type


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves norms at 1 and biases at 0; perturb everything so tests see real structure (persistent
    # float buffers too: DeepSeek's router bias)
    with torch.no_grad():
        state = model.state_dict()
        buffers = [b for n, b in model.named_buffers() if n in state and b.is_floating_point()]
        for p in list(model.parameters()) + buffers:
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
