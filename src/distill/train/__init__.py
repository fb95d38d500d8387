"""The training loop and its parts (optimizers, schedules, checkpoints, sampling)."""

from distill.objectives.terms import Term
from distill.train.config import FitResult, TrainerConfig
from distill.train.fitting import fit
from distill.train.optim import OptimizerConfig, ScheduleConfig
from distill.train.trainer import Trainer

__all__ = ["FitResult", "OptimizerConfig", "ScheduleConfig", "Term", "Trainer", "TrainerConfig", "fit"]
