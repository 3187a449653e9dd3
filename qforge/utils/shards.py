"""Safetensors checkpoints written shard by shard, as transformers names and indexes them.

`ShardWriter` takes tensors in order and closes a shard when the next tensor would take it past the size
limit, so memory holds at most one shard's tensors however large the checkpoint (a streamed export adds one
decoder block at a time). Shards are written under temporary names and named model-0000k-of-0000n.safetensors
(or model.safetensors when there is one) once their count is known, inside the caller's atomic directory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import QForgeError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes of a shard size as transformers spells it: 5000000, "500MB" (10^6 bytes), "2GiB" (2^30 bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if m is None:
            raise QForgeError(f"shard size {size!r}: give bytes or a number with a unit, e.g. 4GB, 500MB, 2GiB")
        n = int(float(m[1]) * _UNITS[(m[2] or "B").upper()])
    if n <= 0:
        raise QForgeError(f"shard size {size!r}: must be positive")
    return n


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Writes a checkpoint into directory `out` as safetensors shards. With `max_bytes`, tensors fill a shard
    until the next one would take it past that size (a tensor larger than the limit gets a shard of its own,
    as in transformers); without, every `write` call is one shard. `finish` names the shards and writes the
    index transformers reads (weight_map, total_size = the tensors' bytes) when there are several."""

    def __init__(self, out: Path, max_bytes: int | None = None):
        self.out, self.max_bytes = Path(out), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []        # (temporary file name, its keys), in order
        self.total = 0

    def write(self, state: dict[str, torch.Tensor]) -> None:
        for key, t in state.items():
            if self.max_bytes is not None and self.pending and self.pending_bytes + nbytes(t) > self.max_bytes:
                self._flush()
            self.pending[key] = t
            self.pending_bytes += nbytes(t)
        if self.max_bytes is None:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f".shard-{len(self.written) + 1:05d}.partial"
        save_file({k: t.contiguous() for k, t in self.pending.items()}, str(self.out / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending, name the shards and write the index; returns the shard file names."""
        self._flush()
        n = len(self.written)
        if n == 0:
            raise QForgeError(f"{self.out}: no tensors were written")
        names, weight_map = [], {}
        for k, (tmp, keys) in enumerate(self.written, 1):
            name = SINGLE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / name)
            weight_map.update(dict.fromkeys(keys, name))
            names.append(name)
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
