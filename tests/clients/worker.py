"""Runs one peer client in its own process (clients monkeypatch transformers on import), for
tests/test_clients.py. Usage: worker.py TASK MODEL_DIR OUT_DIR; writes OUT_DIR/result.json and logits.pt.
worker.py TASK --batch JOBS.json runs TASK on each [MODEL_DIR, OUT_DIR] of the list in one process.

Tasks:
  gptqmodel-load   GPTQModel loads a gptq checkpoint on the CPU
  transformers-ct  plain transformers (compressed-tensors installed) loads a compressed-tensors checkpoint
  llmc-quantize    llm-compressor QuantizationModifier (RTN) W4 g64 on MODEL_DIR, saved compressed to OUT_DIR/ckpt
  llmc-quantize-tiny  the same at g32 for tests/tiny_models.py's widths (MoE experts linearized, routers kept)
  gptqmodel-quantize  GPTQModel W4 g64 on MODEL_DIR, saved to OUT_DIR/ckpt
  llmc-w8a8-tiny   llm-compressor QuantizationModifier scheme W8A8 (int8 per-channel weights, dynamic per-token int8
                   inputs) on a tiny model, saved compressed (int-quantized) to OUT_DIR/ckpt
  llmc-fp8-tiny    the same with scheme FP8_DYNAMIC (E4M3 per-channel weights, dynamic per-token E4M3 inputs), saved
                   float-quantized
  llmc-w8a8-static-tiny  int8 per-channel weights, static per-tensor int8 inputs (calibrated on builtin:mix)
  llmc-fp8-static-tiny   scheme FP8 (E4M3 per-tensor weights, static per-tensor E4M3 inputs), calibrated
  llmc-kv-fp8-tiny  int4 g32 weights and an FP8 KV cache (kv_cache_scheme: static per-tensor k/v scales, calibrated)
  llmc-nvfp4-tiny  scheme NVFP4A16 (E2M1 weights in groups of 16, E4M3 group scales, a global scale), saved
                   nvfp4-pack-quantized
  llmc-mxfp4-tiny / llmc-mxfp8-tiny  schemes MXFP4A16 / MXFP8A16 (E2M1 / E4M3 weights in groups of 32, power-of-two
                   scales), saved mxfp4-pack-quantized / mxfp8-quantized; llmc-mxfp4-a4-tiny / llmc-mxfp8-a8-tiny:
                   schemes MXFP4 / MXFP8 (the inputs MX too, per token in groups of 32)
  llmc-nvfp4-a4-tiny  scheme NVFP4 (W4A4: the inputs NVFP4 under calibrated global scales), calibrated on 8 x 64
                   tokens
  llmc-fp8-block-tiny  FP8_BLOCK's scheme in 32 x 32 tiles (the tiny widths; E4M3 weights, one scale a tile, dynamic
                   E4M3 inputs per token in groups of 32 channels), saved float-quantized
Every task reports, on the model object the client itself built: logits on a fixed token sequence, the
greedy continuation of it, and perplexity by qforge's protocol on the first windows of `wiki`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SEQLEN, WINDOWS, NEW_TOKENS = 512, 2, 32


def probe_ids(tokenizer) -> torch.Tensor:
    text = "The history of the city begins with a small settlement on the river, where"
    return tokenizer(text, return_tensors="pt")["input_ids"]


def calibration(tokenizer, n=8, seqlen=256):
    from qforge.calibration import build_calibration

    return build_calibration("builtin:mix", tokenizer, n, seqlen, seed=0).samples


def gptqmodel_torch_fp32(path: str):
    """GPTQModel's plain-torch kernel (TorchLinear), which loads in fp16 only, cast to fp32 afterwards: its
    fp16 matmul takes minutes on a CPU, and the fused CPU kernel it picks for fp32 computes in bf16 (1% noise).
    With its weight cache on (GPTQ_TORCH_CACHE_WEIGHTS, read when a layer is built), each layer dequantizes its
    packed tensors once, not on every call (SmolLM2's checks: 107 s -> 18 s; the same values)."""
    import os

    from gptqmodel import BACKEND, GPTQModel

    os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = "1"
    m = GPTQModel.load(path, device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH)
    m.model.float()
    return m


def transformers_ct(path) -> torch.nn.Module:
    """A compressed-tensors checkpoint as plain transformers loads it, in fp32. With a quantizer, transformers 5.17
    leaves the tensors it loads under renamed keys (Nemotron-H's backbone.* -> model.*) in the file's dtype whatever
    `dtype` says, and refuses model.float(): nn.Module's cast (exact, fp16 -> fp32) puts them in the dtype asked for.
    NVFP4 and MX layers decompress at their first forward into bf16 weights, which fp32 inputs cannot multiply: they
    are decompressed at load instead (run_compressed False), then cast."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    fmt = json.loads((Path(path) / "config.json").read_text())["quantization_config"].get("format")
    decompress = fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized")
    extra = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if decompress else {}
    return torch.nn.Module.float(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra))


def report(model, tokenizer, out: Path, extra: dict | None = None) -> None:
    from qforge.eval import load_eval_text, perplexity

    model.eval()
    ids = probe_ids(tokenizer)  # logits are compared in fp32 whatever the model computes in
    with torch.no_grad():
        logits = model(ids).logits.float()
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    torch.save(logits, out / "logits.pt")
    ppl = perplexity(model, tokenizer, load_eval_text("wiki"), SEQLEN, WINDOWS, show_progress=False)["ppl"]
    (out / "result.json").write_text(json.dumps({"greedy": gen[0, ids.shape[1]:].tolist(), "ppl": ppl,
                                                 **(extra or {})}))


def main(task: str, model_dir: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if task == "gptqmodel-load":
        m = gptqmodel_torch_fp32(model_dir)
        packed = [type(mod).__name__ for mod in m.model.modules() if hasattr(mod, "qweight")]
        report(m.model, tok, out_dir, {"qlinear": packed[0] if packed else "Linear", "packed": len(packed)})
    elif task == "transformers-ct":
        m = transformers_ct(model_dir)
        qc = getattr(m.config, "quantization_config", None)     # none once decompressed at load (NVFP4)
        report(m, tok, out_dir, {"quant_method": getattr(qc, "quant_method", "?")})
    elif task in ("llmc-quantize", "llmc-quantize-tiny"):
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        # the format is what is under test; its GPTQ path is compared in benchmarks/gptq_vs_peers.py. Tiny: MoE
        # experts linearized by oneshot (one Linear per expert), routers left unquantized as qforge leaves them
        tiny = task.endswith("-tiny")
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                   "group_size": 32 if tiny else 64}
        recipe = QuantizationModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}},
                                      ignore=["lm_head"] + (["re:.*router$", "re:.*mlp.gate$"] if tiny else []))
        oneshot(model=m, recipe=recipe)
        m.save_pretrained(out_dir / "ckpt", save_compressed=True)
        tok.save_pretrained(out_dir / "ckpt")
        report(m, tok, out_dir)
    elif task in ("llmc-w8a8-tiny", "llmc-fp8-tiny", "llmc-fp8-block-tiny", "llmc-nvfp4-tiny", "llmc-mxfp4-tiny",
                  "llmc-mxfp8-tiny", "llmc-mxfp4-a4-tiny", "llmc-mxfp8-a8-tiny"):              # (inputs: as vLLM)
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if task == "llmc-fp8-block-tiny":         # the preset's 128 x 128 tiles exceed the tiny widths
            fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
            recipe = QuantizationModifier(config_groups={"g0": {
                "targets": ["Linear"], "weights": {**fp8, "strategy": "block", "block_structure": [32, 32]},
                "input_activations": {**fp8, "strategy": "group", "group_size": 32, "dynamic": True}}},
                ignore=["lm_head"])
        else:
            scheme = {"llmc-w8a8-tiny": "W8A8", "llmc-nvfp4-tiny": "NVFP4A16", "llmc-mxfp4-tiny": "MXFP4A16",
                      "llmc-mxfp8-tiny": "MXFP8A16", "llmc-mxfp4-a4-tiny": "MXFP4",
                      "llmc-mxfp8-a8-tiny": "MXFP8"}.get(task, "FP8_DYNAMIC")
            recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
        oneshot(model=m, recipe=recipe)
        m.save_pretrained(out_dir / "ckpt", save_compressed=True)
        tok.save_pretrained(out_dir / "ckpt")
        if task.startswith(("llmc-nvfp4", "llmc-mxfp")):   # its model object decompresses into bf16 weights: as
            # saved, in fp32
            m = transformers_ct(out_dir / "ckpt")
        report(m, tok, out_dir)
    elif task in ("llmc-w8a8-static-tiny", "llmc-fp8-static-tiny", "llmc-kv-fp8-tiny",
                  "llmc-nvfp4-a4-tiny"):                                                # calibrated, then fixed
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier

        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if task in ("llmc-fp8-static-tiny", "llmc-nvfp4-a4-tiny"):
            recipe = QuantizationModifier(targets="Linear", scheme="FP8" if "fp8" in task else "NVFP4",
                                          ignore=["lm_head"])
        elif task == "llmc-kv-fp8-tiny":          # the model object casts keys and values to E4M3 as it runs
            weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
            kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
            recipe = QuantizationModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}},
                                          ignore=["lm_head"], kv_cache_scheme=kv)
        else:
            scheme = {"targets": ["Linear"],
                      "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                      "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                            "dynamic": False}}
            recipe = QuantizationModifier(config_groups={"g0": scheme}, ignore=["lm_head"])
        samples = [s.tolist() for s in calibration(tok, 8, 64)]
        ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
        oneshot(model=m, dataset=ds, recipe=recipe, max_seq_length=64, num_calibration_samples=len(samples),
                shuffle_calibration_samples=False)
        m.save_pretrained(out_dir / "ckpt", save_compressed=True)
        tok.save_pretrained(out_dir / "ckpt")
        if "nvfp4" in task:                       # its model object decompresses into bf16 weights: as saved, in fp32
            m = transformers_ct(out_dir / "ckpt")
        report(m, tok, out_dir)
    elif task in ("gptqmodel-quantize", "gptqmodel-quantize-tiny"):
        from gptqmodel import GPTQModel, QuantizeConfig

        tiny = task.endswith("-tiny")                 # tests/tiny_models.py's widths: 64 and 96, so group 32
        m = GPTQModel.load(model_dir, QuantizeConfig(bits=4, group_size=32 if tiny else 64, sym=True, desc_act=False,
                                                     offload_to_disk=False), device="cpu", dtype=torch.float32)
        m.quantize([{"input_ids": s.tolist()} for s in calibration(tok, *((16, 64) if tiny else ()))])
        m.save(str(out_dir / "ckpt"))
        tok.save_pretrained(out_dir / "ckpt")
        report(gptqmodel_torch_fp32(str(out_dir / "ckpt")).model, tok, out_dir)
    else:
        raise SystemExit(f"unknown task {task}")


def batch(task: str, jobs_file: str) -> None:
    """main() on each [model dir, out dir] of the JSON list in `jobs_file`, in this one process; a job that fails
    leaves its traceback in its out dir (error.txt) and the next runs."""
    import traceback

    for model_dir, out in json.loads(Path(jobs_file).read_text()):
        try:
            main(task, model_dir, out)
        except Exception:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "error.txt").write_text(traceback.format_exc())


if __name__ == "__main__":
    if sys.argv[2] == "--batch":
        batch(sys.argv[1], sys.argv[3])
    else:
        main(*sys.argv[1:4])
