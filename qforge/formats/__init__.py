"""Packed checkpoint formats real engines load. Each module documents its bit order and tensor shapes and
offers pack(LayerQuant) -> {key: tensor} and unpack({key: tensor}, Grid) -> LayerQuant."""
from . import awq, compressed_tensors, gptq

FORMATS = {m.NAME: m for m in (gptq, compressed_tensors, awq)}

__all__ = ["FORMATS", "awq", "compressed_tensors", "gptq"]
