"""Calibration SPECs -> token samples, deterministically for a seed.

SPEC: `builtin:mix` (all built-in domains, equal shares), `builtin:DOMAIN`, or a path to
  .txt      plain text (one document),
  .jsonl    {"input_ids": [...]} lines used verbatim as samples, or {"text": ...} lines (documents), each
            optionally labelled with its domain ({"text": ..., "domain": "chat"}),
  .parquet  a `text` column (documents).
Text is tokenized without special tokens; each sample is a random window of `seqlen` tokens of a
domain's token stream (documents joined by blank lines), the domains taking equal shares of samples
(unlabelled documents are one domain, judged for narrowness against the built-in mix: checks.py).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import QForgeError
from .builtin import DOMAINS, builtin_documents
from .checks import calibration_warnings, token_samples

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    samples: list[torch.Tensor]          # 1-D int64 token ids, one tensor per sample
    domains: list[str | None]            # the domain of each sample when known
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def read_documents(spec: str) -> tuple[dict[str | None, list[str]], list[list[int]] | None]:
    """SPEC -> ({domain: [text, ...]}, None) for text sources, or ({}, [ids, ...]) for id samples."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        names = DOMAINS if name == "mix" else (name,)
        if any(n not in DOMAINS for n in names):
            raise QForgeError(f"unknown built-in calibration set {spec!r}; choose builtin:mix or one of "
                              + ", ".join(f"builtin:{d}" for d in DOMAINS))
        return {n: [t for _, t in builtin_documents(n, "calib")] for n in names}, None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise QForgeError(f"calibration data {spec!r}: no such file (or use builtin:mix)")
    try:
        if path.suffix == ".txt":
            return {None: [path.read_text(encoding="utf-8")]}, None
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise QForgeError(f"{path}: parquet calibration data needs a 'text' column, found {table.column_names}")
            return {None: [t for t in table.column("text").to_pylist() if t]}, None
    except QForgeError:
        raise
    except Exception as e:  # corrupt file: UnicodeDecodeError, ArrowInvalid, ...
        raise QForgeError(f"could not read calibration data {path}: {type(e).__name__}: {e}") from e
    raise QForgeError(f"calibration data {path}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .parquet)")


def _read_jsonl(path: Path):
    texts: dict[str | None, list[str]] = {}      # by the lines' optional "domain" label
    ids = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QForgeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if "input_ids" in obj:
            row = obj["input_ids"]
            if not (isinstance(row, list) and row and all(isinstance(t, int) and t >= 0 for t in row)):
                raise QForgeError(f"{path}:{lineno}: input_ids must be a non-empty list of non-negative ints")
            ids.append(row)
        elif isinstance(obj.get("text"), str):
            domain = obj.get("domain")
            if domain is not None and not (isinstance(domain, str) and domain):
                raise QForgeError(f"{path}:{lineno}: 'domain' must be a non-empty string")
            texts.setdefault(domain, []).append(obj["text"])
        else:
            raise QForgeError(f"{path}:{lineno}: expected an object with 'input_ids' or 'text'")
    if ids and texts:
        raise QForgeError(f"{path}: mixes 'input_ids' and 'text' lines; use one kind per file")
    return ({}, ids) if ids else (texts or {None: []}, None)


# A domain is tokenized whole (its windows start anywhere in its token stream) up to this many characters, or up
# to 40 characters for every token its windows take when that is more (~10x the text they need). A larger domain
# is cut to a seeded random selection of its documents (a single document: a random span) before tokenizing:
# whole, a 1 GB corpus costs a tokenizer minutes and gigabytes to draw 128 windows from. The built-in domains
# (< 2 MB each) are always whole.
MAX_DOMAIN_CHARS = 8_000_000


def _bounded(texts: list[str], limit: int, rng: random.Random) -> list[str]:
    """`texts` when they hold at most `limit` characters, else documents drawn at random (kept in their order)
    until they do; one document longer than that alone: a random span of `limit` characters of it."""
    if sum(map(len, texts)) <= limit:
        return texts
    order = list(range(len(texts)))
    rng.shuffle(order)
    keep, total = [], 0
    for i in order:
        if total >= limit:
            break
        keep.append(i)
        total += len(texts[i])
    out = [texts[i] for i in sorted(keep)]
    if len(out) == 1 and len(out[0]) > limit:
        start = rng.randrange(len(out[0]) - limit + 1)
        out = [out[0][start:start + limit]]
    return out


def _windows(stream: torch.Tensor, n: int, seqlen: int, rng: random.Random) -> list[torch.Tensor]:
    if len(stream) <= seqlen:
        return [stream]  # too short for even one window: the whole stream, once
    return [stream[s: s + seqlen] for s in (rng.randrange(len(stream) - seqlen + 1) for _ in range(n))]


def build_calibration(spec: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                      max_domain_chars: int = MAX_DOMAIN_CHARS) -> CalibrationSet:
    """Draw `nsamples` windows of `seqlen` tokens from SPEC (id samples: the first `nsamples` lines); a domain
    larger than `max_domain_chars` (see MAX_DOMAIN_CHARS) is drawn from a seeded selection of its documents."""
    docs, ids = read_documents(spec)
    vocab = len(tokenizer)
    if ids is not None:
        try:                             # the checks samples passed as tensors get (length, id range)
            samples = token_samples([torch.tensor(r, dtype=torch.long) for r in ids[:nsamples]], vocab)
        except QForgeError as e:
            raise QForgeError(f"{spec}: {e}") from None
        domains: list[str | None] = [None] * len(samples)
    else:
        docs = {d: [t for t in texts if t.strip()] for d, texts in docs.items()}
        docs = {d: texts for d, texts in docs.items() if texts}
        if not docs:
            raise QForgeError(f"calibration data {spec!r} is empty")
        rng = random.Random(seed)
        drawn = []
        names = sorted(docs, key=str)
        for i, d in enumerate(names):
            share = nsamples // len(names) + (i < nsamples % len(names))
            if share == 0:
                continue
            texts = _bounded(docs[d], max(max_domain_chars, 40 * share * seqlen), rng)
            if texts is not docs[d]:
                log.info("calibration: %s holds %d characters; drawing from %d of its %d documents (%d characters)",
                         d or spec, sum(map(len, docs[d])), len(texts), len(docs[d]), sum(map(len, texts)))
            tokens = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
            stream = torch.tensor(tokens, dtype=torch.long)
            if len(stream) < 2:
                continue
            drawn.append([(w, d) for w in _windows(stream, share, seqlen, rng)])
        # domains interleaved, so that the first k samples (what the mixed-precision probes, check and search
        # are judged on) are as mixed as the whole set
        order = [got[k] for k in range(max(map(len, drawn), default=0)) for got in drawn if k < len(got)]
        samples, domains = [w for w, _ in order], [d for _, d in order]
        if not samples:
            raise QForgeError(f"calibration data {spec!r} holds fewer than 2 tokens")
    calib = CalibrationSet(samples, domains, spec)
    calib.warnings = calibration_warnings(calib, tokenizer, nsamples, seqlen)
    for w in calib.warnings:
        log.warning("%s", w)
    return calib


def save_samples_jsonl(samples: list[torch.Tensor], path: str | Path) -> None:
    """Samples as `{"input_ids": [...]}` lines: reusable with --calib, by qforge or other tools."""
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps({"input_ids": s.tolist()}) + "\n")


def load_samples_jsonl(path: str | Path) -> list[torch.Tensor]:
    _, ids = _read_jsonl(Path(path))
    if not ids:
        raise QForgeError(f"{path} holds no input_ids samples")
    return [torch.tensor(r, dtype=torch.long) for r in ids]
