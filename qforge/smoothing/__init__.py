"""Equivalent transformations folded into the model before quantization (AWQ; SmoothQuant later)."""
from .awq_search import BlockAWQ, awq_block
from .fold import can_fold, fold_scales

__all__ = ["BlockAWQ", "awq_block", "can_fold", "fold_scales"]
