"""qforge GPTQ / AWQ vs llm-compressor (GPTQModifier, AWQModifier) vs gptqmodel vs qforge RTN, side by side,
on SmolLM2-135M.

Every tool gets the same calibration samples (128 x 512 `input_ids` from the built-in Brown split,
written to a JSONL first), keeps lm_head unquantized, and is evaluated by qforge's perplexity (the
shared protocol) after its dequantized fp32 weights are copied into the same dense model. Each run is
its own process, so peak RSS is per tool. Run it in the peers' venv (shared/README.md §5), or in
`.venv-clients/bin/python`, which scripts/setup.sh builds with the same peer versions over qforge's venv:

    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=. /tmp/peers/bin/python benchmarks/gptq_vs_peers.py \
        --max-windows 2 --datasets wiki,brown,news,code
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {  # name -> (bits, group, act_order, sym)
    "fp32": (16, -1, False, True),
    "W4g64": (4, 64, False, True),
    "W3g64": (3, 64, False, True),
    "W2g32": (2, 32, False, True),
    "W4g64-actorder": (4, 64, True, True),
    "W3g64-actorder": (3, 64, True, True),
    "W2g32-actorder": (2, 32, True, True),
    "W4g64-asym": (4, 64, False, False),
    "W3g64-asym": (3, 64, False, False),
}
# qforge-gptq[-static][-nts]: static groups; nts = not true-sequential (one statistics pass per block);
# qforge-gptq-gar: group-aware order (act_group_aware; gptqmodel's default for GPTQ). qforge-gptq is the plain
# column order; qforge-awq+gptq keeps qforge's defaults (group-aware order since session 14; no AWQ clip with
# the range search since session 17); -noclip / -clip: AWQ scales without / with the clipping search;
# -minmax: GPTQ with plain min-max group ranges (no scale search; the default before session 16); -bf16 / -fp32: calibration passes in bfloat16 / float32 (compute_dtype; bf16 was
# the default in sessions 17-37, fp32 before; since session 38 "auto": bf16 where native, else fp32); llmcompressor-bf16: the model cast to bf16 first, as a bf16
# checkpoint loads; -gptaq / gptqmodel-gptaq: GPTAQ (GPTQv2) at --gptaq-alpha (0.25, GPTQModel's default)
TOOLS = ("qforge-rtn", "qforge-gptq", "qforge-gptq-gar", "qforge-gptq-gar-bf16", "qforge-gptq-gar-fp32", "qforge-gptq-bf16", "qforge-gptq-gar-minmax", "qforge-gptq-minmax", "qforge-gptq-static", "qforge-gptq-static-nts", "llmcompressor", "llmcompressor-bf16",
         "gptqmodel", "gptqmodel-mse", "qforge-gptq-gar-gptaq", "gptqmodel-gptaq",
         "qforge-awq", "qforge-awq+gptq", "llmcompressor-awq", "qforge-awq-noclip", "qforge-awq+gptq-noclip", "qforge-awq+gptq-clip")
AWQ_TOOLS = ("qforge-awq", "qforge-awq+gptq", "llmcompressor-awq", "qforge-awq-noclip", "qforge-awq+gptq-noclip", "qforge-awq+gptq-clip")


def wanted(tool: str, config: str) -> bool:
    """fp32 is one baseline run; act-order means nothing to RTN; asym rows are RTN's (issue 2 table)."""
    if config == "fp32":
        return tool == "qforge-rtn"
    if config.endswith("asym"):  # asymmetric rows: RTN, AWQ (AutoAWQ's zero point) and plain GPTQ
        return tool in ("qforge-rtn", "qforge-gptq", "qforge-gptq-gar", "qforge-gptq-gar-minmax") + AWQ_TOOLS
    if tool in AWQ_TOOLS:
        return False
    if CONFIGS[config][2]:  # act-order: RTN has no column order, group-aware order is the other order
        return tool != "qforge-rtn" and "-gar" not in tool
    return True


def calib_file(path: Path) -> Path:
    if not path.exists():
        from qforge.calibration import build_calibration, save_samples_jsonl
        from qforge.models import load_model

        tok = load_model("smollm2-135m").tokenizer
        save_samples_jsonl(build_calibration("builtin:brown", tok, 128, 512, seed=0).samples, path)
    return path


