"""A method's teacher regime (`methods[].teacher`, `distill.recipe.schema.TEACHER_KINDS`): the recipe's
teacher as it is (no `teacher` section), an ensemble of teachers, a peer trained beside the student, the
student's moving average, the generations of iterative self-distillation (S22), or a mixture of masked
members routed per sample (S25, MST-Distill).

The runner asks this module for each seed's teacher; the task supplies what depends on its data (a peer
model, an ensemble member trained and cached like the recipe's teacher), so every task that implements
`Task.peer_model` / `Task.member_teacher` gets every regime.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from distill.errors import UserError
from distill.io import fingerprint
from distill.metrics import classification_metrics
from distill.objectives import OBJECTIVES
from distill.objectives.terms import Term
from distill.recipe.schema import (
    EMATeacherSpec,
    EnsembleTeacherSpec,
    MethodSpec,
    MixtureTeacherSpec,
    OnlineTeacherSpec,
    Recipe,
    SelfTeacherSpec,
    TeacherSpec,
)
from distill.runfolder import RunFolder
from distill.tasks.base import Task, TaskSetup
from distill.tasks.results import TeacherInfo
from distill.tasks.teacher_store import steps_per_epoch
from distill.teachers import CoTrainedTeacher, EMATeacher, Ensemble, FrozenTeacher, Teacher
from distill.teachers.mixture import MixtureSettings, MixtureTeacher
from distill.train.batches import predict


@dataclass
class EnsembleInfo:
    """What the report shows of an ensemble: each member's and the ensemble's test metrics."""

    members: list[dict[str, Any]] = field(default_factory=list)  # {"name", "source", "metrics"}
    metrics: dict[str, float] = field(default_factory=dict)
    parameters: int = 0


@torch.no_grad()
def model_logits(model: nn.Module, data: Dataset, batch_size: int) -> tuple[Tensor, Tensor]:
    """A model's float32 logits (CPU) and the labels over a whole data set, in order, in eval mode."""
    return predict(
        model, DataLoader(data, batch_size=batch_size, collate_fn=getattr(data, "collate_fn", None))
    )


def ensemble_members(recipe: Recipe, spec: EnsembleTeacherSpec) -> list[tuple[str, TeacherSpec]]:
    """(name, teacher spec) of every member: the recipe's teacher once per seed, then `members`."""
    members: list[tuple[str, TeacherSpec]] = []
    if spec.seeds:
        base = recipe.teacher
        if base is None or base.name is None:
            raise UserError(
                "ensemble seeds retrain the recipe's teacher, and the recipe has no teacher model"
            )
        if base.checkpoint is not None:
            raise UserError(
                "ensemble seeds retrain the recipe's teacher, but it loads a checkpoint (every seed would be "
                "the same model); list the members instead"
            )
        for seed in spec.seeds:
            train = base.train.model_copy(update={"seed": seed})
            members.append(
                (f"{base.name} seed {seed}", base.model_copy(update={"train": train, "cache": None}))
            )
    for i, member in enumerate(spec.members):
        members.append((f"{member.name} (member {i + 1})", member))
    return members


class Regimes:
    """Builds each method's teacher for one run; ensemble members are obtained once and shared by methods."""

    def __init__(
        self, task: Task, recipe: Recipe, setup: TaskSetup, folder: RunFolder, progress: bool
    ) -> None:
        self.task, self.recipe, self.setup, self.folder, self.progress = task, recipe, setup, folder, progress
        self._members: dict[str, tuple[nn.Module, TeacherInfo]] = {}
        self.ensembles: dict[str, EnsembleInfo] = {}  # by method name

    def method_teacher(self, method: MethodSpec) -> Teacher | None:
        """The teacher shared by every seed of `method` (an ensemble), or None when it is built per seed."""
        spec = method.teacher
        if not isinstance(spec, EnsembleTeacherSpec):
            return None
        models, info = [], EnsembleInfo()
        for name, member in ensemble_members(self.recipe, spec):
            model, member_info = self._member(member)
            models.append(model)
            info.members.append({"name": name, "source": member_info.source, "metrics": member_info.metrics})
            info.parameters += member_info.parameters
        ensemble = Ensemble(models, spec.weights, combine=spec.combine, normalise=spec.normalise)
        test = getattr(self.setup.data, "test", None)
        if test is not None:
            logits, labels = model_logits(ensemble, test, self.recipe.data.eval_batch_size)
            info.metrics = classification_metrics(logits, labels)
        self.ensembles[method.name] = info
        return FrozenTeacher(ensemble)

    def seed_teacher(self, method: MethodSpec, student: nn.Module) -> Teacher | None:
        """The teacher of one seed's student (online peer, EMA), built right after the student."""
        spec = method.teacher
        if isinstance(spec, OnlineTeacherSpec):
            peer = self.task.peer_model(self.recipe, spec.model or self.recipe.student, self.setup)
            terms = [(o.name, o.weight, dict(o.params)) for o in spec.objectives]
            return CoTrainedTeacher(peer, terms, lr=spec.lr, weight_decay=spec.weight_decay)
        if isinstance(spec, EMATeacherSpec):
            return EMATeacher(student, decay=spec.decay)
        if isinstance(spec, MixtureTeacherSpec):
            return self._mixture(spec, student)
        return None

    def _mixture(self, spec: MixtureTeacherSpec, student: nn.Module) -> Teacher:
        """S25's teacher of one seed: the members (obtained once, shared by seeds), fresh masks and gate; the
        masks fit on the training set in an order of their own (drawn from the seed's random state)."""
        members = [self._member(member)[0] for member in spec.members]
        train_set, recipe = self.setup.train_set, self.recipe
        batch_size = recipe.data.batch_size
        order = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ())))
        loader = DataLoader(
            train_set,
            batch_size=batch_size,
            shuffle=True,
            generator=order,
            collate_fn=getattr(train_set, "collate_fn", None),
        )
        per_epoch = steps_per_epoch(len(train_set), batch_size, recipe.trainer.grad_accum)  # type: ignore[arg-type]
        settings = MixtureSettings(**spec.model_dump(include=set(MixtureSettings.__dataclass_fields__)))
        return MixtureTeacher(members, student, loader, per_epoch, layers=spec.layers, settings=settings)

    def _member(self, spec: TeacherSpec) -> tuple[nn.Module, TeacherInfo]:
        key = fingerprint(spec.model_dump(mode="json"))[:16]
        if key not in self._members:
            self._members[key] = self.task.member_teacher(
                self.recipe, spec, self.setup, self.folder, progress=self.progress, run_name=f"teachers/{key}"
            )
        return self._members[key]


