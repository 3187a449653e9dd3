"""The architecture table: one ArchSpec per Hugging Face `model_type`. Adding a model family is adding an entry
(and, for a family whose block wiring its config changes, a VARIANTS function that picks among its entries).

Block paths and linear names are transformers 5's module names; `tests/tiny_models.py` builds a tiny random
model of every entry, and the tests run each through capture, RTN, GPTQ, AWQ and export.
"""
from __future__ import annotations

from dataclasses import replace

from .archspec import ArchSpec, ExpertLayout, SmoothMapping

_VLM_BLOCKS = "model.language_model.layers"    # a vision-language model's text decoder blocks (transformers 5)

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# the mappings most families share
_NORM_QKV = SmoothMapping("input_layernorm", _ATTN)
_V_O = SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",))
_UP_DOWN = SmoothMapping("mlp.up_proj", ("mlp.down_proj",))
_EXPERTS_UP_DOWN = SmoothMapping("mlp.experts.gate_up_proj", ("mlp.experts.down_proj",), prev_rows="up_half")

_LLAMA = ArchSpec(
    blocks="model.layers",
    groups=(_ATTN, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)),
    smooth=(_NORM_QKV, _V_O, SmoothMapping("post_attention_layernorm", _GATE_UP), _UP_DOWN),
)
# Gemma 2/3 put extra norms around attention and MLP: the norm that feeds the MLP is pre_feedforward_layernorm
_GEMMA2 = ArchSpec(blocks=_LLAMA.blocks, groups=_LLAMA.groups, norm_plus_one=True,
                   smooth=(_NORM_QKV, _V_O, SmoothMapping("pre_feedforward_layernorm", _GATE_UP), _UP_DOWN))

# Gemma 4: Gemma 2's four norms (scaling by w); a scale-free RMSNorm on v, which undoes any v -> o scale; full
# attention layers of the larger models use k as v (no v_proj) and the small ones' last layers reuse an earlier
# layer's keys and values (no k_proj/v_proj); the MoE models run routed experts beside the dense MLP on their own
# norm (the router normalizes its own input, an nn.Linear kept unquantized); the small ones add a per-layer input
# (gate -> act · per-layer embedding -> projection) after the MLP
_GEMMA4 = ArchSpec(
    blocks="model.layers", fp_linears=("router.proj",), carried="shared_kv_states",
    groups=(_ATTN, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",), ("experts.gate_up_proj",),
            ("experts.down_proj",), ("per_layer_input_gate",), ("per_layer_projection",)),
    optional=frozenset({"self_attn.k_proj", "self_attn.v_proj", "experts.gate_up_proj", "experts.down_proj",
                        "per_layer_input_gate", "per_layer_projection"}),
    smooth=(_NORM_QKV, SmoothMapping("input_layernorm", _ATTN[:2], absent=_ATTN[2:]),
            SmoothMapping("input_layernorm", _ATTN[:1], absent=_ATTN[1:]),
            SmoothMapping("pre_feedforward_layernorm", _GATE_UP), _UP_DOWN,
            SmoothMapping("pre_feedforward_layernorm_2", ("experts.gate_up_proj",)),
            SmoothMapping("experts.gate_up_proj", ("experts.down_proj",), prev_rows="up_half")),
)

# transformers 5 MoE blocks: experts fused into [experts, 2·I, in] gate/up and [experts, out, I] down parameters,
# the router `mlp.gate` reads the same input as the experts
_MOE = ArchSpec(
    blocks="model.layers",
    groups=(_ATTN, ("self_attn.o_proj",), ("mlp.experts.gate_up_proj",), ("mlp.experts.down_proj",)),
    smooth=(_NORM_QKV, _V_O, SmoothMapping("post_attention_layernorm", ("mlp.experts.gate_up_proj",),
                                           balance=("mlp.gate",)), _EXPERTS_UP_DOWN),
)

# OLMo, OLMo 2, EXAONE 4: the block input reaches attention and MLP without a (weighted) norm
_NO_PRE_NORM = ArchSpec(blocks=_LLAMA.blocks, groups=_LLAMA.groups, smooth=(_V_O, _UP_DOWN))

# Cohere: attention and MLP run in parallel on one normed input, so q/k/v/gate/up read one tensor
_PARALLEL_LLAMA = ArchSpec(
    blocks="model.layers",
    groups=(_ATTN + _GATE_UP, ("self_attn.o_proj",), ("mlp.down_proj",)),
    smooth=(SmoothMapping("input_layernorm", _ATTN + _GATE_UP), _V_O, _UP_DOWN),
)