def run_qforge(method, bits, group, act_order, sym, samples, static_groups=False, true_sequential=True,
               group_aware=False, awq_clip=None, damp=0.01, scale_search=None, compute_dtype=None, gptaq=None):
    from qforge import QuantizeConfig
    from qforge.models import load_model
    from qforge.pipeline import quantize_model

    lm = load_model("smollm2-135m")
    t = time.perf_counter()
    if bits < 16:
        quantize_model(lm.model, QuantizeConfig(method=method, bits=bits, group_size=group, sym=sym,
                                                act_order=act_order, static_groups=static_groups,
                                                true_sequential=true_sequential, act_group_aware=group_aware,
                                                awq_clip=awq_clip, damp=damp,
                                                scale_search=scale_search, gptaq=gptaq,
                                                **({"compute_dtype": compute_dtype} if compute_dtype else {})),
                       samples, show_progress=False)
    return time.perf_counter() - t, {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def run_llmcompressor(bits, group, act_order, samples, dtype=torch.float32):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    from qforge.models import load_model

    lm = load_model("smollm2-135m")
    lm.model.to(dtype)   # bf16: the model as a bf16 checkpoint would load (its forward passes in bf16)
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * len(s) for s in samples]})
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    # GPTQModifier.actorder defaults to "static" (columns by Hessian diagonal, groups fixed in column order)
    # and overrides a config group's None, so it must be set on the modifier itself
    recipe = GPTQModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          actorder="static" if act_order else None)
    t = time.perf_counter()
    oneshot(model=lm.model, dataset=ds, recipe=recipe, max_seq_length=512, num_calibration_samples=len(samples),
            shuffle_calibration_samples=False)
    secs = time.perf_counter() - t
    state = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    for name, m in lm.model.named_modules():
        if hasattr(m, "weight_scale"):  # static act-order keeps groups in column order: no g_idx
            state[f"{name}.weight"] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point,
                                                    m.quantization_scheme.weights).float()
    return secs, state


def run_llmcompressor_awq(bits, group, samples):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    from qforge.models import load_model

    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # peer bug on CPU-only torch (issue 4); benchmark only
    lm = load_model("smollm2-135m")
    ds = Dataset.from_dict({"input_ids": [s.tolist() for s in samples],
                            "attention_mask": [[1] * len(s) for s in samples]})
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}
    recipe = [AWQModifier(duo_scaling=True),
              QuantizationModifier(config_groups={"g0": {"targets": ["Linear"], "weights": weights}},
                                   ignore=["lm_head"])]
    t = time.perf_counter()
    oneshot(model=lm.model, dataset=ds, recipe=recipe, max_seq_length=len(samples[0]),
            num_calibration_samples=len(samples), shuffle_calibration_samples=False)
    secs = time.perf_counter() - t
    state = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    for name, m in lm.model.named_modules():
        if hasattr(m, "weight_scale"):
            state[f"{name}.weight"] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point,
                                                    m.quantization_scheme.weights).float()
    return secs, state


def run_gptqmodel(bits, group, act_order, samples, mse=0.0, gptaq=None):
    from gptqmodel import GPTQModel, QuantizeConfig

    from qforge.models.loading import resolve_model
    from qforge.models.packed import load_packed

    dense = resolve_model("smollm2-135m")
    # offload_to_disk=False: its default lazy loader fails on CPU here (meta tensors in the mask)
    # mse > 0: its range search (the GPTQ reference code's `mse` option, norm 2.4 over 80 shrink points); off by default
    model = GPTQModel.load(str(dense), QuantizeConfig(bits=bits, group_size=group, sym=True, desc_act=act_order,
                                                      offload_to_disk=False, mse=mse,
                                                      **({"gptaq": {"alpha": gptaq, "device": "cpu"}} if gptaq else {})),
                           device="cpu", dtype=torch.float32)
    rows = [{"input_ids": s.tolist()} for s in samples]
    t = time.perf_counter()
    model.quantize(rows)
    secs = time.perf_counter() - t
    # its packed CPU modules cannot simply be cast to fp32 and run (ppl ~1e9 that way): save the checkpoint
    # and read it back with qforge's gptq reader, which also checks that qforge loads what gptqmodel writes
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        layers = load_packed(tmp)[2]
    return secs, {f"{name}.weight": q.dequantize() for name, q in layers.items()}


