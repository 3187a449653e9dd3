"""W4A16 dequant-matmul speed on a CUDA GPU: qforge's Triton kernel vs torch fp16 matmul, per layer shape
and batch, plus end-to-end decoding of a Llama-3-8B-shaped model with random weights.

    python3 benchmarks/kernels.py [--dtype float16] [--decode-layers 32]      (through the device tool)

Per (shape, batch): median of CUDA-event timings after warm-up; effective GB/s counts the bytes a call
must move (packed weights, scales, zeros, x, y); "% copy" is that over the device's measured
device-to-device copy bandwidth (read + write of a 1 GiB buffer); speed-up is fp16 matmul time over
the kernel's. Shapes are [out x in]: Llama-3-8B (4096x4096, 14336x4096, 4096x14336) and 70B
(8192x8192, 28672x8192, 8192x28672), W4 group 128 asymmetric, in-order groups.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]
BATCHES = [1, 4, 16, 64, 256]


def cuda_time(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median seconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src))


def random_layer(out_f: int, in_f: int, bits: int = 4, group: int = 128):
    """A QuantLinear with random codes, zeros and scales, built on the GPU."""
    from qforge.kernels import QuantLinear
    from qforge.formats.bitpack import pack_int32
    from qforge.solvers import Grid

    G = in_f // group
    m = QuantLinear(in_f, out_f, Grid(bits, group, False), G, bias=False).cuda()
    codes = torch.randint(0, 2**bits, (in_f, out_f), device="cuda")
    m.qweight.copy_(pack_int32(codes, bits, dim=0))
    m.qzeros.copy_(pack_int32(torch.randint(0, 2**bits, (G, out_f), device="cuda"), bits, dim=1))
    m.scales.copy_(torch.rand(G, out_f, device="cuda") * 0.01 + 1e-3)
    m.g_idx.copy_(torch.arange(in_f, device="cuda", dtype=torch.int32) // group)
    return m


def layer_table(dtype) -> list[dict]:
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, measured copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for out_f, in_f in SHAPES:
        q = random_layer(out_f, in_f)
        w16 = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
        qbytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.qzeros, q.scales, q.g_idx))
        for M in BATCHES:
            x = torch.randn(M, in_f, device="cuda", dtype=dtype)
            t_q = cuda_time(lambda: q(x))
            t_d = cuda_time(lambda: torch.nn.functional.linear(x, w16))
            moved = qbytes + (x.numel() + M * out_f) * x.element_size()
            r = {"shape": f"{out_f}x{in_f}", "batch": M, "kernel_us": t_q * 1e6, "fp16_us": t_d * 1e6,
                 "GB/s": moved / t_q / 1e9, "pct_copy_bw": 100 * moved / t_q / bw, "speedup": t_d / t_q}
            rows.append(r)
            print(json.dumps(r), flush=True)
        del q, w16
    return rows


def decode_tokens_per_s(layers: int, dtype, quantized: bool, steps: int = 64) -> float:
    """Greedy decoding of `steps` tokens at batch 1 after an 8-token prompt, random-weight Llama-3-8B shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qforge.models.arch import arch_spec, block_linears, get_blocks

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if quantized:
        spec = arch_spec(model)
        for block in get_blocks(model, spec):
            for ref in (r for g in block_linears(block, spec) for r in g):
                path, _, leaf = ref.name.rpartition(".")
                setattr(block.get_submodule(path), leaf, random_layer(*ref.shape))
    ids = torch.randint(0, cfg.vocab_size, (1, 8), device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)         # warm-up, compile
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        torch.cuda.synchronize()
    del model
    torch.cuda.empty_cache()
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--decode-layers", type=int, default=32, help="0 skips the end-to-end decode")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py measures CUDA kernels: run it on a GPU (the device tool)")
    from qforge.cli.table import format_table
    from qforge.kernels import triton_matmul

    if not triton_matmul.available():
        sys.exit("triton is not installed")
    dtype = getattr(torch, a.dtype)
    rows = layer_table(dtype)
    print(format_table(["shape", "batch", "kernel µs", "fp16 µs", "GB/s", "% copy BW", "speed-up"],
                       [[r["shape"], r["batch"], r["kernel_us"], r["fp16_us"], r["GB/s"], r["pct_copy_bw"],
                         r["speedup"]] for r in rows], title=f"W4 g128 asym Triton kernel vs {a.dtype} matmul"))
    if a.decode_layers:
        tq = decode_tokens_per_s(a.decode_layers, dtype, True)
        td = decode_tokens_per_s(a.decode_layers, dtype, False)
        print(f"decode, Llama-3-8B shape ({a.decode_layers} layers), batch 1: W4 {tq:.1f} tok/s, "
              f"{a.dtype} {td:.1f} tok/s, speed-up {tq / td:.2f}x")


if __name__ == "__main__":
    main()
