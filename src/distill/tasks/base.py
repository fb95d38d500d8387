"""A `Task` is what a kind of problem brings to a run: its data, its models, the teacher it prepares, what
each method trains on, how students are evaluated, and its report section. `distill.experiment.run_recipe`
drives any task the same way and never branches on a task's name; adding a task is a new module here that
registers itself in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from distill.errors import UserError
from distill.models import count_parameters
from distill.recipe.schema import MethodSpec, ModelSpec, Recipe, TeacherSpec
from distill.registry import Registry
from distill.runfolder import RunFolder
from distill.tasks.classifier_sources import CLASSIFIER_SOURCES, check_source
from distill.tasks.results import ExperimentResult, TeacherInfo
from distill.teachers import Teacher
from distill.train import FitResult, Term


@dataclass
class TaskSetup:
    """What a task prepared once per run: data, the teacher (a model, or a `Teacher`) and what every student
    fit gets (an evaluation set, or an evaluator)."""

    data: Any
    train_set: Dataset
    teacher: Teacher | nn.Module | None = None
    teacher_info: TeacherInfo | None = None
    bare_teacher: nn.Module | None = None  # the teacher model itself (latency), when there is one
    fit_settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeedPlan:
    """What one seed of a method trains with."""

    train_set: Dataset
    teacher: Teacher | nn.Module | None
    objectives: list[Term]
    batch_transform: Callable[..., Any] | None = None
    finish: Callable[[FitResult, int], None] | None = None  # after fit(result, epochs)


@dataclass
class MethodPlan:
    """One method's source of training data; `seed(student, seed, terms)` gives each seed's `SeedPlan`."""

    train_set: Dataset
    info: dict[str, Any] = field(default_factory=dict)  # e.g. how the teacher's generations were made
    start: Callable[[nn.Module, int, list[Term]], SeedPlan] | None = None

    def seed(self, student: nn.Module, seed: int, terms: list[Term], teacher: Any) -> SeedPlan:
        if self.start is not None:
            return self.start(student, seed, terms)
        return SeedPlan(self.train_set, teacher, terms)


class Task:
    """The interface; `prepare`, `build_student` and `write_report` are required, the rest has defaults."""

    name: str = "task"
    teacher_kinds: tuple[str, ...] = ()  # the `methods[].teacher` regimes it serves (`distill.tasks.regimes`)
    classifier_sources: tuple[str, ...] = ()  # the sources of `distill.tasks.classifier_sources` it takes
    serves_served_teacher: bool = False  # a teacher over an endpoint (`teacher.served`): language models

    def claims(self, recipe: Recipe) -> bool:
        """True when this task serves a recipe that names no `task`."""
        return False

    def check(self, recipe: Recipe) -> None:
        """Refuse, in one line, what this task cannot run (before any folder is made)."""
        served = recipe.teacher is not None and recipe.teacher.served is not None
        if served and not self.serves_served_teacher:
            raise UserError(
                f"task '{self.name}' cannot use a served teacher (teacher.served): it serves language models"
            )
        sources = {m.source.name for m in recipe.method_list() if m.source is not None} | {recipe.source.name}
        other = sorted(sources - {"dataset", *self.classifier_sources})
        if other and other[0] in CLASSIFIER_SOURCES:
            raise UserError(
                f"source '{other[0]}' {CLASSIFIER_SOURCES[other[0]]}; task '{self.name}' cannot serve it"
            )
        if other:
            raise UserError(
                f"source '{other[0]}' needs a language-model recipe (data: text, jsonl, ...); "
                f"task '{self.name}' trains on its data set"
            )
        for method in recipe.method_list():
            source = (method.source or recipe.source).name
            if source in CLASSIFIER_SOURCES:
                check_source(source, recipe, method)
            if method.teacher is not None and method.teacher.kind not in self.teacher_kinds:
                raise UserError(
                    f"method '{method.name}': task '{self.name}' has no '{method.teacher.kind}' teachers "
                    "(methods[].teacher); use the recipe's teacher"
                )
            if method.teacher is not None:
                from distill.tasks.regimes import check_regime  # it builds on this module

                check_regime(recipe, method)

    def prepare(self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console) -> TaskSetup:
        raise NotImplementedError

    def build_student(self, recipe: Recipe, setup: TaskSetup) -> nn.Module:
        raise NotImplementedError

    def plan_method(
        self, recipe: Recipe, method: MethodSpec, setup: TaskSetup, folder: RunFolder
    ) -> MethodPlan:
        return MethodPlan(setup.train_set)

    def student_parameters(self, student: nn.Module) -> int:
        return count_parameters(student)

    def finish_seed(self, recipe: Recipe, method: MethodSpec, result: FitResult, setup: TaskSetup) -> None:
        """Add what the task measures beyond `fit`'s metrics (throughput, samples) to the result."""

    def describe(self, metrics: dict[str, float]) -> str:
        """One line of a student's or the teacher's metrics for the console."""
        accuracy = metrics.get("accuracy")
        return f"accuracy {accuracy:.4f}" if accuracy is not None else "not evaluated"

    def cache_source(self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console) -> Any:
        """What `distill cache` stores: the training set and the live teacher, prepared as a run prepares
        them (a `distill.tasks.teacher_cache.CacheSource`)."""
        raise UserError(f"task '{self.name}' has no teacher cache")

    def latency(self, recipe: Recipe, setup: TaskSetup, student: nn.Module) -> dict[str, float]:
        return {}

    def peer_model(self, recipe: Recipe, spec: ModelSpec, setup: TaskSetup) -> nn.Module:
        """A freshly initialised model from `spec` for this task's data (an online teacher's peer)."""
        raise UserError(f"task '{self.name}' has no online teachers (methods[].teacher.kind: online)")

    def member_teacher(
        self,
        recipe: Recipe,
        spec: TeacherSpec,
        setup: TaskSetup,
        folder: RunFolder,
        *,
        progress: bool,
        run_name: str,
    ) -> tuple[nn.Module, TeacherInfo]:
        """One member of an ensemble: loaded, from the teacher cache, or trained in `folder / run_name`."""
        raise UserError(f"task '{self.name}' has no teacher ensembles (methods[].teacher.kind: ensemble)")

    def result_extra(self, setup: TaskSetup) -> dict[str, Any]:
        return dict(setup.extra)

    def write_report(self, result: ExperimentResult) -> Path:
        raise NotImplementedError

    def print_table(self, result: ExperimentResult, console: Console) -> None:
        raise NotImplementedError


TASKS: Registry[Task] = Registry("task")


def task_for(recipe: Recipe) -> Task:
    """The recipe's `task` by name, else the first registered task that claims it (classification last)."""
    from distill import tasks as _registered  # noqa: F401  (every task module registers itself)

    if recipe.task is not None:
        return TASKS.build(recipe.task)
    for name in TASKS.names():
        task = TASKS.build(name)
        if task.claims(recipe):
            return task
    return TASKS.build("classification")


def task_named(name: str) -> Task:
    from distill import tasks as _registered  # noqa: F401

    return TASKS.build(name)
