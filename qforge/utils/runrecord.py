"""What a run used and cost: versions, seed, timings, peak memory."""
from __future__ import annotations

import platform
import resource
import sys
import time


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    return {"qforge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def run_record(**fields) -> dict:
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
            "peak_rss_mb": round(peak_rss_mb(), 1), **fields}
