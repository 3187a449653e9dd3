"""Calibration data: built-in domains, user files, deterministic sampling, size/diversity checks."""
from .builtin import DOMAINS, builtin_documents
from .sources import CalibrationSet, build_calibration, load_samples_jsonl, save_samples_jsonl

__all__ = ["DOMAINS", "builtin_documents", "CalibrationSet", "build_calibration",
           "load_samples_jsonl", "save_samples_jsonl"]
