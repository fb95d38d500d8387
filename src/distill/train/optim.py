"""Optimizers and learning-rate schedules (linear warm-up, then constant, cosine or step decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "sgd"]
ScheduleName = Literal["constant", "cosine", "step"]


@dataclass
class OptimizerConfig:
    name: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak rate
    milestones: list[int] = field(default_factory=list)  # step decay: optimizer steps at which lr *= gamma
    gamma: float = 0.1


def build_optimizer(params: list[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


class LearningRateFactor:
    """The multiplier of the peak learning rate at optimizer step `step` (a callable for LambdaLR)."""

    def __init__(self, config: ScheduleConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = max(1, total_steps)

    def __call__(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / (c.warmup_steps + 1)
        if c.name == "cosine":
            span = max(1, self.total_steps - c.warmup_steps)
            progress = min(1.0, (step - c.warmup_steps) / span)
            return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if c.name == "step":
            return c.gamma ** sum(step >= m for m in c.milestones)
        return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LearningRateFactor(config, total_steps))
