"""Static input scales (QuantizeConfig.act_static): the largest |x| each quantized linear reads over the calibration
set, taken as the quantized block runs to make the next block's inputs, so every linear is observed with the
inputs the quantized model gives it (its earlier layers, and its own block's earlier linears, already rounded).

    input_scale = max over calibration tokens and channels of |x| / qmax      (qmax: 127 for int8, 448 for E4M3)

so no calibration input is clipped; vLLM quantizes a static layer's input as clamp(round(x / input_scale)).
"""
from __future__ import annotations

import logging

import torch

from ..models.arch import LinearRef
from .linear_inputs import Sink

log = logging.getLogger(__name__)


class InputRange:
    """Running max |x| of the inputs of `refs` (one per name); `sinks` feed capture.linear_inputs.tap_inputs."""

    def __init__(self, refs: list[LinearRef]):
        self.absmax: dict[str, torch.Tensor] = {r.name: torch.zeros(()) for r in refs}

    @property
    def sinks(self) -> dict[str, Sink]:
        return {name: (lambda x, name=name: self._add(name, x)) for name in self.absmax}

    def _add(self, name: str, x: torch.Tensor) -> None:                       # x [tokens, in]
        if x.numel():
            self.absmax[name] = torch.maximum(self.absmax[name], x.detach().abs().amax().float().cpu())

    def scales(self, qmax: float) -> dict[str, torch.Tensor]:
        """{name: input_scale [1] fp32}. A linear that read nothing or only zeros gets scale 1 (any scale
        reproduces zeros), with a warning: its calibration never reached it."""
        out = {}
        for name, m in self.absmax.items():
            if not m > 0:
                log.warning("%s read no non-zero input in calibration: its static input scale is 1", name)
            out[name] = (m / qmax if m > 0 else torch.tensor(1.0)).reshape(1)
        return out
