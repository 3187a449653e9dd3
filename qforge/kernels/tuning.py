"""Choosing the Triton matmul's schedule by measurement: the candidate KernelConfigs for a call shape and a
Tuner that checks each against the PyTorch reference, times it on the device and keeps the fastest.

The candidate tables were pruned by the sm_90 compiler report (benchmarks/kernel_resources.py): no
configuration that spills registers. `triton_matmul.plan` is the untimed default and always the first.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch

from . import triton_matmul
from .triton_matmul import SMALL_M, KernelConfig, fit_block_k, with_split, plan, sm_count

log = logging.getLogger(__name__)

# (block_n, block_k, num_warps, num_stages) a Tuner tries per schedule, and the programs per SM of a split;
# tables pruned by the sm_90 compiler report (no configuration that spills registers)
_SPLIT_DOT = ((64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (64, 64, 2, 4))
_SPLIT_GEMV = ((128, 64, 4, 2), (256, 64, 4, 2), (256, 64, 2, 2), (64, 128, 4, 2), (256, 32, 2, 2), (128, 32, 2, 2))
_TILES = {32: ((128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4)),
          64: ((128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4)),
          128: ((128, 64, 8, 3), (64, 64, 4, 4))}


def candidates(M: int, N: int, K: int, group_size: int, n_sm: int = 132, bits: int = 4) -> list[KernelConfig]:
    """The configs a Tuner times for one call shape, the heuristic's first; each tensor-core one and each
    GEMV also with the P interleaved products (word_load 2) where it fits, the small-batch ones also with one load per code,
    each GEMV also with its next tile prefetched."""
    out = [plan(M, N, K, group_size, n_sm)]
    if M <= SMALL_M:
        for dot, table, per_sm in ((True, _SPLIT_DOT, (2, 4, 8)), (False, _SPLIT_GEMV, (4, 8, 16))):
            if not dot and (M > 4 or group_size <= 0):  # GEMV programs read the weights once per row of x;
                continue                                  # with act-order's per-row grids they spill (sm_90)
            for bn, bk, warps, stages in table:
                c = KernelConfig(16 if dot else 1, bn, fit_block_k(group_size, bk), dot=dot, num_warps=warps,
                                 num_stages=stages)
                out += [with_split(c, M, N, K, p * n_sm) for p in per_sm]
        out += [dataclasses.replace(c, prefetch=True) for c in out if not c.dot]
        out += [dataclasses.replace(c, word_load=0) for c in out if not c.prefetch]
    else:
        for bm in (bm for bm in _TILES if bm <= max(32, 2 * M)):
            out += [KernelConfig(bm, bn, fit_block_k(group_size, bk), num_warps=w, num_stages=s)
                    for bn, bk, w, s in _TILES[bm]]
    interleaved = [dataclasses.replace(c, word_load=2) for c in out if c.word_load == 1 and not c.prefetch]
    out += [c for c in interleaved if c.fits(bits, group_size)]
    return list(dict.fromkeys(out))


def _m_bucket(M: int) -> int:
    return 1 << max(0, (M - 1).bit_length()) if M <= 1024 else 1024


def _do_bench(fn, warmup_ms: float, rep_ms: float) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3


class Tuner:
    """Times `candidates` for each call shape on its first use (triton.testing.do_bench, median; each run
    allocates its output, as a call does) and keeps the fastest config per (M rounded up to a power of two,
    N, K, group, bits, dtype, device). A config whose result is off the PyTorch reference (relative error
    over `tol`) is dropped with a warning. Share one across layers: `qforge.kernels.use_tuner(model, Tuner())`."""

    def __init__(self, warmup_ms: float = 5, rep_ms: float = 20, tol: float = 5e-3, timer=None):
        self.tol = tol
        self.timer = timer or functools.partial(_do_bench, warmup_ms=warmup_ms, rep_ms=rep_ms)  # fn -> seconds
        self.best: dict[tuple, tuple[KernelConfig, float]] = {}
        self.rejected: list[dict] = []              # {"shape", "config", "why"} of every candidate not timed

    def config(self, x, qweight, qzeros, scales, g_idx, bits: int, group_size: int, bias=None) -> KernelConfig:
        from .reference import matmul_reference

        K, N = x.shape[-1], scales.shape[1]
        M = x.numel() // K
        key = (_m_bucket(M), N, K, group_size, bits, x.dtype, x.device)
        if key in self.best:
            return self.best[key][0]
        want = matmul_reference(x.float(), qweight, qzeros, scales, g_idx, bits, bias)
        times = {}
        for c in candidates(M, N, K, group_size, sm_count(x.device), bits):
            fn = functools.partial(triton_matmul.triton_matmul, x, qweight, qzeros, scales, g_idx, bits, group_size,
                                   bias, config=c)
            try:
                err = float((fn().float() - want).norm() / want.norm().clamp_min(1e-30))
                if not err <= self.tol:             # NaN fails too
                    log.warning("kernel config %s is off the reference (relative error %.2g): skipped", c, err)
                    self.rejected.append({"shape": key[:3], "config": str(c), "why": f"off the reference ({err:.2g})"})
                    continue
                times[c] = self.timer(fn)
            except Exception as e:                  # a config the compiler refuses (shared memory, registers)
                log.debug("kernel config %s failed: %s", c, e)
                self.rejected.append({"shape": key[:3], "config": str(c), "why": f"failed: {e!r}"[:300]})
        if not times:
            raise RuntimeError(f"no kernel config ran correctly for M={M}, N={N}, K={K}")
        best = min(times, key=times.get)
        self.best[key] = (best, times[best])
        log.info("kernel M<=%d N=%d K=%d: %s, %.1f µs", key[0], N, K, best, 1e6 * times[best])
        return best

    def save(self, path) -> None:
        """The picks as JSON (device by name, so a file serves every machine with that GPU), written atomically."""
        from ..utils.atomic import atomic_write_text

        rows = [{"m_bucket": k[0], "N": k[1], "K": k[2], "group_size": k[3], "bits": k[4], "dtype": str(k[5]),
                 "device": _device_name(k[6]), "config": dataclasses.asdict(c), "seconds": t}
                for k, (c, t) in self.best.items()]
        atomic_write_text(path, json.dumps(rows, indent=1))

    def load(self, path, device) -> int:
        """Adopt the picks of a saved file that were made on a GPU like `device`; returns how many."""
        n = 0
        for r in json.loads(Path(path).read_text()):
            if r["device"] == _device_name(device):
                key = (r["m_bucket"], r["N"], r["K"], r["group_size"], r["bits"],
                       getattr(torch, r["dtype"].removeprefix("torch.")), torch.device(device))
                self.best[key] = (KernelConfig(**r["config"]), r["seconds"])
                n += 1
        return n


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type
