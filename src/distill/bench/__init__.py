"""Benchmarks: suites of recipes run over methods x seeds, aggregated into tables and plots."""

from __future__ import annotations

from distill.bench.methods import classification_methods, select_methods, skipped_objectives
from distill.bench.results import BenchResult
from distill.bench.runner import run_vision_bench
from distill.bench.suites import SUITES, suite_recipes

__all__ = [
    "SUITES",
    "BenchResult",
    "classification_methods",
    "run_vision_bench",
    "select_methods",
    "skipped_objectives",
    "suite_recipes",
]
