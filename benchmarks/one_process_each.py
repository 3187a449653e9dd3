"""For benchmarks that run each variant in a fresh process (clean timings and peak memory): the script calls
itself with `--worker VARIANT`; the worker prints one `RESULT {json}` line, which is printed here as it comes."""
from __future__ import annotations

import json
import subprocess
import sys


def add_worker_args(ap) -> None:
    """The options every such benchmark shares: the evaluation sets, their window cap, the worker's variant."""
    ap.add_argument("--datasets", default="wiki,news,code")
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--worker")


def dispatch(a, run, header: str, variants) -> None:
    """In a worker: print run(a)'s RESULT line. Otherwise: print the header, then run each variant's worker."""
    if a.worker:
        print("RESULT " + json.dumps(run(a)), flush=True)
        return
    print(header, flush=True)
    for v in variants:
        out = subprocess.run([sys.executable, sys.argv[0], *sys.argv[1:], "--worker", v], capture_output=True,
                             text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        print(line[0][7:] if line else f"{v}: FAILED\n{out.stderr[-1500:]}", flush=True)
