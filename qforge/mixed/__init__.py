"""Mixed precision to a target bits per weight (ExLlamaV2-style): measure every layer at every candidate
scheme (measure.py), choose one scheme per layer under the budget (allocate.py, plan.py), then quantize
with the chosen grids (pipeline.quantize_model(grids=...))."""
from .allocate import Option, allocate
from .measure import measure_model
from .plan import Allocation, load_measurement, plan, plot_allocation
from .schemes import candidate_grids, scheme_bits

__all__ = ["Allocation", "Option", "allocate", "candidate_grids", "load_measurement", "measure_model", "plan",
           "plot_allocation", "scheme_bits"]
