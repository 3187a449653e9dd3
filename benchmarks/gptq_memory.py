"""Peak memory of one GPTQ solve (solvers.gptq) beyond its inputs, on a layer shaped like a 70B down projection.

    .venv/bin/python benchmarks/gptq_memory.py [--out 8192] [--in 28672] [--act-order] [--keep-h]

W [out, in] and H [in, in] (fp32, random, H positive definite) are made first; the solve's extra peak is the
process's VmHWM after the solve minus its VmRSS before it, in GB and in units of one [in, in] fp32 matrix (the
Hessian's size: 3.3 GB at in = 28672). H is handed over to the solve as the pipeline does (the script keeps no
reference, so GPTQ frees it once factored); --keep-h keeps it alive through the solve (as a measurement, which
solves one H on several grids, does). To measure another version of qforge, put its checkout first on
PYTHONPATH. Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch


def _status(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=8192)
    ap.add_argument("--in", dest="in_f", type=int, default=28672)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--keep-h", action="store_true", help="keep a reference to H through the solve")
    a = ap.parse_args()
    import qforge
    from qforge.solvers import Grid, gptq

    torch.manual_seed(0)
    W = torch.randn(a.out, a.in_f) * 0.02
    X = torch.randn(a.in_f // 4, a.in_f)                  # rank in/4, damping makes H + λI definite
    hold = [X.T @ X]                                       # H, in a list the call can be handed it from
    del X
    kept = hold[0] if a.keep_h else None
    Path("/proc/self/clear_refs").write_text("5")          # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t = time.perf_counter()
    q = gptq(W, hold, Grid(4, 128, False), act_order=a.act_order)     # handed over: gptq empties the list
    seconds = time.perf_counter() - t
    extra = _status("VmHWM") - before
    h = a.in_f * a.in_f * 4 / 1e9
    del kept
    print(f"qforge at {Path(qforge.__file__).parent.parent}: W [{a.out}, {a.in_f}], act_order={a.act_order}, "
          f"H {'kept' if a.keep_h else 'handed over'}: "
          f"solve {seconds:.0f} s, peak beyond the inputs {extra:.2f} GB = {extra / h:.2f} x H ({h:.2f} GB); "
          f"loss {q.info['loss']:.6g}")


if __name__ == "__main__":
    main()
