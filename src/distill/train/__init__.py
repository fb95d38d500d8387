"""The training loop and its parts (optimizers, schedules, checkpoints, sampling)."""

from distill.train.optim import OptimizerConfig, ScheduleConfig
from distill.train.trainer import FitResult, Term, Trainer, TrainerConfig, fit

__all__ = ["FitResult", "OptimizerConfig", "ScheduleConfig", "Term", "Trainer", "TrainerConfig", "fit"]
