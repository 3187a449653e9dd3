"""AWQ search results on disk (`awq_results.safetensors`), so a run can re-apply them (--awq-from).

Tensors: `<blocks>.<i>.<prev>.awq_scale` [in] per folded mapping, `<blocks>.<i>.<linear>.awq_clip`
[out, G] per clipped linear. Metadata: "alphas" (JSON {mapping: α}; -1: left unscaled) and "grid" (bits/group/sym the
search was judged with).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import QForgeError
from .awq_search import BlockAWQ

AWQ_FILE = "awq_results.safetensors"


def save_awq(results: dict[int, BlockAWQ], blocks_path: str, path: Path, grid: dict) -> None:
    tensors, alphas = {}, {}
    for i, r in results.items():
        for prev, s in r.scales.items():
            tensors[f"{blocks_path}.{i}.{prev}.awq_scale"] = s.contiguous()
        for lin, c in r.clips.items():
            tensors[f"{blocks_path}.{i}.{lin}.awq_clip"] = c.contiguous()
        alphas.update({f"{blocks_path}.{i}.{p}": a for p, a in r.alphas.items()})
    save_file(tensors, str(path), metadata={"alphas": json.dumps(alphas), "grid": json.dumps(grid)})


def load_awq(path: str | Path, blocks_path: str) -> tuple[dict[int, BlockAWQ], dict]:
    path = Path(path)
    if path.is_dir():
        path = path / AWQ_FILE
    if not path.is_file():
        raise QForgeError(f"no AWQ results at {path} (a qforge AWQ run writes {AWQ_FILE} into its output)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            out: dict[int, BlockAWQ] = {}
            for key in f.keys():
                if not key.startswith(blocks_path + "."):
                    raise QForgeError(f"{path}: {key} is not under {blocks_path}; results of another architecture?")
                idx, _, rest = key[len(blocks_path) + 1:].partition(".")
                name, _, kind = rest.rpartition(".")
                r = out.setdefault(int(idx), BlockAWQ())
                (r.scales if kind == "awq_scale" else r.clips)[name] = f.get_tensor(key)
    except QForgeError:
        raise
    except Exception as e:
        raise QForgeError(f"{path} is not a readable AWQ results file: {type(e).__name__}: {e}") from e
    return out, json.loads(meta.get("grid", "{}"))
