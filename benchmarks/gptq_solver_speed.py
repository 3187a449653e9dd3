"""Time the pure GPTQ solver on one Llama-3-8B-sized MLP layer (14336 x 4096), random H from 128 x 2048 tokens.

    python3 benchmarks/gptq_solver_speed.py --device cuda     (run through the device tool on an H100)
"""
import argparse
import time

import torch

from qforge.solvers import Grid, gptq

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--out-features", type=int, default=14336)
ap.add_argument("--in-features", type=int, default=4096)
a = ap.parse_args()
sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
X = torch.randn(128 * 2048, a.in_features, device=a.device)
H = 2 / X.shape[0] * X.T @ X
W = torch.randn(a.out_features, a.in_features, device=a.device)
for act_order in (False, True):
    sync()
    t = time.time()
    gptq(W, H, Grid(4, 128, True), act_order=act_order)
    sync()
    print(f"gptq {a.out_features}x{a.in_features} W4 g128 act_order={act_order}: {time.time() - t:.2f}s on {a.device}")
