"""CPU time of the bit-packing and dequantizing paths on one large layer (70B's 28672 x 8192 gate/up shape,
W4 g128): pack_int32 and unpack_int32 of its codes, the GPTQ format's unpack (what loading a packed
checkpoint and a streamed evaluation of one run per layer), the reference kernel's dequantize_packed, and
LayerQuant.dequantize. Each timed twice (the second run reuses the allocator's memory); the best is printed.

    .venv/bin/python benchmarks/bitpack_speed.py [--out 28672 --in 8192]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/bitpack_speed.py     # another version
"""
from __future__ import annotations

import argparse
import time

import torch


def best_of(fn, n: int = 2) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import qforge
    from qforge.formats import FORMATS
    from qforge.formats.bitpack import pack_int32, unpack_int32
    from qforge.kernels.reference import dequantize_packed
    from qforge.solvers import Grid
    from qforge.solvers.rtn import rtn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=28672)
    ap.add_argument("--in", dest="in_f", type=int, default=8192)
    a = ap.parse_args()
    torch.manual_seed(0)
    q = rtn(torch.randn(a.out, a.in_f), Grid(4, 128, False))
    qweight = pack_int32(q.codes.t(), 4, dim=0)
    qzeros = pack_int32(q.zeros.t().round().to(torch.int64), 4, dim=1)
    scales = q.scales.t().half().contiguous()
    packed = FORMATS["gptq"].pack(q)
    rows = [("pack_int32 (codes, along the input)", best_of(lambda: pack_int32(q.codes.t(), 4, dim=0))),
            ("unpack_int32", best_of(lambda: unpack_int32(qweight, 4, dim=0))),
            ("formats.gptq.unpack (codes [out, in], scales, zeros)",
             best_of(lambda: FORMATS["gptq"].unpack(dict(packed), q.grid))),
            ("dequantize_packed (reference kernel, fp32)",
             best_of(lambda: dequantize_packed(qweight, qzeros, scales, q.g_idx, 4, torch.float32))),
            ("LayerQuant.dequantize", best_of(q.dequantize))]
    print(f"qforge at {qforge.__file__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"layer {a.out} x {a.in_f}, W4 g128")
    print("| operation | seconds |\n|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} |")


if __name__ == "__main__":
    main()