def _up_down(norm_plus_one: bool = False, attention_norm: str = "input_layernorm",
             mlp_norm: str = "post_attention_layernorm") -> ArchSpec:
    return ArchSpec(
        blocks="model.layers", norm_plus_one=norm_plus_one,
        groups=(_ATTN, ("self_attn.o_proj",), ("mlp.up_proj",), ("mlp.down_proj",)),
        smooth=(SmoothMapping(attention_norm, _ATTN), _V_O, SmoothMapping(mlp_norm, ("mlp.up_proj",))),
    )


# GLM: q/k/v apart, gate|up fused in one linear [2·I, in] (gate rows first)
_FUSED_GATE_UP = ArchSpec(
    blocks="model.layers",
    groups=(_ATTN, ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    smooth=(_NORM_QKV, _V_O, SmoothMapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
            SmoothMapping("mlp.gate_up_proj", ("mlp.down_proj",), prev_rows="up_half")),
)
# Phi-3: q|k|v fused too (rows q, then k, then v: v -> o_proj folds only with as many kv heads as heads)
_FUSED = ArchSpec(
    blocks="model.layers",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    smooth=(SmoothMapping("input_layernorm", ("self_attn.qkv_proj",)),
            SmoothMapping("self_attn.qkv_proj", ("self_attn.o_proj",), prev_rows="v_third"))
    + _FUSED_GATE_UP.smooth[2:],
)

# DeepSeek's multi-head latent attention: q (low-rank q_a -> norm -> q_b, or one q_proj) and the compressed
# kv (kv_a -> norm -> kv_b) both read the block's normed input
_MLA = (("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
        ("self_attn.kv_b_proj",), ("self_attn.o_proj",))
_MLA_SMOOTH = (
    SmoothMapping("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
    SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
    SmoothMapping("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
    SmoothMapping("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
)


def _shared_moe(shared: str | None, shared_first: bool = False, shared_gate: str | None = None,
                attention: tuple = (_ATTN, ("self_attn.o_proj",)), ffn: str = "mlp", router: str = "gate",
                linear_router: bool = False, experts: ExpertLayout = ExpertLayout(),
                linear_attention: tuple = (), linear_attention_fp: tuple = (), norm_plus_one: bool = False,
                dense_blocks: bool = True, mlp_norm: str = "post_attention_layernorm") -> ArchSpec:
    """Routed experts (fused) beside always-on shared experts (an MLP at `<ffn>.<shared>`, gated by `shared_gate`
    on Qwen2-MoE; None: no shared experts), the router `<ffn>.<router>` (an nn.Linear, kept unquantized, when
    `linear_router`); with `dense_blocks` blocks may be dense Llama MLPs at `<ffn>` instead (DeepSeek's
    first_k_dense_replace, Qwen2-MoE's mlp_only_layers, Llama 4's interleaved blocks). `shared_first`: the shared
    experts run before the routed ones. `linear_attention`: a hybrid's other token mixer (its input linears, then
    its output linear), run by the blocks without attention, and `linear_attention_fp` its input linears left
    unquantized (balanced by the norm's fold); `norm_plus_one`: the block norms scale by (1 + w); `mlp_norm`: the
    norm the MLP reads. Attention's first group reads input_layernorm (and its v_proj folds into o_proj)."""
    sh = ((f"{ffn}.{shared}.gate_proj", f"{ffn}.{shared}.up_proj"), (f"{ffn}.{shared}.down_proj",)) if shared else ()
    routed = (f"{ffn}.experts.gate_up_proj",), (f"{ffn}.experts.down_proj",)
    dense = ((f"{ffn}.gate_proj", f"{ffn}.up_proj"), (f"{ffn}.down_proj",)) if dense_blocks else ()
    mla = attention is _MLA
    mixers = attention + linear_attention
    return ArchSpec(
        blocks="model.layers", experts=experts, norm_plus_one=norm_plus_one,
        groups=mixers + dense + (sh + routed if shared_first else routed + sh),
        optional=frozenset(n for g in dense + sh + routed + (mixers if linear_attention else ()) for n in g) | (
            frozenset({"self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj"}) if mla else frozenset()),
        fp_linears=((shared_gate,) if shared_gate else ()) + ((f"{ffn}.{router}",) if linear_router else ())
        + linear_attention_fp,
        smooth=(_MLA_SMOOTH if mla else (SmoothMapping("input_layernorm", attention[0]), _V_O)) + (
            (SmoothMapping("input_layernorm", linear_attention[0], balance=linear_attention_fp),)
            if linear_attention else ()) + (
            (SmoothMapping(mlp_norm, dense[0]), SmoothMapping(dense[0][1], dense[1]))
            if dense else ()) + (
            SmoothMapping(mlp_norm, routed[0] + (sh[0] if sh else ()),
                          balance=(f"{ffn}.{router}",) + ((shared_gate,) if shared_gate else ())),
            SmoothMapping(routed[0][0], routed[1], prev_rows="up_half"),
        ) + ((SmoothMapping(sh[0][1], sh[1]),) if sh else ()),
    )


_DEEPSEEK = _shared_moe("shared_experts", shared_first=False, attention=_MLA)


# Cohere2-MoE: attention and the MLP run in parallel on one normed input, as Cohere's; the MLP is dense (its first
# blocks) or routed experts, with shared experts beside them or without (an entry each: a mapping must name every
# linear that reads its norm)
def _parallel_moe(shared: bool) -> ArchSpec:
    sh = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj") if shared else ()
    moe_in = ("mlp.experts.gate_up_proj",) + sh
    return ArchSpec(
        blocks="model.layers", optional=frozenset(_GATE_UP + ("mlp.down_proj",) + moe_in + ("mlp.experts.down_proj",)
                                                  + (("mlp.shared_experts.down_proj",) if shared else ())),
        # the routed experts' inputs (each expert's tokens) are collected after attention is finished, so that pass
        # replays attention instead of running it on every batch; they read the same tensor either way
        groups=(_ATTN + _GATE_UP + sh, ("self_attn.o_proj",), ("mlp.experts.gate_up_proj",),
                ("mlp.down_proj", "mlp.experts.down_proj") + (("mlp.shared_experts.down_proj",) if shared else ())),
        smooth=(SmoothMapping("input_layernorm", _ATTN + _GATE_UP), _V_O, _UP_DOWN,
                SmoothMapping("input_layernorm", _ATTN + moe_in, balance=("mlp.gate",)), _EXPERTS_UP_DOWN)
        + ((SmoothMapping("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",)),) if shared else ()))


# Qwen3-Next, a hybrid: gated attention blocks (q_proj holds the query and its output gate) or Gated DeltaNet
# blocks (linear attention: in_proj_qkvz and in_proj_ba read the normed input; out_proj reads a gated RMSNorm whose
# weight, one per head dimension, is shared by every head, so no per-channel fold into out_proj); Qwen2-MoE's MLPs;
# its RMSNorms scale by (1 + w), as Gemma's
_QWEN3_NEXT = _shared_moe("shared_expert", shared_first=True, shared_gate="mlp.shared_expert_gate", norm_plus_one=True,
                          linear_attention=(("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),
                                            ("linear_attn.out_proj",)))
# Qwen3.5: Qwen3-Next's hybrid (Gated DeltaNet blocks, whose q/k/v and z projections are two linears here, and gated
# attention), (1 + w) norms; a dense MLP in every block, or Qwen2-MoE experts in every block (the MoE models). The
# DeltaNet's b and a projections (a row per value head: the recurrence's write strength and decay, ~0.01% of the
# weights, often not a multiple of 32 rows) stay unquantized
_QWEN3_5_LINEAR = (("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), ("linear_attn.out_proj",))
_QWEN3_5_FP = ("linear_attn.in_proj_b", "linear_attn.in_proj_a")
_QWEN3_5 = ArchSpec(
    blocks="model.layers", norm_plus_one=True, fp_linears=_QWEN3_5_FP,
    groups=(_ATTN, ("self_attn.o_proj",)) + _QWEN3_5_LINEAR + _LLAMA.groups[2:],
    optional=frozenset(n for g in (_ATTN, ("self_attn.o_proj",)) + _QWEN3_5_LINEAR for n in g),
    smooth=(_NORM_QKV, _V_O, SmoothMapping("input_layernorm", _QWEN3_5_LINEAR[0], balance=_QWEN3_5_FP))
    + _LLAMA.smooth[2:])
_QWEN3_5_MOE = _shared_moe("shared_expert", shared_first=True, shared_gate="mlp.shared_expert_gate",
                           norm_plus_one=True, linear_attention=_QWEN3_5_LINEAR, linear_attention_fp=_QWEN3_5_FP,
                           dense_blocks=False)
# Llama 4: experts stored [experts, in, out], fed every token scaled by its router score; MoE blocks interleave
# with dense ones; the router is an nn.Linear
_LLAMA4 = _shared_moe("shared_expert", shared_first=False, ffn="feed_forward", router="router", linear_router=True,
                      experts=ExpertLayout(stored="in_out", routing="scaled"))
# GPT-OSS: experts stored [experts, in, out] with biases, gate/up interleaved, a clamped SwiGLU (up + 1)·glu that
# no up -> down fold keeps; the router `mlp.router` (weight and bias, not an nn.Linear) reads the experts' input
_GPT_OSS = ArchSpec(blocks="model.layers", groups=_MOE.groups,
                    experts=ExpertLayout(stored="in_out", gate_up="interleaved", glu="module"),
                    smooth=(_NORM_QKV, _V_O, SmoothMapping("post_attention_layernorm", ("mlp.experts.gate_up_proj",),
                                                           balance=("mlp.router",))))

# Falcon: a fused q|k|v (multi-query or per-kv-group layout: no v -> dense fold), a GELU MLP. The linears run
# attention first in every variant, so one group order serves all. Blocks with two norms (Falcon-RW's sequential
# input/post-attention norms, or the ln_attn/ln_mlp of 40B/180B) take the mappings whose norm they hold;
# blocks whose attention and MLP share one norm (7B, 11B) need the fold to scale q|k|v and the MLP together.
_FALCON_GROUPS = (("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                  ("mlp.dense_4h_to_h",))
_FALCON_QKV, _FALCON_UP = _FALCON_GROUPS[0][0], _FALCON_GROUPS[2][0]


# LFM2, a hybrid: each block runs either attention (q/k/v with per-head q/k norms -> out_proj) or a gated short
# convolution (conv.in_proj [3·hidden] split into B, C, x; y = C·conv(B·x), depthwise; out_proj), then a SwiGLU
# feed_forward (w1 gate, w3 up, w2 down). No in_proj -> out_proj fold: out_proj reads C's rows (the middle third)
# times a convolution, which PREV_ROWS (the last of equal parts) does not name. LFM2-MoE: the first
# num_dense_layers blocks keep that feed_forward, the others route to fused experts (router feed_forward.gate)
_LFM2_MIXERS = (_ATTN, ("self_attn.out_proj",), ("conv.in_proj",), ("conv.out_proj",))
_LFM2_FFN = (("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",))
_LFM2_EXPERTS = (("feed_forward.experts.gate_up_proj",), ("feed_forward.experts.down_proj",))


def _lfm2(moe: bool) -> ArchSpec:
    (gate_up,), (down,) = _LFM2_EXPERTS
    return ArchSpec(
        blocks="model.layers",
        groups=_LFM2_MIXERS + _LFM2_FFN + (_LFM2_EXPERTS if moe else ()),
        optional=frozenset(n for g in _LFM2_MIXERS + ((_LFM2_FFN + _LFM2_EXPERTS) if moe else ()) for n in g),
        smooth=(SmoothMapping("operator_norm", _ATTN), SmoothMapping("self_attn.v_proj", ("self_attn.out_proj",)),
                SmoothMapping("operator_norm", ("conv.in_proj",)), SmoothMapping("ffn_norm", _LFM2_FFN[0]),
                SmoothMapping("feed_forward.w3", _LFM2_FFN[1])) + (
            (SmoothMapping("ffn_norm", (gate_up,), balance=("feed_forward.gate",)),
             SmoothMapping(gate_up, (down,), prev_rows="up_half")) if moe else ()),
    )


# Granite 4.0-H, a hybrid: Mamba-2 blocks (in_proj -> convolution and SSM -> gated RMSNorm `mamba.norm` ->
# out_proj) or attention blocks; then routed experts (block_sparse_moe; a model without experts has none) and an
# always-on shared_mlp (input_linear gate|up halves -> output_linear), all reading post_attention_layernorm's output
_GRANITE_H_MIXERS = (_ATTN, ("self_attn.o_proj",), ("mamba.in_proj",), ("mamba.out_proj",))
_GRANITE_H_SHARED = (("shared_mlp.input_linear",), ("shared_mlp.output_linear",))
_GRANITE_H_MOE = (("block_sparse_moe.experts.gate_up_proj",), ("block_sparse_moe.experts.down_proj",))


_MAMBA2_SMOOTH = (_NORM_QKV, _V_O, SmoothMapping("input_layernorm", ("mamba.in_proj",)),
                  SmoothMapping("mamba.norm", ("mamba.out_proj",)))
# Bamba: Granite 4.0-H's mixers (Mamba-2 or attention), a Llama MLP at feed_forward behind pre_ff_layernorm; its
# blocks return (hidden, attention weights)
_BAMBA_FFN = (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",))
_BAMBA = ArchSpec(blocks="model.layers", groups=_GRANITE_H_MIXERS + _BAMBA_FFN, tuple_blocks=True,
                  optional=frozenset(n for g in _GRANITE_H_MIXERS for n in g),
                  smooth=_MAMBA2_SMOOTH + (SmoothMapping("pre_ff_layernorm", _BAMBA_FFN[0]),
                                           SmoothMapping("feed_forward.up_proj", _BAMBA_FFN[1])))


def _granite_ffn(experts: bool, shared: bool = True) -> tuple[SmoothMapping, ...]:
    """Granite's feed-forward folds: routed experts (if any) and the shared MLP (if any) read
    post_attention_layernorm."""
    (gate_up,), (down,) = _GRANITE_H_MOE
    (shared_in,), (shared_out,) = _GRANITE_H_SHARED
    norm = SmoothMapping("post_attention_layernorm", ((gate_up,) if experts else ()) + ((shared_in,) if shared else ()),
                         balance=("block_sparse_moe.router",) if experts else ())
    return ((norm,) + ((SmoothMapping(gate_up, (down,), prev_rows="up_half"),) if experts else ())
            + ((SmoothMapping(shared_in, (shared_out,), prev_rows="up_half"),) if shared else ()))


def _granite_hybrid(experts: bool) -> ArchSpec:
    return ArchSpec(
        blocks="model.layers", groups=_GRANITE_H_MIXERS + (_GRANITE_H_MOE if experts else ()) + _GRANITE_H_SHARED,
        optional=frozenset(n for g in _GRANITE_H_MIXERS for n in g), smooth=_MAMBA2_SMOOTH + _granite_ffn(experts))


# Nemotron-H, a hybrid with one mixer per block behind one norm: Mamba-2 (in_proj -> gated RMSNorm `mixer.norm` ->
# out_proj), attention, a squared-ReLU MLP (up -> down), or MoE (Nemotron 3): routed experts without a gate
# (fused up_proj / down_proj) beside shared_experts, router `mixer.gate`; with moe_latent_size the experts work
# in a smaller width between fc1_latent_proj and fc2_latent_proj (absent: Identity). relu² is not scale-equivariant:
# no up -> down fold
_NEMOTRON_H_MIXERS = (("mixer.q_proj", "mixer.k_proj", "mixer.v_proj"), ("mixer.o_proj",), ("mixer.in_proj",),
                      ("mixer.out_proj",), ("mixer.up_proj",), ("mixer.down_proj",))
_NEMOTRON_H_MOE = (("mixer.fc1_latent_proj", "mixer.shared_experts.up_proj"), ("mixer.experts.up_proj",),
                   ("mixer.experts.down_proj",), ("mixer.fc2_latent_proj",), ("mixer.shared_experts.down_proj",))


def _nemotron_h(latent: bool) -> ArchSpec:
    groups = _NEMOTRON_H_MIXERS + _NEMOTRON_H_MOE
    experts_in = "mixer.fc1_latent_proj" if latent else "mixer.experts.up_proj"     # what reads the norm's output
    return ArchSpec(
        blocks="model.layers", groups=groups, experts=ExpertLayout(gate_up="none"),
        optional=frozenset(n for g in groups for n in g),
        smooth=(SmoothMapping("norm", groups[0]), SmoothMapping("mixer.v_proj", ("mixer.o_proj",)),
                SmoothMapping("norm", ("mixer.in_proj",)), SmoothMapping("mixer.norm", ("mixer.out_proj",)),
                SmoothMapping("norm", ("mixer.up_proj",)),
                SmoothMapping("norm", (experts_in, "mixer.shared_experts.up_proj"), balance=("mixer.gate",)))
        + ((SmoothMapping("mixer.fc1_latent_proj", ("mixer.experts.up_proj",)),) if latent else ()),
    )


# Falcon-H1, a parallel hybrid: Mamba-2 and attention both read input_layernorm's output (each times a scalar
# multiplier, which a per-channel fold commutes with), their outputs summed; then a SwiGLU feed_forward. Blocks
# return a tuple. Its gated `mamba.norm` is an Identity in models without mamba_rms_norm (that fold is skipped)
_FALCON_H1_FFN = (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",))
_FALCON_H1 = ArchSpec(
    blocks="model.layers", tuple_blocks=True,
    groups=(("mamba.in_proj",), ("mamba.out_proj",), _ATTN, ("self_attn.o_proj",)) + _FALCON_H1_FFN,
    smooth=(SmoothMapping("input_layernorm", _ATTN + ("mamba.in_proj",)), _V_O,
            SmoothMapping("mamba.norm", ("mamba.out_proj",)), SmoothMapping("pre_ff_layernorm", _FALCON_H1_FFN[0]),
            SmoothMapping("feed_forward.up_proj", _FALCON_H1_FFN[1])),
)


# Jamba, a hybrid of attention and Mamba-1 blocks (in_proj -> convolution -> x_proj -> dt/B/C; out_proj), each with
# a dense MLP or routed experts behind pre_ff_layernorm (an nn.Linear router). dt_proj stays unquantized: the mixer
# multiplies by its weight directly, and it is the step size's low-rank projection. No fold into x_proj or out_proj:
# a convolution and a gated scan stand between them and in_proj
_JAMBA_MIXERS = (_ATTN, ("self_attn.o_proj",), ("mamba.in_proj",), ("mamba.x_proj",), ("mamba.out_proj",))
_JAMBA_FFN = (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",),
              ("feed_forward.experts.gate_up_proj",), ("feed_forward.experts.down_proj",))
_JAMBA = ArchSpec(
    blocks="model.layers", groups=_JAMBA_MIXERS + _JAMBA_FFN,
    optional=frozenset(n for g in _JAMBA_MIXERS + _JAMBA_FFN for n in g),
    fp_linears=("mamba.dt_proj", "feed_forward.router"),
    smooth=(_NORM_QKV, _V_O, SmoothMapping("input_layernorm", ("mamba.in_proj",)),
            SmoothMapping("pre_ff_layernorm", _JAMBA_FFN[0]), SmoothMapping("feed_forward.up_proj", _JAMBA_FFN[1]),
            SmoothMapping("pre_ff_layernorm", _JAMBA_FFN[2], balance=("feed_forward.router",)),
            SmoothMapping(_JAMBA_FFN[2][0], _JAMBA_FFN[3], prev_rows="up_half")))


_GRANITE_MOE = ArchSpec(blocks="model.layers", groups=(_ATTN, ("self_attn.o_proj",)) + _GRANITE_H_MOE,
                        smooth=(_NORM_QKV, _V_O) + _granite_ffn(experts=True, shared=False))
# GraniteMoE with a shared MLP beside the routed experts (its gate|up halves in input_linear); without one
# (shared_intermediate_size 0) it is GraniteMoE
_GRANITE_MOE_SHARED = ArchSpec(
    blocks="model.layers", groups=(_ATTN, ("self_attn.o_proj",)) + _GRANITE_H_MOE + _GRANITE_H_SHARED,
    smooth=(_NORM_QKV, _V_O) + _granite_ffn(experts=True))


def _falcon_variant(config) -> str:
    two_norms = config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2
    return "falcon_parallel" if config.parallel_attn and not two_norms else "falcon"


ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": ArchSpec(blocks=_LLAMA.blocks, groups=_LLAMA.groups, smooth=_LLAMA.smooth, norm_plus_one=True),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gemma4_text": _GEMMA4,
    # Gemma 3's (4B and up) and Gemma 4's released checkpoints: the vision-language model, its text decoder under
    # model.language_model (quantized; the vision tower and projector kept as they are)
    "gemma3": replace(_GEMMA2, blocks=_VLM_BLOCKS), "gemma4": replace(_GEMMA4, blocks=_VLM_BLOCKS),
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        groups=(_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        smooth=(
            SmoothMapping("self_attn_layer_norm", _ATTN),
            SmoothMapping("self_attn.v_proj", ("self_attn.out_proj",)),
            SmoothMapping("final_layer_norm", ("fc1",)),
        ),
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        smooth=(
            SmoothMapping("input_layernorm", ("attention.query_key_value",)),
            SmoothMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        smooth=(SmoothMapping("ln_1", ("attn.c_attn",)), SmoothMapping("ln_2", ("mlp.c_fc",))),
    ),
    "mixtral": _MOE,
    "qwen3_moe": _MOE,                   # every block sparse (decoder_sparse_step 1, no mlp_only_layers)
    # Llama's module names
    "granite": _LLAMA, "granite_swa": _LLAMA, "cwm": _LLAMA, "helium": _LLAMA, "smollm3": _LLAMA,
    "ernie4_5": _LLAMA, "seed_oss": _LLAMA, "ministral": _LLAMA, "ministral3": _LLAMA, "hunyuan_v1_dense": _LLAMA,
    "stablelm": _LLAMA,                  # LayerNorm with bias: the fold divides both
    # no norm before attention and MLP (OLMo's has no weight; OLMo 2 and EXAONE 4 normalise the outputs)
    "olmo": _NO_PRE_NORM, "olmo2": _NO_PRE_NORM, "olmo3": _NO_PRE_NORM, "exaone4": _NO_PRE_NORM,
    "vaultgemma": _GEMMA2,               # Gemma 2's norms before attention and MLP, without the ones after
    "cohere": _PARALLEL_LLAMA, "cohere2": _PARALLEL_LLAMA,
    "phi": ArchSpec(
        blocks="model.layers",
        groups=(_ATTN + ("mlp.fc1",), ("self_attn.dense",), ("mlp.fc2",)),
        smooth=(SmoothMapping("input_layernorm", _ATTN + ("mlp.fc1",)),
                SmoothMapping("self_attn.v_proj", ("self_attn.dense",))),
    ),
    "gptj": ArchSpec(
        blocks="transformer.h", tuple_blocks=True,
        groups=(("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"), ("attn.out_proj",), ("mlp.fc_out",)),
        smooth=(SmoothMapping("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),
                SmoothMapping("attn.v_proj", ("attn.out_proj",))),
    ),
    "starcoder2": ArchSpec(
        blocks="model.layers",
        groups=(_ATTN, ("self_attn.o_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        smooth=(SmoothMapping("input_layernorm", _ATTN), SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",)),
                SmoothMapping("post_attention_layernorm", ("mlp.c_fc",))),
    ),
    "gpt_bigcode": ArchSpec(             # nn.Linear, not GPT-2's Conv1D
        blocks="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        smooth=(SmoothMapping("ln_1", ("attn.c_attn",)), SmoothMapping("ln_2", ("mlp.c_fc",))),
    ),
    "bloom": ArchSpec(                   # q/k/v interleaved per head in query_key_value: no v -> dense fold
        blocks="transformer.h", tuple_blocks=True,
        groups=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
        smooth=(SmoothMapping("input_layernorm", ("self_attention.query_key_value",)),
                SmoothMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    ),
    # an MLP of up/down only (squared ReLU, xIELU): nothing to fold between them
    "nemotron": _up_down(norm_plus_one=True), "arcee": _up_down(), "jais2": _up_down(),
    "nanochat": ArchSpec(blocks="model.layers", groups=(_ATTN, ("self_attn.o_proj",), ("mlp.fc1",), ("mlp.fc2",)),
                         smooth=(_V_O,)),  # weightless RMSNorms (nothing to fold into), a squared-ReLU MLP
    "apertus": _up_down(attention_norm="attention_layernorm", mlp_norm="feedforward_layernorm"),
    # fused q|k|v and gate|up linears
    "phi3": _FUSED,
    "glm": _FUSED_GATE_UP, "glm4": _FUSED_GATE_UP,
    # MoE with shared experts, and models whose first blocks are dense
    "qwen2_moe": _shared_moe("shared_expert", shared_first=True, shared_gate="mlp.shared_expert_gate"),
    "ernie4_5_moe": _shared_moe("shared_experts", shared_first=True),
    "glm4_moe": _shared_moe("shared_experts", shared_first=False),
    "exaone_moe": _shared_moe("shared_experts"), "solar_open": _shared_moe("shared_experts", dense_blocks=False),
    "mimo_v2_flash": _shared_moe(None),                   # dense blocks, then routed experts alone
    "hunyuan_v1_moe": _shared_moe("shared_mlp", shared_first=True, router="gate.wg", linear_router=True,
                                  dense_blocks=False),
    "minimax_m2": _MOE,
    "dots1": _shared_moe("shared_experts", shared_first=False),       # dense first blocks; q/k norms per head
    "hy_v3": _shared_moe("shared_experts", shared_first=False), "mellum": _MOE,
    # Laguna: softplus(g_proj(x)) scales attention's output (per element or per head) before o_proj, as AFMoE's gate
    "laguna": _shared_moe("shared_experts", shared_first=True,
                          attention=(_ATTN + ("self_attn.g_proj",), ("self_attn.o_proj",))),
    "glm4_moe_lite": _DEEPSEEK, "youtu": _DEEPSEEK,                   # MLA; youtu's blocks are all dense
    # AFMoE: an output gate beside q/k/v (sigmoid(gate_proj(x)) scales attention's output before o_proj, elementwise,
    # so v -> o still folds); norms before and after attention and MLP; an nn.Linear router kept unquantized
    "afmoe": _shared_moe("shared_experts", shared_first=True, router="router.gate", linear_router=True,
                         attention=(_ATTN + ("self_attn.gate_proj",), ("self_attn.o_proj",)),
                         mlp_norm="pre_mlp_layernorm"),
    "flex_olmo": ArchSpec(blocks=_MOE.blocks, groups=_MOE.groups, smooth=(_V_O, _EXPERTS_UP_DOWN)),  # OLMo 2's norms
    "cohere2_moe": _parallel_moe(shared=True),
    "deepseek_v3": _DEEPSEEK, "deepseek_v2": _DEEPSEEK,
    "llama4_text": _LLAMA4, "gpt_oss": _GPT_OSS,
    # hybrids: blocks of different mixers (attention, a short convolution, Mamba-2) in one stack
    "lfm2": _lfm2(moe=False), "lfm2_moe": _lfm2(moe=True), "granitemoehybrid": _granite_hybrid(experts=True),
    "qwen3_next": _QWEN3_NEXT, "qwen3_5_text": _QWEN3_5, "qwen3_5_moe_text": _QWEN3_5_MOE, "bamba": _BAMBA,
    "nemotron_h": _nemotron_h(latent=False), "falcon_h1": _FALCON_H1, "jamba": _JAMBA,
    "olmoe": _MOE,
    "granitemoeshared": _GRANITE_MOE_SHARED,
    "granitemoe": _GRANITE_MOE, "granitemoe_swa": _GRANITE_MOE,
    "falcon": ArchSpec(blocks="transformer.h", tuple_blocks=True, groups=_FALCON_GROUPS, smooth=(
        SmoothMapping("input_layernorm", (_FALCON_QKV,)), SmoothMapping("post_attention_layernorm", (_FALCON_UP,)),
        SmoothMapping("ln_attn", (_FALCON_QKV,)), SmoothMapping("ln_mlp", (_FALCON_UP,)))),
    "phimoe": ArchSpec(blocks=_MOE.blocks, groups=_MOE.groups, fp_linears=("mlp.router",),   # router is an nn.Linear
                       smooth=tuple(SmoothMapping(m.prev, m.linears, ("mlp.router",) if m.balance else (), m.prev_rows)
                                    for m in _MOE.smooth)),
}

MODEL_TYPES = sorted(ARCHS)                  # what users name; below, the entries only a VARIANTS function picks
ARCHS.update({
    "falcon_parallel": ArchSpec(blocks="transformer.h", tuple_blocks=True, groups=_FALCON_GROUPS,
                                smooth=(SmoothMapping("input_layernorm", (_FALCON_QKV, _FALCON_UP)),)),
    "granitemoehybrid_dense": _granite_hybrid(experts=False),
    "nemotron_h_latent": _nemotron_h(latent=True),
    "cohere2_moe_routed": _parallel_moe(shared=False),
})
# model types whose block wiring depends on their config: model_type -> (config -> the ARCHS key that fits it)
VARIANTS = {"falcon": _falcon_variant,
            "granitemoehybrid": lambda c: "granitemoehybrid" if c.num_local_experts else "granitemoehybrid_dense",
            "granitemoeshared": lambda c: "granitemoeshared" if c.shared_intermediate_size else "granitemoe",
            "cohere2_moe": lambda c: "cohere2_moe" if c.num_shared_experts else "cohere2_moe_routed",
            "nemotron_h": lambda c: "nemotron_h_latent" if getattr(c, "moe_latent_size", None) else "nemotron_h"}