def worker(args) -> None:
    from qforge.calibration import load_samples_jsonl
    from qforge.eval import load_eval_text, perplexity
    from qforge.models import load_model

    torch.set_num_threads(2)
    bits, group, act_order, sym = CONFIGS[args.config]
    samples = load_samples_jsonl(args.calib)[: args.nsamples or None]
    if args.tool == "llmcompressor-awq":
        secs, state = run_llmcompressor_awq(bits, group, samples)
    elif args.tool.startswith("qforge"):
        flags = set(args.tool.split("-")[2:])
        secs, state = run_qforge(args.tool.split("-")[1], bits, group, act_order, sym, samples,
                                 static_groups="static" in flags, true_sequential="nts" not in flags,
                                 group_aware=None if "awq+gptq" in args.tool else "gar" in flags,
                                 awq_clip=False if "noclip" in flags else True if "clip" in flags else None,
                                 damp=args.qforge_damp,
                                 scale_search=False if "minmax" in flags else None,
                                 compute_dtype="bfloat16" if "bf16" in flags else "float32" if "fp32" in flags else None,
                                 gptaq=args.gptaq_alpha if "gptaq" in flags else None)
    elif args.tool in ("llmcompressor", "llmcompressor-bf16"):
        secs, state = run_llmcompressor(bits, group, act_order, samples,
                                        torch.bfloat16 if args.tool.endswith("bf16") else torch.float32)
    else:
        secs, state = run_gptqmodel(bits, group, act_order, samples, mse=2.4 if args.tool.endswith("-mse") else 0.0,
                                    gptaq=args.gptaq_alpha if args.tool.endswith("-gptaq") else None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lm = load_model("smollm2-135m")
    changed = 0
    params = dict(lm.model.named_parameters())  # dequantized weights: copy them into a fresh dense model
    with torch.no_grad():
        for n, w in state.items():
            if n in params and n.endswith("weight") and ".layers." in n:
                changed += int(not torch.equal(params[n], w.to(params[n].dtype)))
                params[n].copy_(w)
    if bits < 16 and not changed:
        raise SystemExit(f"{args.tool} {args.config}: no decoder linear changed; the tool's weights were not read")
    model = lm.model
    ppl = {d: perplexity(model, lm.tokenizer, load_eval_text(d), args.seqlen, args.max_windows,
                         show_progress=False)["ppl"] for d in args.datasets.split(",")}
    extra = {"damp": args.qforge_damp} if args.tool.startswith("qforge") and args.qforge_damp != 0.01 else {}
    if args.tool.endswith("-gptaq"):
        extra["gptaq_alpha"] = args.gptaq_alpha
    print("RESULT " + json.dumps({"tool": args.tool, "config": args.config, **extra, "seconds": secs, "peak_rss_mb": rss,
                                  "changed_linears": changed, "ppl": ppl}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="wiki,brown,news,code")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--calib", type=Path, default=Path("benchmarks/results/brown_128x512.jsonl"))
    ap.add_argument("--nsamples", type=int, default=0, help="use the first N samples of --calib (0: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gptq_vs_peers.jsonl"))
    ap.add_argument("--qforge-damp", type=float, default=0.01, help="qforge's GPTQ damping (gptqmodel's default is 0.05)")
    ap.add_argument("--gptaq-alpha", type=float, default=0.25, help="the -gptaq tools' alpha (GPTQModel's default)")
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "CONFIG"))
    a = ap.parse_args()
    if a.worker:
        a.tool, a.config = a.worker
        return worker(a)
    calib_file(a.calib)
    results = []
    for config in a.configs.split(","):
        for tool in a.tools.split(","):
            if not wanted(tool, config):
                continue
            cmd = [sys.executable, __file__, "--worker", tool, config, "--calib", str(a.calib), "--nsamples", str(a.nsamples), "--datasets",
                   a.datasets, "--seqlen", str(a.seqlen), "--max-windows", str(a.max_windows), "--qforge-damp", str(a.qforge_damp),
                   "--gptaq-alpha", str(a.gptaq_alpha)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH="."))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{tool} {config} FAILED:\n{p.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[0][7:])
            results.append(r)
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{config:16s} {tool:14s} {r['seconds']:8.1f}s {r['peak_rss_mb']:7.0f}MB "
                  + " ".join(f"{d}={v:.3f}" for d, v in r["ppl"].items()), flush=True)
    from qforge.cli.table import format_table

    ds = a.datasets.split(",")
    print(format_table(["config", "tool", "quant s", "peak RSS MB"] + [f"{d} ppl" for d in ds],
                       [[r["config"], r["tool"], round(r["seconds"], 1), round(r["peak_rss_mb"])]
                        + [r["ppl"][d] for d in ds] for r in results],
                       title=f"side by side, SmolLM2-135M, calib {a.nsamples or 128}x512 Brown, eval seqlen {a.seqlen} x "
                             f"first {a.max_windows} windows"))


if __name__ == "__main__":
    main()
