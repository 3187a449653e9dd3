"""Forward hooks that hand the inputs of chosen linears to an accumulator while a block runs."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..models.arch import LinearRef


@contextlib.contextmanager
def collect_linear_inputs(refs: list[LinearRef], sink: Callable[[LinearRef, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward of a referenced nn.Linear/Conv1D calls sink(ref, x [tokens, in]).

    Fused-expert refs have no module of their own; their inputs are reconstructed by the caller.
    """
    handles = []
    for ref in refs:
        if ref.expert is not None:
            continue

        def hook(module, args, ref=ref):
            x = args[0]
            sink(ref, x.reshape(-1, x.shape[-1]))

        handles.append(ref.module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
