"""Small GGUF files for tests, written with gguf-py: SmolLM2's first blocks (its Q4_1/Q8_0 bytes copied) and
random models of other architectures, all with a cut-down copy of SmolLM2's BPE tokenizer (its first `vocab`
tokens and the merges among them), so transformers reads them as it reads a real file."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.cache   # one per process: parsing its metadata (49k tokens, 48k merges) takes ~4 s; only read
def smollm2_reader():
    from gguf import GGUFReader

    from qforge.models.loading import _alias_file

    return GGUFReader(str(_alias_file("smollm2-135m")))


def _tokenizer_fields(reader, vocab: int) -> list[tuple]:
    """(key, value, type, sub type) of SmolLM2's tokenizer fields, cut to its first `vocab` tokens."""
    from gguf import GGUFValueType

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    known = set(tokens)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            value = tokens
        elif key == "tokenizer.ggml.token_type":
            value = value[:vocab]
        elif key == "tokenizer.ggml.merges":
            value = [m for m in value if set(m.split(" ")) <= known and m.replace(" ", "") in known]
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        out.append((key, value, field.types[0], sub))
    return out


def _write(path: Path, arch: str, fields: list[tuple], tensors: list[tuple], split_max_tensors: int = 0) -> Path:
    """tensors: (name, array, raw GGML type or None for a float array). `split_max_tensors`: split into files
    `<stem>-0000i-of-0000n.gguf` of at most that many tensors, as llama.cpp's gguf-split does; returns the first."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub)
    for name, data, raw in tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf")) if split_max_tensors else []
    return parts[0] if parts else path


def smollm2_blocks(path: Path, blocks: int = 2, vocab: int | None = 2048, split_max_tensors: int = 0) -> Path:
    """SmolLM2-135M cut to `blocks` decoder blocks (more than its 30: its blocks again, in turn) and its first
    `vocab` tokens (None: all), its quantized bytes unchanged."""
    from gguf import GGMLQuantizationType, GGUFValueType

    r = smollm2_reader()
    vocab = vocab or len(r.fields["tokenizer.ggml.tokens"].data)
    fields = [(k, f.contents(), f.types[0], f.types[1] if f.types[0] == GGUFValueType.ARRAY else None)
              for k, f in r.fields.items() if not k.startswith(("GGUF.", "tokenizer.")) and
              k != "general.architecture"]
    fields = [(k, blocks if k == "llama.block_count" else vocab if k == "llama.vocab_size" else v, t, s)
              for k, v, t, s in fields] + _tokenizer_fields(r, vocab)
    by_block: dict[int, list] = {}
    outside = []
    for t in r.tensors:
        (by_block.setdefault(int(t.name.split(".")[1]), []) if t.name.startswith("blk.") else outside).append(t)

    def raw(t):
        return t.tensor_type if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None

    tensors = [(t.name, np.array(t.data[:vocab] if t.name == "token_embd.weight" else t.data), raw(t))
               for t in outside]
    for b in range(blocks):
        tensors += [(f"blk.{b}.{t.name.split('.', 2)[2]}", np.array(t.data), raw(t))
                    for t in by_block[b % len(by_block)]]
    return _write(path, "llama", fields, tensors, split_max_tensors)


def random_qwen3_moe(path: Path, blocks: int = 2, hidden: int = 64, experts: int = 4, vocab: int = 512,
                     expert_width: int = 768, seed: int = 0, metadata: dict | None = None,
                     split_max_tensors: int = 0) -> Path:
    """A random Qwen3-MoE in float32: per-expert gate/up/down stacked as llama.cpp writes them
    (`ffn_{gate,up,down}_exps`, [experts, out, in]), which transformers fuses into one gate_up_proj. Transformers
    5.17 alone reads the file right only at expert width 768: it does not read GGUF's expert_feed_forward_length
    and takes Qwen3-MoE's default. `metadata`: fields (after "qwen3moe.") written as given instead."""
    from gguf import GGUFValueType as T

    rng = np.random.default_rng(seed)
    heads, kv, head_dim, inter = 4, 2, 16, expert_width
    u32, f32 = T.UINT32, T.FLOAT32
    meta = [("context_length", 256, u32), ("block_count", blocks, u32), ("embedding_length", hidden, u32),
            ("feed_forward_length", inter, u32), ("expert_feed_forward_length", inter, u32),
            ("attention.head_count", heads, u32), ("attention.head_count_kv", kv, u32),
            ("attention.key_length", head_dim, u32), ("attention.value_length", head_dim, u32),
            ("rope.freq_base", 10000.0, f32), ("attention.layer_norm_rms_epsilon", 1e-6, f32),
            ("expert_count", experts, u32), ("expert_used_count", 2, u32), ("vocab_size", vocab, u32)]
    fields = [(f"qwen3moe.{k}", (metadata or {}).get(k, v), t, None) for k, v, t in meta] + \
        [("general.name", "tiny-qwen3-moe", T.STRING, None)] + _tokenizer_fields(smollm2_reader(), vocab)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    tensors = [("token_embd.weight", w(vocab, hidden), None), ("output_norm.weight", norm(hidden), None)]
    head = ("output.weight", w(vocab, hidden), None)                   # last, as llama.cpp's converter writes it
    for b in range(blocks):
        p = f"blk.{b}."
        tensors += [(p + "attn_norm.weight", norm(hidden), None), (p + "attn_q.weight", w(heads * head_dim, hidden), None),
                    (p + "attn_k.weight", w(kv * head_dim, hidden), None),
                    (p + "attn_v.weight", w(kv * head_dim, hidden), None),
                    (p + "attn_output.weight", w(hidden, heads * head_dim), None),
                    (p + "attn_q_norm.weight", norm(head_dim), None), (p + "attn_k_norm.weight", norm(head_dim), None),
                    (p + "ffn_norm.weight", norm(hidden), None), (p + "ffn_gate_inp.weight", w(experts, hidden), None),
                    (p + "ffn_gate_exps.weight", w(experts, inter, hidden), None),
                    (p + "ffn_up_exps.weight", w(experts, inter, hidden), None),
                    (p + "ffn_down_exps.weight", w(experts, hidden, inter), None)]
    return _write(path, "qwen3moe", fields, tensors + [head], split_max_tensors)


