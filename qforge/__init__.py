"""qforge: post-training quantization of causal language models."""
__version__ = "0.1.0"

from .api import QModel, evaluate, load, tune_kernels  # noqa: E402
from .config import CalibrationConfig, QuantizeConfig, SimulationConfig  # noqa: E402
from .errors import QForgeError  # noqa: E402

__all__ = ["QModel", "QuantizeConfig", "CalibrationConfig", "SimulationConfig", "QForgeError", "evaluate", "load", "tune_kernels", "__version__"]
