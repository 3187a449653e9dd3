"""Where a streamed run's memory goes: RssAnon / RssFile peaks (from /proc/self/status, sampled every 0.2 s)
in each stage of one streamed run (load, quantize, save, export), and the process's VmHWM at the end.

    .venv/bin/python benchmarks/streaming_memory_probe.py MODEL_DIR [--method rtn] [--nsamples 4] [--packed-only]
        [--where-peak]

MODEL_DIR: e.g. the random model benchmarks/streaming.py saves under /tmp/qforge-streaming-bench/, or a
one-block one from `benchmarks/larger_than_ram.py --layers 1 --steps none`. It also prints the run state's size
after quantizing. To measure another version of qforge with the same driver, put its checkout first on
PYTHONPATH (without --packed-only if that version cannot export before saving). Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import sys
import threading
import time
import traceback
from pathlib import Path


def _status(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--packed-only", action="store_true", help="export from the run state, without saving")
    ap.add_argument("--where-peak", action="store_true",
                    help="also print the main thread's qforge stack at the highest RssAnon sample")
    a = ap.parse_args()
    stage, peaks, top = ["start"], {}, [0.0, ""]
    main_id = threading.get_ident()

    def sample():
        while True:
            anon, file = _status("RssAnon"), _status("RssFile")
            p = peaks.get(stage[0], (0.0, 0.0))
            peaks[stage[0]] = (max(p[0], anon), max(p[1], file))
            if a.where_peak and anon > top[0]:
                frames = traceback.extract_stack(sys._current_frames()[main_id])
                top[:] = [anon, "\n".join(f"  {f.filename.split('/qforge/')[-1]}:{f.lineno} {f.name}"
                                          for f in frames if "/qforge/" in f.filename)]
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    import qforge
    from qforge import QuantizeConfig

    work = Path(tempfile.mkdtemp(prefix="qforge-probe-"))
    try:
        stage[0] = "load"
        m = qforge.load(a.model, QuantizeConfig(method=a.method, bits=4, group_size=128), stream=True)
        stage[0] = "quantize"
        m.quantize("builtin:mix", nsamples=a.nsamples, seqlen=a.seqlen, resume=work / "o.partial")
        state = sum(f.stat().st_size for f in (work / "o.partial").iterdir())
        print(f"run state after quantize: {state / 1e9:.2f} GB for {m.storage()['quantized_weights'] / 1e9:.2f} B "
              f"quantized weights", flush=True)
        if not a.packed_only:
            stage[0] = "save"
            m.save(work / "o")
        stage[0] = "export"
        m.export(work / "o-gptq", "gptq")
        stage[0] = "end"
        time.sleep(0.5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("stage      RssAnon GB  RssFile GB")
    for k, (anon, file) in peaks.items():
        print(f"{k:10s} {anon:10.2f}  {file:10.2f}")
    print(f"VmHWM {_status('VmHWM'):.2f} GB")
    if a.where_peak:
        print(f"highest RssAnon sample {top[0]:.2f} GB, in:\n{top[1]}")


if __name__ == "__main__":
    main()
