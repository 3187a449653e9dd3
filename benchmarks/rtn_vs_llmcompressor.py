"""Cross-check qforge RTN against llm-compressor's QuantizationModifier (round-to-nearest) on SmolLM2-135M.

Runs in the peers' venv (shared/README.md §5), which has llm-compressor and can import qforge from
the checkout; both models are evaluated by qforge's perplexity (the shared protocol) on the same windows.
    PYTHONPATH=. /tmp/peers/bin/python benchmarks/rtn_vs_llmcompressor.py --max-windows 4
"""
import argparse
import time

import torch

from qforge import QuantizeConfig
from qforge.cli.table import format_table
from qforge.eval import load_eval_text, perplexity
from qforge.models import load_model
from qforge.pipeline import quantize_model

ap = argparse.ArgumentParser()
ap.add_argument("--datasets", default="wiki,brown,news,code")
ap.add_argument("--seqlen", type=int, default=2048)
ap.add_argument("--max-windows", type=int, default=4)
ap.add_argument("--schemes", default="4:64:sym,4:64:asym,3:64:sym,3:64:asym")
a = ap.parse_args()
torch.set_num_threads(2)


def ppl_all(model, tok):
    return [perplexity(model, tok, load_eval_text(d), a.seqlen, a.max_windows, show_progress=False)["ppl"]
            for d in a.datasets.split(",")]


def llmc_rtn(bits, group, sym):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    lm = load_model("smollm2-135m")
    scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                                                 "strategy": "group", "group_size": group}}
    t = time.perf_counter()
    oneshot(model=lm.model, recipe=QuantizationModifier(config_groups={"g0": scheme}, ignore=["lm_head"]))
    return lm, time.perf_counter() - t


def dequantized_weights(model):
    """llm-compressor keeps fp weights plus weight_scale/weight_zero_point; fake-quantize them."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight_scale") and hasattr(m, "quantization_scheme"):
            out[name] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, m.quantization_scheme.weights)
    return out


rows = []
lm = load_model("smollm2-135m")
rows.append(["fp32", "-", "-"] + ppl_all(lm.model, lm.tokenizer) + ["-"])
for s in a.schemes.split(","):
    bits, group, kind = s.split(":")
    bits, group, sym = int(bits), int(group), kind == "sym"
    q = load_model("smollm2-135m")
    res = quantize_model(q.model, QuantizeConfig(bits=bits, group_size=group, sym=sym), show_progress=False)
    ours = ppl_all(q.model, q.tokenizer)
    peer, peer_s = llmc_rtn(bits, group, sym)
    theirs_w = dequantized_weights(peer.model)
    same = sum(int(torch.equal(q.model.get_submodule(n).weight, w.to(torch.float32))) for n, w in theirs_w.items())
    maxdiff = max(float((q.model.get_submodule(n).weight - w).abs().max()) for n, w in theirs_w.items())
    theirs = ppl_all(peer.model, peer.tokenizer)
    label = f"W{bits} g{group} {kind}"
    rows.append([f"qforge RTN {label}", f"{res.seconds:.1f}", f"{same}/{len(theirs_w)} identical"] + ours + ["-"])
    rows.append([f"llm-compressor RTN {label}", f"{peer_s:.1f}", f"max |dW| {maxdiff:.2e}"] + theirs
                + [f"{max(abs(o / t - 1) for o, t in zip(ours, theirs)) * 100:.3f}%"])
    print(rows[-2], rows[-1], flush=True)
ds = a.datasets.split(",")
print(format_table(["model", "quant s", "weights vs qforge"] + [f"{d} ppl" for d in ds] + ["max ppl diff"], rows,
                   title=f"RTN cross-check, SmolLM2-135M, seqlen {a.seqlen}, first {a.max_windows} windows per set"))
