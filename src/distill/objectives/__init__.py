"""Registered objectives. Every module in this package registers its objectives on import, so adding a
method is one new file here (plus its loss in `distill.losses` and its tests); nothing else changes."""

from __future__ import annotations

import importlib
import pkgutil

from distill.objectives.base import (
    OBJECTIVES,
    HeadInputs,
    LogitObjective,
    Objective,
    Progress,
    StepOutputs,
    build_objective,
    register_logit_loss,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "OBJECTIVES",
    "HeadInputs",
    "LogitObjective",
    "Objective",
    "Progress",
    "StepOutputs",
    "build_objective",
    "register_logit_loss",
]