def _spm_tokenizer_fields(reader, vocab: int) -> list[tuple]:
    """SmolLM2's first `vocab` tokens as a SentencePiece-style vocabulary (tokenizer.ggml.model "llama", zero
    scores, no merges), the kind Gemma's GGUF files carry and transformers' Gemma converter reads."""
    from gguf import GGUFValueType as T

    out = [f for f in _tokenizer_fields(reader, vocab) if f[0] not in ("tokenizer.ggml.model", "tokenizer.ggml.merges")]
    return out + [("tokenizer.ggml.model", "llama", T.STRING, None),
                  ("tokenizer.ggml.scores", [0.0] * vocab, T.ARRAY, T.FLOAT32)]


def tiny_family_gguf(path: Path, key: str, arch: str, vocab: int = 512, **overrides) -> Path:
    """tests/tiny_models.py's model `key` written as a float32 GGUF file of architecture `arch`: the metadata
    transformers reads for `arch` (GGUF_CONFIG_MAPPING, from the tiny config), every parameter under its GGUF name,
    its values written as they are (so a reader's transforms, Llama's q/k permutation or Gemma's norm offset,
    apply to them: compare readers of the file, not the file with the tiny model). `overrides`: config fields."""
    from gguf import GGUFValueType as T
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    from transformers.pytorch_utils import Conv1D

    from qforge.models.gguf import gguf_names
    from tiny_models import tiny_model

    m = tiny_model(key, **overrides)
    cfg = m.config
    values = {**cfg.to_dict(), **(cfg.rope_parameters or {} if hasattr(cfg, "rope_parameters") else {})}
    fields = [(f"{arch}.{gk}", values[hk], T.FLOAT32 if isinstance(values[hk], float) else T.UINT32, None)
              for gk, hk in GGUF_CONFIG_MAPPING[arch].items()
              if hk and isinstance(values.get(hk), (int, float)) and not isinstance(values.get(hk), bool)]
    tokenizer = _spm_tokenizer_fields if arch.startswith("gemma") else _tokenizer_fields
    fields += [("general.name", f"tiny-{key}", T.STRING, None)] + tokenizer(smollm2_reader(), vocab)
    names = {v: k for k, v in gguf_names(m, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=cfg.to_dict()),
                                         arch).items()}
    tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
    conv1d = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, Conv1D)}  # [in, out]; GGUF: [out, in]
    tensors = []
    for k, t in m.state_dict().items():
        t = t.T if k in conv1d else t
        stem = names.get(k.removesuffix(".weight"))
        name = names.get(k) or (stem and f"{stem}.weight")
        if name is None and not (tied and k == "lm_head.weight"):
            raise KeyError(f"{key}: no GGUF name for {k}")
        if name is not None:
            tensors.append((name, t.float().numpy().copy(), None))
    return _write(path, arch, fields, tensors)
