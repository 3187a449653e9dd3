"""W4A16 dequant-matmul speed on a CUDA GPU: qforge's Triton kernel (the heuristic's schedule and the
Tuner's pick) vs torch fp16 matmul, per layer shape and batch, then greedy decoding of a Llama-3-8B-shaped
model with random weights, W4 vs fp16.

    python3 benchmarks/kernels.py [--dtype float16] [--decode-layers 32] [--out rows.jsonl]   (a GPU: the device tool)
    python3 benchmarks/kernels.py --smoke       (CPU, Triton's interpreter, tiny shapes: checks the script runs)

Per (shape, batch): median time by triton.testing.do_bench (CUDA events, warm-up, L2 flushed before every
run; a call's output allocation and split-K zeroing included), and for layers larger than L2 also replayed
as a CUDA graph (no launch gaps, as in graph-captured decoding); effective GB/s counts the bytes a call
must move (packed weights, scales, zeros, x, y); "% copy" is that over the device's measured
device-to-device copy bandwidth (read + write of a 1 GiB buffer); speed-up is fp16 matmul time over the
kernel's. Shapes are [out x in]: Llama-3-8B (4096x4096, 14336x4096, 4096x14336) and 70B (8192x8192,
28672x8192, 8192x28672), W4 group 128 asymmetric, in-order groups. The Tuner checks every candidate
against the PyTorch reference before timing it; dropped and failed candidates are counted.
Decoding: batch 1, 8-token prompt, a static KV cache, each step replayed as a CUDA graph (and eager).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# the 70B shapes first: they carry the targets, and a run cut short by the lease still has them
SHAPES = [(28672, 8192), (8192, 28672), (8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336)]
BATCHES = [1, 4, 16, 64, 256]


def bench(fn, device: str = "cuda") -> float:
    """Median seconds of fn() (triton.testing.do_bench: CUDA events, L2 flushed between runs; on a CPU, a
    wall clock, for --smoke)."""
    if device == "cpu":
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[1]
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def graph_bench(fn) -> float:
    """Median seconds of fn() replayed in a CUDA graph (triton.testing.do_bench_cudagraph)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3


def copy_bandwidth(device: str) -> float:
    src = torch.empty(1 << (30 if device == "cuda" else 24), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src), device)