def split_terms(method: MethodSpec) -> tuple[list[int], list[int]]:
    """Indices of the method's label terms (no teacher) and of its teacher terms."""
    label, taught = [], []
    for i, objective in enumerate(method.objectives):
        factory = OBJECTIVES.entry(objective.name).factory  # a class: its flags are class attributes
        (taught if getattr(factory, "needs_teacher", True) else label).append(i)
    return label, taught


def generation_terms(method: MethodSpec, terms: list[Term], alpha: float | None) -> list[Term]:
    """S22's weighting of one generation: label terms x alpha and teacher terms x (1 - alpha); the first
    generation (alpha None) trains on the label terms alone."""
    label, taught = split_terms(method)
    if alpha is None:
        return [terms[i] for i in label]
    return [
        replace(term, weight=term.weight * (alpha if i in label else 1.0 - alpha))
        for i, term in enumerate(terms)
        if i in label or i in taught
    ]


def held_out_split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(the rest, a seeded random `fraction`) of a data set: S22's alpha is estimated on examples no
    generation trains on (never on the test split)."""
    count = len(data)  # type: ignore[arg-type]
    held = max(1, round(count * fraction))
    if count - held < 1:
        raise UserError(f"self-distillation: {count} training examples cannot spare a held-out part")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(data, sorted(order[held:])), Subset(data, sorted(order[:held]))


def estimated_alpha(first: nn.Module, distilled_only: nn.Module, held_out: Dataset, batch_size: int) -> float:
    """S22's estimate of a generation's label weight: the alpha that puts the interpolation of the label-only
    model's and the teacher-only (alpha 0) model's held-out predictions closest to the one-hot labels
    (`distill.losses.ground_truth_weighting.estimate_alpha`)."""
    from distill.losses.ground_truth_weighting import estimate_alpha

    p1, labels = model_logits(first, held_out, batch_size)
    p0, _ = model_logits(distilled_only, held_out, batch_size)
    return estimate_alpha(p0, labels, p1, from_logits=True)


def check_regime(recipe: Recipe, method: MethodSpec) -> None:
    """Refuse, in one line and before anything trains (the teacher included), a regime this method cannot
    use."""
    spec = method.teacher
    if isinstance(spec, SelfTeacherSpec):
        label, taught = split_terms(method)
        if not label:
            raise UserError(
                f"method '{method.name}': self-distillation starts from a generation trained on the "
                "labels; add a label term (cross_entropy)"
            )
        if not taught:
            raise UserError(
                f"method '{method.name}': self-distillation needs a teacher term (e.g. hinton_kd) to "
                "learn from the previous generation"
            )
    if isinstance(spec, MixtureTeacherSpec):
        if not split_terms(method)[1]:
            raise UserError(
                f"method '{method.name}': a mixture teacher needs a teacher term (e.g. hinton_kd) to "
                "learn from"
            )
        trainer = recipe.trainer
        if trainer.max_steps is None and trainer.epochs <= spec.warmup_epochs:
            raise UserError(
                f"method '{method.name}': the mixture's warmup_epochs ({spec.warmup_epochs}) leave none "
                f"of the {trainer.epochs} epochs to routing; lower warmup_epochs or train longer"
            )
