"""Equivalent transformations folded into the model before quantization (AWQ, SmoothQuant)."""
from .awq_search import BlockAWQ, awq_block
from .fold import FoldUnit, fold_scales, mapping_units

__all__ = ["BlockAWQ", "FoldUnit", "awq_block", "fold_scales", "mapping_units"]
