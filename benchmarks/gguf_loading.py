"""Peak memory and time of reading a GGUF file: transformers' whole-model loading vs qforge's tensor-at-a-time
conversion (models/gguf.py), and a streamed pass straight from the GGUF file vs from the dense copy.

The file is SmolLM2-135M's GGUF with its 30 blocks repeated (--blocks, default 120: 453M parameters, 1.8 GB in
fp32; its Q4_1/Q8_0 bytes copied). Each variant runs in a fresh process and reports its peak resident memory
(ru_maxrss: it counts the memory-mapped GGUF pages read, up to the file's size; and the anonymous memory alone,
sampled) and time:
  transformers  from_pretrained(gguf_file=) then save_model (what qforge did before session 32)
  qforge        write_dense: one tensor in memory at a time plus the shard being filled (2 GB)
  stream-gguf   load_streamed(gguf) and every block read once (loader.loaded), as one streamed pass does
  stream-dense  the same from the qforge conversion's safetensors
The two conversions are then compared tensor by tensor (they must be equal).

    .venv/bin/python benchmarks/gguf_loading.py [--blocks 120]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from one_process_each import dispatch  # noqa: E402


def make_gguf(a) -> Path:
    from gguf_files import smollm2_blocks

    p = Path(a.work) / f"smollm2-{a.blocks}-blocks.gguf"
    if not p.is_file():
        p.parent.mkdir(parents=True, exist_ok=True)
        smollm2_blocks(p.with_suffix(".tmp"), blocks=a.blocks, vocab=None).rename(p)
    return p


class AnonPeak:
    """Peak anonymous resident memory (RssAnon, sampled every 20 ms): ru_maxrss also counts the memory-mapped
    GGUF pages read, which the kernel drops under pressure."""

    def __init__(self):
        import threading

        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.02):
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round(self.peak / 1e9, 2)


def run(a) -> dict:
    import torch

    anon = AnonPeak()
    gguf = make_gguf(a)
    out = Path(a.work) / a.worker
    t0 = time.perf_counter()
    if a.worker == "transformers":
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif a.worker == "qforge":
        from qforge.models.gguf import write_dense

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        write_dense(gguf, out)
    else:
        from qforge.models.arch import arch_spec, get_blocks
        from qforge.models.streaming import load_streamed

        lm, loader = load_streamed(str(gguf) if a.worker == "stream-gguf" else str(Path(a.work) / "qforge"))
        t0 = time.perf_counter()                      # the pass only: the tokenizer and checks are once per run
        for i, block in enumerate(get_blocks(lm.model, arch_spec(lm.model))):
            with loader.loaded(i, block):
                pass
    return {"variant": a.worker, "blocks": a.blocks, "gguf_MB": round(gguf.stat().st_size / 1e6),
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "peak_anon_GB": anon.stop(),
            "seconds": round(time.perf_counter() - t0, 1)}


def compare(a) -> None:
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        t = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                t.update({k: sf.get_tensor(k) for k in sf.keys()})
        return t

    ref, got = tensors(Path(a.work) / "transformers"), tensors(Path(a.work) / "qforge")
    # transformers' save_model keeps the tied lm_head's name, write_dense the embeddings' (both load tied)
    if "lm_head.weight" in ref and "lm_head.weight" not in got:
        ref["model.embed_tokens.weight"] = ref.pop("lm_head.weight")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    print(f"conversions: {len(ref)} tensors, {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=120)
    ap.add_argument("--work", default="/tmp/qforge-gguf-bench")
    ap.add_argument("--variants", default="transformers,qforge,stream-gguf,stream-dense")
    ap.add_argument("--worker")
    a = ap.parse_args()
    dispatch(a, run, f"SmolLM2-135M GGUF (Q4_1 linears, Q8_0 embeddings) with {a.blocks} blocks",
             a.variants.split(","))
    if not a.worker and {"transformers", "qforge"} <= set(a.variants.split(",")):
        compare(a)


if __name__ == "__main__":
    main()
