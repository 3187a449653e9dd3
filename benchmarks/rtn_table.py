"""fp32 and RTN perplexity of a model on the built-in evaluation sets (W4/W3 g64, sym and asym).

    .venv/bin/python benchmarks/rtn_table.py --max-windows 2
"""
import argparse

import torch

import qforge
from qforge.cli.table import format_table

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--datasets", default="wiki,brown,news,code")
ap.add_argument("--seqlen", type=int, default=2048)
ap.add_argument("--max-windows", type=int, default=2)
ap.add_argument("--schemes", default="4:64:sym,4:64:asym,3:64:sym,3:64:asym")
a = ap.parse_args()
torch.set_num_threads(2)
ds = a.datasets.split(",")
kw = dict(datasets=ds, seqlen=a.seqlen, max_windows=a.max_windows)
rows = []
base = qforge.evaluate(qforge.load(a.model), **kw)
rows.append(["fp32", 16.0] + [r["ppl"] for r in base])
for s in a.schemes.split(","):
    bits, group, kind = s.split(":")
    m = qforge.load(a.model, qforge.QuantizeConfig(bits=int(bits), group_size=int(group), sym=kind == "sym"))
    m.quantize()
    res = qforge.evaluate(m, **kw)
    rows.append([f"RTN W{bits} g{group} {kind}", m.storage()["bits_per_weight"]] + [r["ppl"] for r in res])
    print(rows[-1], flush=True)
print(format_table(["scheme", "bits/weight"] + [f"{d} ppl" for d in ds], rows,
                   title=f"{a.model}, seqlen {a.seqlen}, first {a.max_windows} windows "
                         f"({base[0]['tokens']} tokens) of each built-in set"))
