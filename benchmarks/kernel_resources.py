"""The compiler's resource report for every schedule of qforge's Triton kernels, built for Hopper (sm_90)
on this machine without a GPU (qforge/kernels/aot.py): registers per thread, stack frame / local memory
(spills), shared memory per program, and the programs one SM can hold by those (occupancy). A lead for
choosing schedules before a GPU is lent, not a timing.

    python3 benchmarks/kernel_resources.py [--shape 4096x4096] [--json rows.jsonl]
"""
from __future__ import annotations

import argparse
import json

import torch

# H100/H200 (sm_90) per SM: 64K 32-bit registers, 228 KB shared memory (227 KB for one program), 2048 threads,
# 32 programs; registers are allocated per warp in units of 256
SM_REGS, SM_SHARED, SM_THREADS, SM_PROGRAMS = 65536, 228 * 1024, 2048, 32


def occupancy(regs: int, shared: int, num_warps: int) -> int:
    """Programs one SM holds at once (0: the program does not fit)."""
    if shared > 227 * 1024:
        return 0
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // (per_warp * num_warps)
    by_shared = SM_SHARED // max(shared, 1)
    return min(by_regs, by_shared, SM_THREADS // (32 * num_warps), SM_PROGRAMS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN of the layer")
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--json")
    a = ap.parse_args()
    from qforge.cli.table import format_table
    from qforge.kernels import aot, tuning

    if not aot.available():
        raise SystemExit("needs triton with its NVIDIA backend tools (ptxas, cuobjdump)")
    N, K = map(int, a.shape.split("x"))
    rows = []
    for group, mode in ((128, "g128"), (0, "act-order")):
        for M in map(int, a.batches.split(",")):
            for i, c in enumerate(tuning.candidates(M, N, K, group)):
                try:
                    r = aot.matmul_report(c, M, N, K, group_size=group)
                except Exception as e:           # noqa: BLE001 - a schedule the compiler refuses is a row too
                    r = {"error": repr(e)[:120]}
                r.update(mode=mode, M=M, config=str(c), heuristic=i == 0)
                if "regs" in r:
                    r["programs_per_sm"] = occupancy(r["regs"], r["shared_static"], c.num_warps)
                rows.append(r)
    for b, search in ((128, True), (128, False), (256, True)):
        r = aot.gptq_loop_report(b, search=search)
        r.update(mode="gptq loop", M=b, config=f"block {b}, search={search}", heuristic=True,
                 programs_per_sm=occupancy(r["regs"], r["shared_static"], 8))
        rows.append(r)
    if a.json:
        with open(a.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    short = lambda s: (s.replace("KernelConfig(", "").replace("block_", "").replace("num_", "")
                       .replace("word_load", "wl").rstrip(")"))
    print(format_table(["kernel", "M", "config", "regs", "stack", "shared KB", "progs/SM", "SASS", "I2F", "STS.U16",
                        "STS.128"],
                       [[r["mode"], r["M"], ("* " if r["heuristic"] else "  ") + short(r["config"]),
                         r.get("regs", "-"), r.get("stack", "-"), round(r.get("shared_static", 0) / 1024, 1),
                         r.get("programs_per_sm", r.get("error", "-")), r.get("instructions", "-"), r.get("i2f", "-"),
                         r.get("sts16", "-"), r.get("sts128", "-")] for r in rows],
                       title=f"sm_90 resources, layer {a.shape}, fp16 activations (* the heuristic's pick)"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
