"""Time the pure GPTQ solver on Llama-3-8B layer shapes, random H from 128 x 2048 random tokens: the eager
PyTorch column loop (solvers.gptq.column_loop) against the one-kernel-per-block Triton loop
(kernels/gptq_loop.py), each after a warm-up solve (compilation), for plain GPTQ, act-order, and qforge's
default range search with the group-aware order.

    python3 benchmarks/gptq_solver_speed.py --device cuda     (through the device tool)
    python3 benchmarks/gptq_solver_speed.py --device cpu --shapes 256x512 --tokens 4096   (a smoke run)
"""
import argparse
import time

import torch

from qforge.kernels.gptq_loop import column_loop_for
from qforge.solvers import Grid, gptq
from qforge.solvers.gptq import column_loop

OPTIONS = {"plain": {}, "act-order": {"act_order": True}, "GAR + range search": {"group_aware": True, "scale_search": True}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="14336x4096,4096x14336", help="OUTxIN, comma-separated")
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    a = ap.parse_args()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    loops = {"eager loop": column_loop}
    if column_loop_for(a.device) is not column_loop:
        loops["triton loop"] = column_loop_for(a.device)
    torch.manual_seed(0)
    for shape in a.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        H = torch.zeros(in_f, in_f, device=a.device)
        for i in range(0, a.tokens, 16384):          # H = 2/n Σ x xᵀ in chunks (the tokens need not fit at once)
            X = torch.randn(min(16384, a.tokens - i), in_f, device=a.device)
            H.addmm_(X.T, X, alpha=2 / a.tokens)
        W = torch.randn(out_f, in_f, device=a.device)
        for name, opts in OPTIONS.items():
            times = {}
            for loop_name, loop in loops.items():
                gptq(W[:64], H, Grid(4, 128, True), loop=loop, **opts)    # warm-up: kernels compiled
                sync()
                t = time.perf_counter()
                gptq(W, H, Grid(4, 128, True), loop=loop, **opts)
                sync()
                times[loop_name] = time.perf_counter() - t
            cols = "   ".join(f"{k} {v:6.2f} s" for k, v in times.items())
            print(f"gptq {shape} W4 g128 {name:20s} {cols}   on {a.device}", flush=True)


if __name__ == "__main__":
    main()
