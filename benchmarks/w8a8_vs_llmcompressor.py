"""W8A8 (int8 per-channel weights, dynamic per-token int8 inputs) on SmolLM2-135M: qforge vs llm-compressor 0.14,
side by side, each exported as compressed-tensors int-quantized and scored by the same evaluation. `--scheme fp8`:
the same for FP8 (E4M3 per-channel weights, dynamic per-token E4M3 inputs: llm-compressor's FP8_DYNAMIC), exported
as float-quantized. `--scheme int8-static` / `fp8-static`: the inputs quantized with one calibrated scale per
linear (qforge's --act-static: the largest |x| over the calibration set, or with --act-observer mse that clipped
to the least squared error; llm-compressor's static activations: its
default observer for int8, a moving average of per-batch min/max, and for its FP8 scheme (per-tensor weights) the
max over all batches; a custom FP8 group with per-channel weights matches qforge's grid). `--scheme fp8-kv`:
FP8_DYNAMIC with an FP8 KV cache (qforge's --kv-cache fp8: each attention layer's max|k| / 448 and max|v| / 448 on
the quantized model; llm-compressor's kv_cache_scheme, float 8-bit static per tensor), beside the same weights with
the cache unquantized and with vLLM's scale-1 FP8 cache (what --kv-cache-dtype fp8 does without stored scales).
`--scheme fp8-block`: FP8 in 64 x 64 tiles, inputs per token in groups of 64 (FP8_BLOCK's layout: its preset's 128 x
128 tiles do not divide SmolLM2's width, 576 = 9 x 64, and compressed-tensors' grouped inputs need whole groups).
`--scheme nvfp4`: NVFP4A16, weight-only (E2M1 weights in groups of 16, E4M3 group scales over a global scale),
beside int4 in groups of 16 (the same group size on an integer grid). `--scheme mxfp4` / `mxfp8`: MXFP4A16 /
MXFP8A16, weight-only (E2M1 / E4M3 weights in groups of 32 with power-of-two scales); MXFP4 beside int4 in groups of
32 and NVFP4. `--scheme mxfp4-w4a4` / `mxfp8-w8a8`: MXFP4 / MXFP8, the inputs MX too (per token in groups of 32,
dynamic), and `--scheme nvfp4-w4a4`: NVFP4, the inputs NVFP4 (per token in groups of 16 under a calibrated global
scale per linear), each beside the same weights on unquantized inputs.

    PYTHONPATH=. .venv-clients/bin/python benchmarks/w8a8_vs_llmcompressor.py [--nsamples 32] [--max-windows 4] \
        [--scheme {int8,fp8,int8-static,fp8-static,fp8-kv,fp8-block,nvfp4,mxfp4,mxfp8,mxfp4-w4a4,mxfp8-w8a8,
                   nvfp4-w4a4}]

Both tools get the same calibration samples (`builtin:mix`, 512 tokens each, seed 0, as `input_ids`), keep lm_head
unquantized, write their checkpoints in fp32 (the model's dtype, which llm-compressor keeps) and run at their
defaults otherwise: qforge's GPTQ with its range search; llm-compressor's GPTQModifier (static act-order) and its
SmoothQuantModifier's default Llama mappings (norm -> q/k/v, norm -> gate/up; qforge also folds up -> down).
llm-compressor runs in its own process (it patches transformers on import). Every checkpoint is then loaded by
qforge, whose evaluation quantizes each quantized linear's input per token as vLLM's kernels do (scale max|x| / 127;
llm-compressor's own model object divides by 127.5, and with that divisor qforge reproduces its logits exactly:
tests/test_clients.py), and scored by the shared perplexity protocol; the fp32 model and the same weights on
unquantized inputs (W8A16) are the baselines.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLMC_CHILD = r"""
import json, sys, time
import torch


