"""`fit`: the Python entry point of the training loop (`distill.train.trainer.Trainer`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from distill.objectives.terms import BatchTransform, TermLike
from distill.teachers import Teacher
from distill.train.config import FitResult, TrainerConfig
from distill.train.optim import OptimizerConfig, ScheduleConfig
from distill.train.trainer import Trainer

if TYPE_CHECKING:
    from distill.cache.store import TeacherCache


def fit(
    student: nn.Module,
    train_data: Dataset | DataLoader,
    *,
    teacher: Teacher | nn.Module | None = None,
    eval_data: Dataset | DataLoader | None = None,
    objectives: Sequence[TermLike] = ("cross_entropy",),
    optimizer: OptimizerConfig | None = None,
    schedule: ScheduleConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    label: str = "train",
    evaluator: Callable[[nn.Module, nn.Module | None], dict[str, float]] | None = None,
    batch_transform: BatchTransform | None = None,
    teacher_cache: TeacherCache | None = None,
    **config: Any,
) -> FitResult:
    """Train `student` on `train_data` with `objectives`, distilling from `teacher` if given: a model (kept
    frozen) or any `distill.teachers.Teacher` (ensemble, router, co-trained peer, EMA of the student).

    Keyword arguments beyond these are `TrainerConfig` fields (`epochs=30`, `batch_size=32`, ...).
    Objectives: names (`"hinton_kd"`), `(name, weight)`, `(name, weight, params)`, `Term`s or objects.
    `evaluator(student, teacher) -> metrics`, if given, replaces the classification metrics (language models).
    `batch_transform(batch, student, progress) -> batch` rewrites each training micro-batch first.
    `teacher_cache` (a `distill.cache.TeacherCache`, with `train_data` wrapped in `IndexedDataset`) replaces
    the teacher by its cached top-k targets.
    """
    unknown = set(config) - set(TrainerConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"fit() got unknown settings: {', '.join(sorted(unknown))}")
    trainer = Trainer(
        student,
        train_data,
        teacher=teacher,
        eval_data=eval_data,
        objectives=objectives,
        optimizer=optimizer,
        schedule=schedule,
        config=TrainerConfig(**config),
        run_dir=run_dir,
        fingerprint=fingerprint,
        label=label,
        evaluator=evaluator,
        batch_transform=batch_transform,
        teacher_cache=teacher_cache,
    )
    return trainer.fit(resume=resume)
