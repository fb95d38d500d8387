"""distill: knowledge distillation from a YAML recipe, the CLI or Python.

from distill import build_data, build_model, fit

The names below load on first use, so `import distill.losses` (pure tensor maths) loads no other part of
the package, nor accelerate or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "OBJECTIVES": "distill.objectives",
    "Objective": "distill.objectives",
    "build_objective": "distill.objectives",
    "build_data": "distill.data",
    "UserError": "distill.errors",
    "build_model": "distill.models",
    "count_parameters": "distill.models",
    "FitResult": "distill.train",
    "OptimizerConfig": "distill.train",
    "ScheduleConfig": "distill.train",
    "Term": "distill.train",
    "TrainerConfig": "distill.train",
    "fit": "distill.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distill' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
