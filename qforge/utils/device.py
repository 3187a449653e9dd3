"""Checking a device string before long work starts (a typo or a missing GPU is an error, not a traceback), and
the dtype its matmuls run fastest in."""
from __future__ import annotations

import torch

from ..errors import QForgeError


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device when this machine has it; QForgeError otherwise."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise QForgeError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise QForgeError(f"device {device!r}: this torch build or machine has no CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise QForgeError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise QForgeError(f"device {device!r}: MPS is not available on this machine")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise QForgeError(f"device {device!r}: qforge runs on cpu, cuda or mps")
    return d


def native_compute_dtype(device: str | torch.device) -> str:
    """The compute dtype "auto" stands for: bfloat16 where `device` multiplies bf16 matrices natively (CUDA GPUs
    with bf16, Ampere and later; x86 CPUs with AVX512-BF16 or AMX), float32 elsewhere, where torch emulates bf16
    GEMMs: on an AVX2-only AMD EPYC a 4096x576x1536 product ran at 18 GFLOP/s in bf16, 132 in fp32 (BENCHMARKS.md)."""
    d = torch.device(device)
    if d.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    if d.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return "bfloat16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "float32"
    return "float32"


def available_bytes(device: str | torch.device) -> int:
    """Memory free for new tensors on `device` now: a CUDA device's free memory, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available
