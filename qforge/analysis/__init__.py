"""Analyses at the edge of the pipeline: tensor statistics (AbsMax, Std, kurtosis) and their plots."""
from .plots import plot_stats
from .stats import Moments, collect_stats, tensor_stats

__all__ = ["Moments", "collect_stats", "plot_stats", "tensor_stats"]
