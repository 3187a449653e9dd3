"""Checking a device string before long work starts (a typo or a missing GPU is an error, not a traceback)."""
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
