"""Rotated quantization on SmolLM2-135M: qforge's --rotate (QuaRot's randomized Hadamard, or a random orthogonal
matrix, on the residual stream and on each head's values, folded into the weights) beside llm-compressor 0.14's
SpinQuantModifier (rotations R1 and R2, untrained, its "random-hadamard": its plain "hadamard" needs a power of
two and SmolLM2's width is 576), side by side in one run, each tool with and without its rotation. Schemes: int4
per channel (weight-only; the rotation's classic case), int3 in groups of 64, and NVFP4 W4A4 (inputs quantized too,
where outliers hurt most). Every checkpoint is written as compressed-tensors, loaded by qforge and scored by the
shared perplexity protocol.

    PYTHONPATH=. .venv-clients/bin/python benchmarks/rotation.py [--nsamples 32] [--max-windows 4] [--quick]
    PYTHONPATH=. .venv/bin/python benchmarks/rotation.py --simulated [--max-windows 4] [--datasets wiki,code]

Both tools get the same calibration samples (`builtin:mix`, 512 tokens each, seed 0) and keep lm_head unquantized;
llm-compressor runs in its own process (it patches transformers on import). `--quick`: the int4 rows only;
`--only SCHEME`: that scheme's rows.
`--simulated`: qforge's simulated weight-activation and KV-cache quantization (`qforge eval --w-bits --act-bits
--kv-bits`: RTN weights, per-token inputs, per-head keys and values) on the fp model, without and with each rotation.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from w8a8_vs_llmcompressor import llmc_run, qforge_run, side_by_side_parser   # '+spin': SpinQuant first


def main() -> None:
    ap = side_by_side_parser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="one scheme's rows (e.g. 'NVFP4 W4A4')")
    ap.add_argument("--simulated", action="store_true")
    a = ap.parse_args()
    if a.simulated:
        return simulated(a)
    torch.set_num_threads(2)
    import qforge
    from qforge.calibration import build_calibration
    from qforge.cli.table import format_table
    from qforge.config import SCHEMES

    datasets = a.datasets.split(",")
    base = qforge.load("smollm2-135m")
    samples = build_calibration("builtin:mix", base.tokenizer, a.nsamples, 512, seed=0).samples
    schemes = {"W4 per channel": ("W4C-gptq", dict(bits=4, group_size=-1)),
               "W3 g64": ("W3G64-gptq", dict(bits=3, group_size=64)),
               "NVFP4 W4A4": ("NVFP4-gptq", SCHEMES["NVFP4"])}
    if a.quick or a.only:
        schemes = {a.only: schemes[a.only]} if a.only else dict(list(schemes.items())[:1])
    runs = []
    for scheme, (mode, fields) in schemes.items():
        methods = ("rtn", "gptq") if scheme == "W4 per channel" else ("gptq",)
        for method in methods:
            for rot in (None, "hadamard", "orthogonal") if scheme == "W4 per channel" else (None, "hadamard"):
                runs.append(("qforge", scheme, f"{method.upper()}{', ' + rot if rot else ''}",
                             qforge.QuantizeConfig(**{**fields, "method": method, "rotation": rot})))
        runs += [("llm-compressor", scheme, "GPTQ", mode), ("llm-compressor", scheme, "GPTQ, SpinQuant R1+R2",
                                                            mode + "+spin")]
    rows = []

    def score(scheme, label, tool, qm, secs):
        ppl = {r["dataset"]: r["ppl"] for r in qforge.evaluate(qm, datasets, max_windows=a.max_windows)}
        rows.append([scheme, label, tool, f"{secs:.0f}" if secs is not None else "",
                     *(f"{ppl[d]:.3f}" for d in datasets)])
        print(" | ".join(rows[-1]), flush=True)

    score("fp32", "", "", base, None)
    with tempfile.TemporaryDirectory() as d:
        samples_file = Path(d) / "samples.jsonl"
        samples_file.write_text("".join(json.dumps({"input_ids": s.tolist()}) + "\n" for s in samples))
        for k, (tool, scheme, label, cfg) in enumerate(runs):
            out = Path(d) / f"{k}"
            secs = qforge_run(cfg, samples, out) if tool == "qforge" else \
                llmc_run(a.llmc_python, cfg, samples_file, out)
            if isinstance(secs, str):                                # its error
                rows.append([scheme, label, tool, "failed", *("" for _ in datasets)])
                print(" | ".join(rows[-1]), secs, flush=True)
                continue
            score(scheme, label, tool, qforge.load(out), secs)
    print(f"\nSmolLM2-135M (GGUF Q4_1 weights, dequantized), {a.nsamples} x 512 calibration tokens (builtin:mix), "
          f"perplexity on {a.max_windows} windows of 2048 tokens, evaluated by qforge\n")
    print(format_table(["scheme", "method", "tool", "s", *datasets], rows))


def simulated(a) -> None:
    import qforge
    from qforge.cli.table import format_table
    from qforge.config import SimulationConfig

    torch.set_num_threads(2)
    datasets, rows = a.datasets.split(","), []
    for sim in (dict(weight_bits=4), dict(act_bits=4), dict(weight_bits=4, act_bits=8),
                dict(weight_bits=4, act_bits=4), dict(kv_bits=4), dict(kv_bits=3)):
        for rot in (None, "hadamard", "orthogonal") if sim.get("act_bits") == 4 else (None, "hadamard"):
            cfg = SimulationConfig(**sim, rotation=rot)
            ppl = {r["dataset"]: r["ppl"] for r in qforge.evaluate("smollm2-135m", datasets, max_windows=a.max_windows,
                                                                   simulate=cfg)}
            rows.append([SimulationConfig(**sim).label, rot or "", *(f"{ppl[d]:.3f}" for d in datasets)])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, simulated RTN weights (per channel, symmetric), per-token inputs, KV per head (asymmetric), "
          f"perplexity on {a.max_windows} windows of 2048 tokens\n")
    print(format_table(["simulated", "rotation", *datasets], rows))


if __name__ == "__main__":
    main()
