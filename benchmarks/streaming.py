"""Peak memory of quantizing a model in memory vs streamed (`--stream`: one decoder block at a time).

A random Llama-shaped model (TinyLlama-1.1B's shape by default, SmolLM2's tokenizer and vocabulary) is saved
once as bf16 safetensors; each variant then quantizes it in a fresh process (GPTQ, built-in calibration),
saves the qforge output and exports it, and reports its peak resident memory (ru_maxrss) and times. The
two outputs are then compared tensor by tensor (they must be equal).

    .venv/bin/python benchmarks/streaming.py [--layers 22 --hidden 2048 --intermediate 5632]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from one_process_each import dispatch  # noqa: E402


def make_model(a) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qforge.models.loading import resolve_model

    d = Path(a.work) / f"llama-{a.layers}x{a.hidden}x{a.intermediate}"
    if (d / "config.json").is_file():
        return d
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=4,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = d.with_name(d.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(d)
    return d


def run(a) -> dict:
    import qforge
    from qforge import QuantizeConfig

    src = make_model(a)
    out = Path(a.work) / a.worker
    for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + "-gptq")):
        shutil.rmtree(p, ignore_errors=True)
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=128)
    t0 = time.perf_counter()
    m = qforge.load(str(src), cfg, stream=a.worker == "streamed")
    t1 = time.perf_counter()
    m.quantize("builtin:mix", nsamples=a.nsamples, seqlen=a.seqlen, resume=out.with_name(out.name + ".partial"))
    t2 = time.perf_counter()
    m.save(out)
    t3 = time.perf_counter()
    m.export(out.with_name(out.name + "-gptq"), "gptq")
    t4 = time.perf_counter()
    params = sum(p.numel() for p in m.model.parameters())
    return {"variant": a.worker, "params": params, "fp32_GB": round(params * 4 / 1e9, 2),
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "load_s": round(t1 - t0, 1), "quantize_s": round(t2 - t1, 1), "save_s": round(t3 - t2, 1),
            "export_s": round(t4 - t3, 1)}


def compare(a) -> None:
    import torch
    from safetensors import safe_open

    def tensors(d: Path):
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    yield f"{'q:' if f.name.startswith('qforge_quant') else ''}{k}", f, k

    for suffix in ("", "-gptq"):
        ref = {name: (f, k) for name, f, k in tensors(Path(a.work) / f"in-memory{suffix}")}
        got = {name: (f, k) for name, f, k in tensors(Path(a.work) / f"streamed{suffix}")}
        same = ref.keys() == got.keys()
        for name in ref if same else []:
            with safe_open(str(ref[name][0]), "pt") as x, safe_open(str(got[name][0]), "pt") as y:
                same = same and torch.equal(x.get_tensor(ref[name][1]), y.get_tensor(got[name][1]))
        print(f"outputs{suffix or ' (qforge)'}: {len(ref)} tensors, {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--work", default="/tmp/qforge-streaming-bench")
    ap.add_argument("--variants", default="in-memory,streamed",
                    help="which to run (an earlier run's output of the other stays in --work for the comparison)")
    ap.add_argument("--worker")
    a = ap.parse_args()
    dispatch(a, run, f"GPTQ W4 g128, {a.nsamples} x {a.seqlen} builtin:mix, random Llama {a.layers} layers x "
             f"{a.hidden} (intermediate {a.intermediate}), bf16 on disk", a.variants.split(","))
    if not a.worker:
        compare(a)


if __name__ == "__main__":
    main()
