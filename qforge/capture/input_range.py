"""Static input scales (QuantizeConfig.act_static): what each quantized linear reads over the calibration set, taken
as the quantized block runs to make the next block's inputs, so every linear is observed with the inputs the
quantized model gives it (its earlier layers, and its own block's earlier linears, already rounded). The scale
follows from them by solvers/input_scale.py: "max" needs the largest |x| (one pass), "mse" then the squared error of
each candidate clip ratio (a second pass, once the largest |x| is known).
"""
from __future__ import annotations

import logging

import torch

from ..models.arch import LinearRef
from ..solvers.input_scale import RATIOS, clip_errors, nvfp4_input_scale, qmax
from .linear_inputs import Sink

log = logging.getLogger(__name__)


class InputRange:
    """Per input of `groups` (the table's linear groups: the plain linears of one read one input, observed once through
    the first of them; an expert its own): the running max |x| (fed by `sinks`), and with `observer` "mse" each clip
    ratio's squared error (fed by `error_sinks`, after every max is in). `scales` gives every linear its input's."""

    def __init__(self, groups: list[list[LinearRef]], fp8: bool, observer: str = "max", fp4: bool = False):
        self.fp8, self.observer, self.fp4 = fp8, observer, fp4     # fp4: NVFP4 inputs' global scale g as the scale
        self.reads: dict[str, str] = {}                   # linear name -> the name its input is observed under
        for g in groups:
            first = next((r.name for r in g if r.expert is None), None)
            self.reads.update({r.name: first if r.expert is None else r.name for r in g})
        self.absmax: dict[str, torch.Tensor] = {n: torch.zeros(()) for n in set(self.reads.values())}
        self.errors: dict[str, torch.Tensor] = {n: torch.zeros(len(RATIOS)) for n in self.absmax}

    @property
    def sinks(self) -> dict[str, Sink]:
        return {name: (lambda x, name=name: self._max(name, x)) for name in self.absmax}

    @property
    def error_sinks(self) -> dict[str, Sink]:
        return {name: (lambda x, name=name: self._err(name, x)) for name in self.absmax if self.absmax[name] > 0}

    def _max(self, name: str, x: torch.Tensor) -> None:                       # x [tokens, in]
        if x.numel():
            self.absmax[name] = torch.maximum(self.absmax[name], x.detach().abs().amax().float().cpu())

    def _err(self, name: str, x: torch.Tensor) -> None:
        if x.numel():
            self.errors[name] += clip_errors(x.detach(), self.absmax[name].to(x.device), self.fp8).cpu()

    def scales(self) -> dict[str, torch.Tensor]:
        """{linear name: input_scale [1] fp32}. A linear that read nothing or only zeros gets scale 1 (any scale
        reproduces zeros), with a warning: its calibration never reached it."""
        out = {}
        for name, m in self.absmax.items():
            if not m > 0:
                log.warning("%s read no non-zero input in calibration: its static input scale is 1", name)
                out[name] = torch.ones(1)
                continue
            r = RATIOS[int(self.errors[name].argmin())] if self.observer == "mse" else 1.0
            out[name] = nvfp4_input_scale(m) if self.fp4 else (m * r / qmax(self.fp8)).reshape(1)
        return {n: out[seen].clone() for n, seen in self.reads.items()}
