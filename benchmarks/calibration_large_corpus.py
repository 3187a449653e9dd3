"""Time and peak memory of drawing calibration from a large corpus: a JSONL of the built-in domains' documents
repeated to ~100 MB under one domain label, 128 windows of 512 SmolLM2 tokens, tokenized whole (the behaviour
before session 41) or cut to calibration/sources.MAX_DOMAIN_CHARS first (the default). One mode per process, so
each peak RSS is its own:

    PYTHONPATH=. .venv/bin/python benchmarks/calibration_large_corpus.py bounded
    PYTHONPATH=. .venv/bin/python benchmarks/calibration_large_corpus.py whole
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import qforge
from qforge.calibration import build_calibration, builtin_documents
from qforge.calibration.builtin import DOMAINS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["bounded", "whole"])
    ap.add_argument("--repeat", type=int, default=24, help="copies of the built-in documents (24: ~100 MB)")
    ap.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "qforge_large_corpus.jsonl")
    a = ap.parse_args()
    if not a.file.exists():
        docs = [t for d in DOMAINS for _, t in builtin_documents(d, "calib")]
        a.file.write_text("".join(json.dumps({"text": t, "domain": "mine"}) + "\n"
                                  for _ in range(a.repeat) for t in docs))
    tok = qforge.load("smollm2-135m").tokenizer
    kw = {"max_domain_chars": 10**15} if a.mode == "whole" else {}
    t = time.time()
    calib = build_calibration(str(a.file), tok, 128, 512, **kw)
    print(f"{a.file.stat().st_size / 1e6:.0f} MB corpus, {a.mode}: {time.time() - t:.1f} s, {len(calib.samples)} "
          f"samples, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