def main():
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    src, samples_file, mode, out = sys.argv[1:5]
    mode, _, rotate = mode.partition("+")                     # "+spin": its SpinQuant R1 + R2 first (rotation.py)
    samples = [json.loads(line)["input_ids"] for line in open(samples_file)]
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    if mode == "rtn":
        recipe = [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    elif mode == "fp8-rtn":
        recipe = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    elif mode == "fp8-gptq":
        recipe = [GPTQModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    elif mode in ("fp8-kv-rtn", "fp8-kv-gptq"):               # FP8_DYNAMIC and an FP8 KV cache (its kv example's)
        Modifier = GPTQModifier if mode.endswith("gptq") else QuantizationModifier
        kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        recipe = [Modifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"], kv_cache_scheme=kv)]
    elif mode in ("W4C-gptq", "W3G64-gptq"):                 # int weight-only: 4 bits per channel, 3 in groups of 64
        w = {"num_bits": int(mode[1]), "type": "int", "symmetric": True,
             **({"strategy": "channel"} if mode[2] == "C" else {"strategy": "group", "group_size": 64})}
        recipe = [GPTQModifier(config_groups={"g0": {"targets": ["Linear"], "weights": w}}, ignore=["lm_head"])]
    elif mode.startswith(("NVFP4", "MXFP")):                 # a preset by name: NVFP4A16-gptq, MXFP4-rtn...
        Modifier = GPTQModifier if mode.endswith("gptq") else QuantizationModifier
        recipe = [Modifier(targets="Linear", scheme=mode.rpartition("-")[0], ignore=["lm_head"])]
    elif mode in ("fp8-block-rtn", "fp8-block-gptq"):          # FP8_BLOCK's scheme in 64 x 64 tiles
        Modifier = GPTQModifier if mode.endswith("gptq") else QuantizationModifier
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
        group = {"targets": ["Linear"], "weights": {**fp8, "strategy": "block", "block_structure": [64, 64]},
                 "input_activations": {**fp8, "strategy": "group", "group_size": 64, "dynamic": True}}
        recipe = [Modifier(config_groups={"g0": group}, ignore=["lm_head"])]
    elif mode in ("fp8-static-rtn", "fp8-static-gptq"):        # its FP8 scheme: per-tensor weights and inputs
        Modifier = GPTQModifier if mode.endswith("gptq") else QuantizationModifier
        recipe = [Modifier(targets="Linear", scheme="FP8", ignore=["lm_head"])]
    elif mode in ("static-rtn", "static-sq-gptq", "fp8-static-channel-rtn"):   # static per-tensor inputs
        kind = "float" if mode.startswith("fp8") else "int"
        group = {"targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel"},
                 "input_activations": {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "tensor",
                                       "dynamic": False}}
        recipe = [QuantizationModifier(config_groups={"g0": group}, ignore=["lm_head"])] if mode.endswith("rtn") \
            else [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(config_groups={"g0": group}, ignore=["lm_head"])]
    else:
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if rotate:                                               # its plain "hadamard" needs a power-of-two width
        from llmcompressor.modifiers.transform import SpinQuantModifier
        recipe = [SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard")] + recipe
    t = time.perf_counter()
    oneshot(model=m, dataset=ds, recipe=recipe, max_seq_length=len(samples[0]), num_calibration_samples=len(samples),
            shuffle_calibration_samples=False)
    secs = time.perf_counter() - t
    m.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    print("RESULT " + json.dumps({"seconds": secs}))


if __name__ == "__main__":
    main()
"""


def qforge_run(cfg, samples, out: Path) -> float:
    import qforge

    m = qforge.load("smollm2-135m", cfg)
    t = time.perf_counter()
    m.quantize(samples if cfg.needs_calibration else None)
    secs = time.perf_counter() - t
    m.export(out, "compressed-tensors", dtype=torch.float32)        # as llm-compressor saves an fp32 model
    return secs


def llmc_run(python: str, mode: str, samples_file: Path, out: Path) -> float | str:
    """llm-compressor's run of `mode` (LLMC_CHILD) on SmolLM2 in its own process, saved to `out`: its seconds, or
    the last line of its error."""
    from qforge.models.loading import resolve_model

    p = subprocess.run([python, "-c", LLMC_CHILD, str(resolve_model("smollm2-135m")), str(samples_file), mode,
                        str(out)], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:])["seconds"] if line else (p.stderr.strip().splitlines() or ["?"])[-1]


def side_by_side_parser() -> argparse.ArgumentParser:
    """The options every SmolLM2 side-by-side script here takes: calibration size, evaluation windows and sets, and
    the Python that runs llm-compressor."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--datasets", default="wiki,news,brown,code")
    ap.add_argument("--llmc-python", default=sys.executable)
    return ap


def main() -> None:
    ap = side_by_side_parser()
    ap.add_argument("--scheme", choices=("int8", "fp8", "int8-static", "fp8-static", "fp8-kv", "fp8-block", "nvfp4",
                                         "mxfp4", "mxfp8", "mxfp4-w4a4", "mxfp8-w8a8", "nvfp4-w4a4"), default="int8")
    a = ap.parse_args()
    torch.set_num_threads(2)
    import qforge
    from qforge.calibration import build_calibration
    from qforge.cli.table import format_table

    datasets = a.datasets.split(",")
    base = qforge.load("smollm2-135m")
    samples = build_calibration("builtin:mix", base.tokenizer, a.nsamples, 512, seed=0).samples
    w8a8 = dict(bits=8, group_size=-1, sym=True, act_bits=8)
    fp8 = a.scheme.startswith("fp8")
    static = dict(act_static=True)
    if a.scheme == "int8-static":
        mse = dict(act_static=True, act_observer="mse")
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", **static, **w8a8)),
                ("qforge", "RTN, mse observer", qforge.QuantizeConfig(method="rtn", **mse, **w8a8)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", **static, **w8a8)),
                ("qforge", "GPTQ, mse observer", qforge.QuantizeConfig(method="gptq", **mse, **w8a8)),
                ("qforge", "SmoothQuant 0.8 + GPTQ", qforge.QuantizeConfig(method="gptq", smoothquant=0.8, **static,
                                                                           **w8a8)),
                ("qforge", "SmoothQuant 0.8 + GPTQ, mse observer", qforge.QuantizeConfig(
                    method="gptq", smoothquant=0.8, **mse, **w8a8)),
                ("llm-compressor", "RTN", "static-rtn"),
                ("llm-compressor", "SmoothQuant 0.8 + GPTQ", "static-sq-gptq")]
    elif a.scheme == "fp8-static":
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", fp8=True, **static, **w8a8)),
                ("qforge", "RTN, mse observer", qforge.QuantizeConfig(method="rtn", fp8=True, act_observer="mse",
                                                                      **static, **w8a8)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", fp8=True, **static, **w8a8)),
                ("llm-compressor", "RTN", "fp8-static-channel-rtn"),
                ("llm-compressor", "RTN, per-tensor weights (its FP8 scheme)", "fp8-static-rtn"),
                ("llm-compressor", "GPTQ, per-tensor weights (its FP8 scheme)", "fp8-static-gptq")]
    elif a.scheme == "fp8-kv":
        kv = dict(fp8=True, kv_cache="fp8")
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", **kv, **w8a8)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", **kv, **w8a8)),
                ("llm-compressor", "RTN", "fp8-kv-rtn"),
                ("llm-compressor", "GPTQ", "fp8-kv-gptq")]
    elif a.scheme == "nvfp4":
        preset, nvfp4 = "NVFP4A16", dict(bits=4, group_size=16, sym=True)
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", nvfp4=True, **nvfp4)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", nvfp4=True, **nvfp4)),
                ("llm-compressor", "RTN", "NVFP4A16-rtn"),
                ("llm-compressor", "GPTQ", "NVFP4A16-gptq"),
                ("qforge", "int W4 g16 sym RTN", qforge.QuantizeConfig(method="rtn", **nvfp4)),
                ("qforge", "int W4 g16 sym GPTQ", qforge.QuantizeConfig(method="gptq", **nvfp4))]
    elif a.scheme.startswith("mxfp") or a.scheme == "nvfp4-w4a4":
        preset = a.scheme.split("-")[0].upper() + ("" if "-w" in a.scheme else "A16")   # MXFP4 (W4A4), MXFP4A16
        runs = [("qforge", "RTN", qforge.QuantizeConfig.from_scheme(preset, method="rtn")),
                ("qforge", "GPTQ", qforge.QuantizeConfig.from_scheme(preset, method="gptq")),
                ("llm-compressor", "RTN", f"{preset}-rtn"),
                ("llm-compressor", "GPTQ", f"{preset}-gptq")]
        if a.scheme == "mxfp4":
            runs += [("qforge", "int W4 g32 sym RTN", qforge.QuantizeConfig(method="rtn", bits=4, group_size=32)),
                     ("qforge", "int W4 g32 sym GPTQ", qforge.QuantizeConfig(method="gptq", bits=4, group_size=32)),
                     ("qforge", "NVFP4A16 GPTQ", qforge.QuantizeConfig.from_scheme("NVFP4A16", method="gptq"))]
    elif a.scheme == "fp8-block":
        block = dict(fp8=True, fp8_block=True, **{**w8a8, "group_size": 64})
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", **block)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", **block)),
                ("qforge", "GPTQ static groups", qforge.QuantizeConfig(method="gptq", static_groups=True, **block)),
                ("llm-compressor", "RTN", "fp8-block-rtn"),
                ("llm-compressor", "GPTQ", "fp8-block-gptq"),
                ("qforge", "FP8 W8A8 per channel (FP8_DYNAMIC) RTN",
                 qforge.QuantizeConfig(method="rtn", fp8=True, **w8a8))]
    elif fp8:
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", fp8=True, **w8a8)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", fp8=True, **w8a8)),
                ("qforge", "GPTQ act-order", qforge.QuantizeConfig(method="gptq", fp8=True, act_order=True, **w8a8)),
                ("llm-compressor", "RTN", "fp8-rtn"),
                ("llm-compressor", "GPTQ", "fp8-gptq")]
    else:
        runs = [("qforge", "RTN", qforge.QuantizeConfig(method="rtn", **w8a8)),
                ("qforge", "GPTQ", qforge.QuantizeConfig(method="gptq", **w8a8)),
                ("qforge", "SmoothQuant 0.8 + GPTQ", qforge.QuantizeConfig(method="gptq", smoothquant=0.8, **w8a8)),
                ("llm-compressor", "RTN", "rtn"),
                ("llm-compressor", "SmoothQuant 0.8 + GPTQ", "sq-gptq")]
    name = ("FP8 W8A8" if fp8 else "W8A8") + (" static" if a.scheme.endswith("static") else "") + \
        (", FP8 KV cache" if a.scheme == "fp8-kv" else "") + (" 64x64 blocks" if a.scheme == "fp8-block" else "")
    if a.scheme in ("nvfp4", "mxfp4", "mxfp8"):
        name = a.scheme.upper() + "A16"
    elif "-w" in a.scheme:
        name = a.scheme.split("-")[0].upper() + f" ({a.scheme.split('-')[1].upper()})"
    rows, kv_scales = [], {}

    def score(label, tool, qm, secs, simulate=None):
        ppl = {r["dataset"]: r["ppl"] for r in qforge.evaluate(qm, datasets, max_windows=a.max_windows,
                                                               simulate=simulate)}
        rows.append([label, tool, f"{secs:.0f}" if secs is not None else "", *(f"{ppl[d]:.3f}" for d in datasets)])
        print(" | ".join(rows[-1]), flush=True)

    score("fp32", "", base, None)
    with tempfile.TemporaryDirectory() as d:
        samples_file = Path(d) / "samples.jsonl"
        samples_file.write_text("".join(json.dumps({"input_ids": s.tolist()}) + "\n" for s in samples))
        for k, (tool, label, cfg) in enumerate(runs):
            out = Path(d) / f"{k}"
            secs = qforge_run(cfg, samples, out) if tool == "qforge" else \
                llmc_run(a.llmc_python, cfg, samples_file, out)
            if isinstance(secs, str):
                rows.append([label, tool, "failed: " + secs])
                continue
            qm = qforge.load(out)
            if a.scheme.startswith(("nvfp4", "mxfp")):   # the preset's grid and inputs, or the row's own grid
                own, want = label.startswith(("int", "NVFP4")), qforge.QuantizeConfig.from_scheme(preset)
                grids = {q.grid for q in qm.result.layers.values()}
                acts = None if own else want.input_scheme
                assert len(grids) == 1 and qm.input_scheme == acts, f"{out}: not {label}"
                assert own or next(iter(grids)) == want.grid, f"{out}: not {name}"
                score(label if own else f"{name} {label}", tool, qm, secs)
                if qm.input_scheme is not None and k == 0:      # the same weights on unquantized inputs
                    qm.packed_inputs = None
                    score(f"{name} {label}, the weights on unquantized inputs", tool, qm, None)
                continue
            assert qm.act_bits == 8 and qm.act_fp8 == fp8, f"{out}: not a {name} checkpoint"
            assert (qm.input_scales is not None) == a.scheme.endswith("static"), f"{out}: not a {name} checkpoint"
            assert (qm.kv_scales is not None) == (a.scheme == "fp8-kv"), f"{out}: not a {name} checkpoint"
            score(label if label.startswith(("FP8", "int")) else f"{name} {label}", tool, qm, secs)
            if qm.kv_scales is not None and label == "RTN":   # the same model, its cache unquantized / at scale 1
                kv_scales[tool] = qm.kv_scales
                qm.result.kv_scales = {}
                score(f"FP8 W8A8 {label}, KV cache unquantized", tool, qm, None)
                score(f"FP8 W8A8 {label}, FP8 KV cache at scale 1 (no stored scales)", tool, qm, None,
                      qforge.SimulationConfig(kv_bits=8, kv_fp8=True))
            elif k == 0:                             # the same weights on unquantized inputs
                qm.packed_inputs = None
                for q in qm.result.layers.values():
                    q.input_scale = None
                score(f"{'FP8 ' if fp8 else ''}W8A16 (the RTN weights, fp inputs)", tool, qm, None)
    print(f"\n## {name} on SmolLM2-135M: {a.nsamples} x 512 calibration tokens (builtin:mix), perplexity on the first "
          f"{a.max_windows} windows of 2048 tokens, evaluated by qforge\n")
    print(format_table(["scheme", "tool", "quantize s", *(f"{d} ppl" for d in datasets)], rows))
    if len(kv_scales) == 2:                          # the two tools' RTN scales, layer by layer
        ours, theirs = kv_scales["qforge"], kv_scales["llm-compressor"]
        ratio = torch.tensor([float(ours[n] / theirs[n]) for n in sorted(ours)])
        print(f"\nKV scales, qforge / llm-compressor over {len(ratio)} tensors: min {ratio.min():.4f}, median "
              f"{ratio.median():.4f}, max {ratio.max():.4f}; qforge's k_scale range "
              f"{min(float(v) for n, v in ours.items() if n.endswith('k_scale')):.2e}.."
              f"{max(float(v) for n, v in ours.items() if n.endswith('k_scale')):.2e}, v_scale "
              f"{min(float(v) for n, v in ours.items() if n.endswith('v_scale')):.2e}.."
              f"{max(float(v) for n, v in ours.items() if n.endswith('v_scale')):.2e}")


if __name__ == "__main__":
    main()
