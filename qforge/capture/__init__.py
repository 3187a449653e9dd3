"""Capture: block inputs from calibration data, and the inputs each linear sees inside a block."""
from .blocks import BlockInputs, capture_block_inputs, run_block
from .hessian import HessianAccumulator
from .linear_inputs import collect_group_inputs

__all__ = ["BlockInputs", "capture_block_inputs", "run_block", "collect_group_inputs", "HessianAccumulator"]
