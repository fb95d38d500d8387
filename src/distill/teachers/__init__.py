"""Teachers: what produces the targets (`Teacher`), one kind per module. `as_teacher` turns what a user
passes (a model, a cache, a teacher) into one."""

from __future__ import annotations

from typing import Any

from torch import nn

from distill.teachers.base import Teacher, TeacherOutputs, TeacherRequest
from distill.teachers.cached import CachedTeacher
from distill.teachers.cotrained import CoTrainedTeacher
from distill.teachers.ema import EMATeacher
from distill.teachers.ensemble import Ensemble, Router, aggregate, normalise_scores
from distill.teachers.frozen import FrozenTeacher
from distill.teachers.mixture import MixtureOfTeachers, MixtureSettings, MixtureTeacher


def as_teacher(teacher: Teacher | nn.Module | None = None, cache: Any = None) -> Teacher | None:
    """A `Teacher` from a model (frozen), a teacher cache, or a teacher as it is; None when neither."""
    if cache is not None:
        return CachedTeacher(cache)
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return FrozenTeacher(teacher)


__all__ = [
    "CachedTeacher",
    "CoTrainedTeacher",
    "EMATeacher",
    "Ensemble",
    "FrozenTeacher",
    "MixtureOfTeachers",
    "MixtureSettings",
    "MixtureTeacher",
    "Router",
    "Teacher",
    "TeacherOutputs",
    "TeacherRequest",
    "aggregate",
    "as_teacher",
    "normalise_scores",
]
