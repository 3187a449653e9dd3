from .arch import ARCHS, ArchSpec, LinearRef, arch_spec, block_linears, get_blocks
from .loading import LoadedModel, load_model, resolve_model

__all__ = ["ARCHS", "ArchSpec", "LinearRef", "arch_spec", "block_linears", "get_blocks",
           "LoadedModel", "load_model", "resolve_model"]
