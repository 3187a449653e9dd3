"""Evaluation dataset SPECs: a built-in held-out set (wiki, brown, news, code) or a file path."""
from __future__ import annotations

from pathlib import Path

from ..calibration.builtin import DOMAINS, builtin_documents
from ..calibration.sources import read_documents
from ..errors import QForgeError

EVAL_SETS = DOMAINS


def load_eval_text(spec: str) -> str:
    """The whole evaluation text; documents are joined with a blank line (as wikitext-2 is)."""
    if spec in EVAL_SETS:
        return "\n\n".join(t for _, t in builtin_documents(spec, "eval"))
    if spec.startswith("builtin:"):
        raise QForgeError(f"built-in evaluation sets are named without a prefix: {', '.join(EVAL_SETS)}")
    path = Path(spec).expanduser()
    if not path.exists() and "/" not in spec and "." not in spec:
        raise QForgeError(f"unknown evaluation set {spec!r}; built-in sets: {', '.join(EVAL_SETS)}, or a file path")
    docs, ids = read_documents(spec)
    if ids is not None:
        raise QForgeError(f"{spec}: evaluation needs text, not input_ids samples")
    text = "\n\n".join(t for texts in docs.values() for t in texts)
    if not text.strip():
        raise QForgeError(f"evaluation data {spec!r} is empty")
    return text

