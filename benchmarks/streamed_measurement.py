"""The mixed-precision measurement in memory vs streamed (`qforge measure --stream`): peak memory, time, and
whether the numbers and the allocation planned from them agree.

A random Llama (SmolLM2's tokenizer and vocabulary; shape set by the flags) is saved once as bf16 safetensors.
Each variant measures it in a fresh process (GPTQ at every candidate scheme, end-to-end KL probes): in memory;
streamed with the default probe memory (one sweep over the model for all blocks); streamed with probe memory
for one block's probes only (a sweep per block: the most reads of the model). Peak RSS is the process's
ru_maxrss. The streamed files are then compared option by option with the in-memory one, and each is planned
at --bpw (the schemes picked must be the same).

    .venv/bin/python benchmarks/streamed_measurement.py [--layers 8 --hidden 1024 --intermediate 2816]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from one_process_each import dispatch  # noqa: E402
from streaming import make_model  # noqa: E402


def run(a) -> dict:
    import qforge
    from qforge import QuantizeConfig
    from qforge.calibration import build_calibration
    from qforge.mixed import measure_model
    from qforge.mixed.measure import probe_grids
    from qforge.mixed.schemes import candidate_grids

    src = make_model(a)
    out = Path(a.work) / f"{a.worker}.json"
    out.unlink(missing_ok=True)
    bits = tuple(int(b) for b in a.candidate_bits.split(","))
    t0 = time.perf_counter()
    m = qforge.load(str(src), stream=a.worker != "in-memory")
    samples = build_calibration("builtin:mix", m.tokenizer, a.nsamples, a.seqlen, 0).samples
    options = {}
    if a.worker == "streamed-per-block":          # room for one block's probe activations: a sweep per block
        n_probes = 7 * len(probe_grids(candidate_grids(a.hidden, "gptq", bits)))
        options = {"probe_memory": n_probes * a.probe_samples * a.seqlen * a.hidden * 4}
    if a.worker != "in-memory":
        options["weights"] = m.blocks
    t1 = time.perf_counter()
    measure_model(m.model, samples, out, QuantizeConfig(method="gptq"), "gptq", bits, show_progress=False,
                  probe_samples=a.probe_samples, **options)
    t2 = time.perf_counter()
    return {"variant": a.worker, "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "load_s": round(t1 - t0, 1), "measure_s": round(t2 - t1, 1),
            **({"probe_memory_MB": round(options["probe_memory"] / 1e6, 1)} if "probe_memory" in options else {})}


def compare(a) -> None:
    from qforge.mixed import load_measurement, plan

    ref = load_measurement(Path(a.work) / "in-memory.json")
    want = plan(ref, a.bpw).grids
    for v in ("streamed", "streamed-per-block"):
        path = Path(a.work) / f"{v}.json"
        if not path.is_file():
            continue
        got = load_measurement(path)
        worst = max(abs(o["err"] - w["err"]) / max(abs(w["err"]), 1e-30)
                    for name, d in ref["layers"].items()
                    for o, w in zip(got["layers"][name]["options"], d["options"]))
        same = plan(got, a.bpw).grids == want
        print(f"{v}: {len(got['layers'])} linears, largest relative difference of an option's KL from the "
              f"in-memory file {worst:.2e}; plan at {a.bpw} bpw {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--candidate-bits", default="2,4")
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--work", default="/tmp/qforge-streamed-measure")
    ap.add_argument("--variants", default="in-memory,streamed,streamed-per-block")
    ap.add_argument("--worker")
    a = ap.parse_args()
    dispatch(a, run, f"measurement (gptq costs, bits {a.candidate_bits}), {a.nsamples} x {a.seqlen} builtin:mix, "
             f"{a.probe_samples} probe samples; random Llama {a.layers} layers x {a.hidden} (intermediate "
             f"{a.intermediate}), bf16 on disk", a.variants.split(","))
    if not a.worker:
        compare(a)


if __name__ == "__main__":
    main()
