"""distill: knowledge distillation from a YAML recipe, the CLI or Python.

from distill import build_data, build_model, fit
"""

from distill.data import build_data
from distill.errors import UserError
from distill.models import build_model, count_parameters
from distill.objectives import OBJECTIVES, Objective, build_objective
from distill.train import FitResult, OptimizerConfig, ScheduleConfig, Term, TrainerConfig, fit

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "FitResult",
    "Objective",
    "OptimizerConfig",
    "ScheduleConfig",
    "Term",
    "TrainerConfig",
    "UserError",
    "build_data",
    "build_model",
    "build_objective",
    "count_parameters",
    "fit",
]
