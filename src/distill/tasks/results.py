"""What a run of a recipe produced, for every task: the teacher, each method's runs over seeds, timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.recipe.schema import Recipe
from distill.train import FitResult


@dataclass
class SeedRun:
    seed: int
    result: FitResult
    wall_seconds: float = 0.0  # the whole fit call: training, evaluation, checkpoints
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. self-distillation's generations


@dataclass
class MethodRuns:
    name: str
    objectives: list[dict[str, Any]]
    runs: list[SeedRun] = field(default_factory=list)
    teacher: Any = None  # the method's own teacher when its regime made one (`distill.tasks.regimes`)


@dataclass
class TeacherInfo:
    source: str  # "trained", "cache", "checkpoint", "offline"
    parameters: int
    metrics: dict[str, float]
    train_seconds: float
    history: list[dict[str, Any]]


@dataclass
class ExperimentResult:
    recipe: Recipe
    out_dir: Path
    data: Any
    teacher: TeacherInfo | None
    student_parameters: int
    methods: list[MethodRuns]
    latency: dict[str, float]
    wall_seconds: float
    task: str = "classification"  # the `distill.tasks` name: which report section and table it gets
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific facts for the report (LM samples)
