"""The student as its own teacher: an exponential moving average of its weights (mean teacher,
self-distillation). theta_T <- decay * theta_T + (1 - decay) * theta_S after every optimizer step; buffers
(batch-norm statistics) are copied. Frozen between updates, like any teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn

from distill.errors import UserError
from distill.teachers.frozen import FrozenTeacher


class EMATeacher(FrozenTeacher):
    kind = "ema"
    static = False

    def __init__(self, student: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise UserError(f"ema teacher: decay must be in [0, 1), got {decay}")
        super().__init__(copy.deepcopy(student))
        self.decay = decay

    @torch.no_grad()
    def after_optimizer_step(self, student: nn.Module) -> None:
        own = dict(self.model.named_parameters())
        for name, param in student.named_parameters():
            if name in own:
                own[name].lerp_(param.detach().to(own[name].dtype), 1.0 - self.decay)
        own_buffers = dict(self.model.named_buffers())
        for name, buffer in student.named_buffers():
            if name in own_buffers:
                own_buffers[name].copy_(buffer)

    def state_module(self) -> nn.Module:
        return self.model
