"""HQQ (half-quadratic quantization: calibration-free, its scales and zeros optimised against the weights alone)
against qforge's RTN and GPTQ on SmolLM2-135M, every model evaluated by qforge's perplexity (the shared protocol)
on the same windows.

Runs in the peers' venv (`.venv-clients`, made by scripts/setup.sh) with hqq added:
    .venv-clients/bin/pip install -c constraints.txt hqq==0.2.8.post1
    PYTHONPATH=. .venv-clients/bin/python benchmarks/hqq_side_by_side.py --max-windows 4

HQQ's weights are taken as it dequantizes them (`Quantizer.quantize` with BaseQuantizeConfig's settings: axis 1,
i.e. groups along the input as qforge's), so the table compares grids and solvers, not kernels. HQQ's fitted zero
points are fractional at every width (its `round_zero`, on by default at 4 bits, rounds only the starting zero),
so its grids are not storable in the integer-zero formats (gptq, awq, compressed-tensors).
"""
import argparse
import time

import torch

from qforge import QuantizeConfig
from qforge.calibration import build_calibration
from qforge.cli.table import format_table
from qforge.eval import load_eval_text, perplexity
from qforge.models import load_model
from qforge.pipeline import quantize_model

ap = argparse.ArgumentParser()
ap.add_argument("--datasets", default="wiki,news,code")
ap.add_argument("--seqlen", type=int, default=2048)
ap.add_argument("--max-windows", type=int, default=4)
ap.add_argument("--schemes", default="4:64,3:64,2:64", help="bits:group, all asymmetric")
ap.add_argument("--tools", default="rtn,hqq,gptq",
                help="also hqq-round-zero: HQQ's zeros started rounded at every width")
a = ap.parse_args()
torch.set_num_threads(2)


def ppl_all(model, tok):
    return [perplexity(model, tok, load_eval_text(d), a.seqlen, a.max_windows, show_progress=False)["ppl"]
            for d in a.datasets.split(",")]


def hqq(bits, group, round_zero=None):
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    lm = load_model("smollm2-135m")
    params = BaseQuantizeConfig(nbits=bits, group_size=group)["weight_quant_params"]
    if round_zero is not None:                     # the starting zero; BaseQuantizeConfig rounds it at 4 bits only
        params = dict(params, round_zero=round_zero)
    t = time.perf_counter()
    with torch.no_grad():
        for name, m in lm.model.model.layers.named_modules():
            if isinstance(m, torch.nn.Linear):
                W_q, meta = Quantizer.quantize(m.weight.data, **params, bitpack=False, compute_dtype=torch.float32,
                                               device="cpu")
                m.weight.copy_(Quantizer.dequantize(W_q, meta).reshape(m.weight.shape))
    return lm, time.perf_counter() - t


def qforge_run(method, bits, group, calib):
    lm = load_model("smollm2-135m")
    res = quantize_model(lm.model, QuantizeConfig(method=method, bits=bits, group_size=group, sym=False),
                         calib if method != "rtn" else None, show_progress=False)
    return lm, res.seconds


def main() -> None:
    tools = a.tools.split(",")
    lm = load_model("smollm2-135m")
    calib = build_calibration("builtin:mix", lm.tokenizer, 128, 512).samples if "gptq" in tools else None
    rows = [["fp32", "-", "-"] + ppl_all(lm.model, lm.tokenizer)]
    print(rows[-1], flush=True)
    for s in a.schemes.split(","):
        bits, group = (int(v) for v in s.split(":"))
        for tool in tools:
            if tool.startswith("hqq"):
                model, secs = hqq(bits, group, True if tool == "hqq-round-zero" else None)
            else:
                model, secs = qforge_run(tool, bits, group, calib)
            label = {"hqq": "HQQ 0.2.8 (no calibration)", "hqq-round-zero": "HQQ 0.2.8, zeros started rounded",
                     "rtn": "qforge RTN (no calibration)", "gptq": "qforge GPTQ (128 x 512 calibration)"}[tool]
            rows.append([label, f"W{bits} g{group} asym", f"{secs:.1f}"] + ppl_all(model.model, model.tokenizer))
            print(rows[-1], flush=True)
    ds = a.datasets.split(",")
    print(format_table(["model", "scheme", "quant s"] + [f"{d} ppl" for d in ds], rows,
                       title=f"HQQ side by side, SmolLM2-135M, seqlen {a.seqlen}, first {a.max_windows} windows per "
                             f"set"))


if __name__ == "__main__":
    main()