def random_layer(out_f: int, in_f: int, bits: int = 4, group: int = 128, device: str = "cuda"):
    """A QuantLinear with random codes, zeros and scales, built on the device."""
    from qforge.formats.bitpack import pack_int32
    from qforge.kernels import QuantLinear
    from qforge.solvers import Grid

    G = in_f // group
    m = QuantLinear(in_f, out_f, Grid(bits, group, False), G, bias=False).to(device)
    m.qweight.copy_(pack_int32(torch.randint(0, 2**bits, (in_f, out_f), device=device), bits, dim=0))
    m.qzeros.copy_(pack_int32(torch.randint(0, 2**bits, (G, out_f), device=device), bits, dim=1))
    m.scales.copy_(torch.rand(G, out_f, device=device) * 0.01 + 1e-3)
    m.g_idx.copy_(torch.arange(in_f, device=device, dtype=torch.int32) // group)
    return m


def layer_rows(dtype, tuner, shapes, batches, device: str) -> list[dict]:
    import triton

    from qforge.kernels import triton_matmul as tm

    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    print(f"device: {name}, {tm.sm_count(torch.device(device))} SMs, measured copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"triton {triton.__version__}, torch {torch.__version__}", flush=True)
    rows = []
    for out_f, in_f in shapes:
        q = random_layer(out_f, in_f, device=device)
        w16 = torch.randn(out_f, in_f, device=device, dtype=dtype)
        qbytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.qzeros, q.scales))
        gs = tm.in_order_group_size(q.g_idx, in_f)
        for M in batches:
            x = torch.randn(M, in_f, device=device, dtype=dtype)
            args = (x, q.qweight, q.qzeros, q.scales, q.g_idx, 4, gs)
            t_plan = bench(lambda: tm.triton_matmul(*args), device)
            best = tuner.config(*args)
            t_tuned = bench(lambda: tm.triton_matmul(*args, config=best), device)
            t_fp = bench(lambda: torch.nn.functional.linear(x, w16), device)
            # replayed as a CUDA graph: no launch gaps (the zeroing of a split-K output included); only for
            # layers larger than L2, since graph replays do not flush it
            big = device == "cuda" and qbytes > torch.cuda.get_device_properties(device).L2_cache_size
            t_graph = graph_bench(lambda: tm.triton_matmul(*args, config=best)) if big else None
            moved = qbytes + (x.numel() + M * out_f) * x.element_size()
            r = {"shape": f"{out_f}x{in_f}", "batch": M, "plan_us": t_plan * 1e6, "tuned_us": t_tuned * 1e6,
                 "fp16_us": t_fp * 1e6, "GB/s": moved / t_tuned / 1e9, "pct_copy_bw": 100 * moved / t_tuned / bw,
                 "speedup_plan": t_fp / t_plan, "speedup_tuned": t_fp / t_tuned,
                 "graph_us": t_graph and t_graph * 1e6, "pct_copy_bw_graph": t_graph and 100 * moved / t_graph / bw,
                 "plan": str(tm.plan(M, out_f, in_f, gs, tm.sm_count(x.device))), "tuned": str(best)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        q = w16 = None                 # freed before the next shape (a del reads as undefined to pyflakes)
    return rows


def decode_rows(cfg, dtype, tuner, device: str, steps: int = 64) -> list[dict]:
    """tokens/s of greedy decoding, batch 1, a random-weight Llama of config cfg: fp16, then W4 (plan, tuned)."""
    from transformers import AutoModelForCausalLM

    from qforge.eval.decode import greedy_decode
    from qforge.kernels import use_tuner
    from qforge.models.arch import arch_spec, block_linears, get_blocks

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), device=device)
    layers = cfg.num_hidden_layers
    rows = []

    def measure(name):
        for graph in (True, False):
            try:
                r = greedy_decode(model, prompt, steps, cuda_graph=graph)
                row = {"decode": name, "cuda_graph": graph, "layers": layers, "tokens_per_s": r.tokens_per_s}
            except Exception as e:              # a step that cannot be captured: say so, keep the eager row
                row = {"decode": name, "cuda_graph": graph, "layers": layers, "error": repr(e)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)

    measure(str(dtype).removeprefix("torch."))
    spec = arch_spec(model)
    for block in get_blocks(model, spec):           # every decoder linear -> a random W4 g128 QuantLinear
        for ref in (r for g in block_linears(block, spec) for r in g):
            path, _, leaf = ref.name.rpartition(".")
            setattr(block.get_submodule(path), leaf, random_layer(*ref.shape, device=device))
    if device == "cuda":
        torch.cuda.empty_cache()
    measure("W4 g128 (plan)")
    use_tuner(model, tuner)
    measure("W4 g128 (tuned)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--decode-layers", type=int, default=32, help="0 skips the end-to-end decode")
    ap.add_argument("--out", help="write every row as JSON lines here")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes (no timings)")
    a = ap.parse_args()
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py measures CUDA kernels: run it on a GPU (the device tool), or --smoke")
    from qforge.cli.table import format_table
    from qforge.kernels import Tuner, triton_matmul

    if not triton_matmul.available():
        sys.exit("triton is not installed")
    from transformers import LlamaConfig

    dtype = getattr(torch, a.dtype)
    if a.smoke:
        device, shapes, batches = "cpu", [(64, 256)], [1, 17]
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
        tuner = Tuner(timer=lambda fn: bench(fn, "cpu"))
    else:
        device, shapes, batches = "cuda", SHAPES, BATCHES
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.decode_layers,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096)
        tuner = Tuner(warmup_ms=2, rep_ms=10)
    rows = layer_rows(dtype, tuner, shapes, batches, device)
    if a.decode_layers:
        rows += decode_rows(cfg, dtype, tuner, device, steps=4 if a.smoke else 64)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows + [{"tuner_rejected": tuner.rejected}])
    layer = [r for r in rows if "shape" in r]
    print(format_table(["shape", "batch", "plan µs", "tuned µs", "fp16 µs", "GB/s", "% copy BW", "× plan", "× tuned",
                        "graph µs", "% BW graph"],
                       [[r["shape"], r["batch"], r["plan_us"], r["tuned_us"], r["fp16_us"], r["GB/s"],
                         r["pct_copy_bw"], r["speedup_plan"], r["speedup_tuned"], r["graph_us"] or "-",
                         r["pct_copy_bw_graph"] or "-"] for r in layer],
                       title=f"W4 g128 asym Triton kernel vs {a.dtype} matmul (GB/s, % and × tuned: the Tuner's pick)"))
    print(f"tuner: {len(tuner.rejected)} candidate configs rejected "
          f"({sum(1 for r in tuner.rejected if r['why'].startswith('off'))} off the reference)")
    for r in (r for r in rows if "decode" in r):
        print(f"decode {r['decode']:16s} graph={r['cuda_graph']!s:5s} "
              + (f"{r['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in r else r["error"]))


if __name__ == "__main__":
    main()
