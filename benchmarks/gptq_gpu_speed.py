"""GPTQ wall time on a Llama-3-8B-shaped model with random weights and random calibration tokens: qforge vs
llm-compressor's GPTQModifier, side by side, each tool in its own process on the same model and tokens.

    python3 benchmarks/gptq_gpu_speed.py --device cuda                      (through the device tool)
    python3 benchmarks/gptq_gpu_speed.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 1000 --nsamples 4 --seqlen 64        (a smoke run of the script)

W4 g128 symmetric, lm_head kept; 128 x 2048 tokens by default (issue 8). Each tool at its defaults for that
scheme: qforge with its group-aware order and range search (on CUDA its column loop is one Triton kernel
per block), llm-compressor without act-order. `--peer-layers N` gives llm-compressor a model of N layers
(a short GPU lease; the per-layer seconds are what compare). The model is built
in fp16 from a fixed seed on the device in every process; qforge then keeps it on the CPU and moves one
block at a time to the device, llm-compressor keeps it on the device. Prints seconds in total and per decoder layer.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch


def build(a):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=max(4096, a.seqlen))
    torch.manual_seed(0)
    with torch.device(a.device):                  # random init on the GPU: seconds, not a minute on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, a.vocab, (a.seqlen,), generator=g) for _ in range(a.nsamples)]
    return model, samples


def run_qforge(a, model, samples) -> float:
    from qforge import QuantizeConfig
    from qforge.pipeline import quantize_model

    t = time.perf_counter()
    model.to("cpu")                               # qforge holds the model on the CPU, a block at a time on the device
    print(f"qforge: model moved to the CPU in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    t = time.perf_counter()
    quantize_model(model, QuantizeConfig(method="gptq", bits=4, group_size=128), samples, device=a.device,
                   show_progress=False)
    return time.perf_counter() - t


def _stub_tokenizer():
    """oneshot wants a processor even for a tokenized dataset; a random model has none: a two-token one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                   pad_token="<pad>", unk_token="<unk>")


def run_llmcompressor(a, model, samples) -> float:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * len(s) for s in samples]})
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    recipe = GPTQModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          actorder=None)
    cfg_dir = tempfile.mkdtemp()                  # oneshot re-reads the model's config from name_or_path
    model.config.save_pretrained(cfg_dir)
    model.config.name_or_path = cfg_dir
    model.to(a.device)
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=a.seqlen, num_calibration_samples=len(samples),
            shuffle_calibration_samples=False, processor=_stub_tokenizer())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tools", default="llmcompressor,qforge",
                    help="in this order: the peer first, on its few layers, so a run cut short still has both")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--peer-layers", type=int, help="decoder layers of the model the peer quantizes (default --layers; "
                    "fewer fit a short GPU lease, and the per-layer time is what compares)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        if a.worker != "qforge" and a.peer_layers:
            a.layers = a.peer_layers
        # the worker's log (qforge: one line per block) streams to the caller's stderr as it runs
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"%(relativeCreated)7.0f ms {a.worker} %(name)s: %(message)s")
        t = time.perf_counter()
        model, samples = build(a)
        print(f"{a.worker}: model built on {a.device} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        secs = {"qforge": run_qforge, "llmcompressor": run_llmcompressor}[a.worker](a, model, samples)
        print("RESULT " + json.dumps({"tool": a.worker, "layers": a.layers, "seconds": secs, "per_layer": secs / a.layers}),
              flush=True)
        return
    shape = f"{a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, {a.nsamples} x {a.seqlen} tokens"
    print(f"GPTQ W4 g128 on a random Llama ({shape}) on {a.device}", flush=True)
    for tool in a.tools.split(","):
        same = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                if k not in ("tools", "worker") and v is not None]
        cmd = [sys.executable, __file__, "--worker", tool, *same]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))   # stderr: streamed
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{tool}: FAILED (exit {p.returncode}; its log is above)", flush=True)
            continue
        r = json.loads(line[0][7:])
        print(f"{tool:15s} {r['layers']:3d} layers {r['seconds']:8.1f} s total   {r['per_layer']:6.2f} s per layer",
              flush=True)


if __name__ == "__main__":
    main()
