"""Tasks: what a kind of problem brings to a run (`distill.tasks.base.Task`). Every module here registers
its task in `TASKS` on import; `task_for(recipe)` picks the recipe's."""

from __future__ import annotations

import importlib
import pkgutil

from distill.tasks.base import TASKS, MethodPlan, SeedPlan, Task, TaskSetup, task_for, task_named
from distill.tasks.results import ExperimentResult, MethodRuns, SeedRun, TeacherInfo

_HELPERS = {"base", "results", "teacher_store", "teacher_cache"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _HELPERS and not _module.name.endswith("_report"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "TASKS",
    "ExperimentResult",
    "MethodPlan",
    "MethodRuns",
    "SeedPlan",
    "SeedRun",
    "Task",
    "TaskSetup",
    "TeacherInfo",
    "task_for",
    "task_named",
]
