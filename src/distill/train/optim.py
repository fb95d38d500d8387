"""Optimizers and learning-rate schedules (linear warm-up, then constant, cosine or step decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

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
    # False: biases and normalisation weights (every parameter of one dimension or none) get no weight decay
    decay_biases_and_norms: bool = True


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak rate
    milestones: list[int] = field(default_factory=list)  # step decay: optimizer steps at which lr *= gamma
    gamma: float = 0.1


def without_decay_on_vectors(params: list[Any]) -> list[dict[str, Any]]:
    """Each parameter group split in two: its matrices and kernels keep their weight decay, its vectors and
    scalars (biases, LayerNorm / BatchNorm weights, which BERT, MAE and timm leave undecayed) get none."""
    groups = params if all(isinstance(g, dict) for g in params) else [{"params": params}]
    split: list[dict[str, Any]] = []
    for group in groups:
        members = list(group["params"])
        decayed = [p for p in members if p.ndim > 1]
        undecayed = [p for p in members if p.ndim <= 1]
        if decayed or not undecayed:
            split.append({**group, "params": decayed})
        if undecayed:
            split.append({**group, "params": undecayed, "weight_decay": 0.0})
    return split


def build_optimizer(params: list[Any], config: OptimizerConfig) -> torch.optim.Optimizer:
    """`params`: parameters or parameter groups (dicts), as torch's optimizers take them."""
    if not config.decay_biases_and_norms:
        params = without_decay_on_vectors(params)
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
