"""The data shipped in qforge/data/builtin (rebuilt by scripts/build_datasets.py; see PROVENANCE.md).

Each domain file holds documents tagged `calib` or `eval`; the two splits share no document.
"""
from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

DOMAINS = ("wiki", "brown", "news", "code")


@functools.lru_cache(maxsize=None)
def _read(domain: str) -> tuple[dict, ...]:
    data = resources.files("qforge") / "data" / "builtin" / f"{domain}.jsonl.gz"
    with data.open("rb") as f, gzip.open(f, "rt", encoding="utf-8") as lines:
        return tuple(json.loads(line) for line in lines)


def builtin_documents(domain: str, split: str) -> list[tuple[str, str]]:
    """[(doc_id, text)] of one domain's `calib` or `eval` split."""
    if domain not in DOMAINS:
        raise KeyError(domain)
    return [(d["doc"], d["text"]) for d in _read(domain) if d["split"] == split]
