"""Selecting a classification method's unlabelled rows (`distill.sources.selection`): LLKD (S05), which keeps
per batch the rows where the teacher is confident and the student needs them, and `random_subset`, a fixed
random share of the unlabelled pool (its data-efficiency baseline). The settings, what a selecting method
cannot have (refused in one line before anything trains), the batch transform and the plan. See
docs/llkd.md.

Both report what they used after `fit`, in the result's `final` and `best` metrics: `unlabelled_used`, the
share of the unlabelled pool the student ever trained on; LLKD adds `unlabelled_rate` (the share of the
unlabelled rows it met that it kept, over every batch) and its thresholds at the end."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from distill.cache.indexed import IndexedDataset
from distill.data.base import IGNORE_LABEL
from distill.errors import UserError
from distill.heads import call_model
from distill.models.adapters import logits_of
from distill.objectives.terms import Term
from distill.recipe.check import check_param_values
from distill.recipe.schema import MethodSpec, Recipe
from distill.sources.selection import (
    LLKDSettings,
    SubsetSettings,
    ThresholdState,
    llkd_select,
    random_subset,
)
from distill.sources.settings import from_params
from distill.tasks.base import MethodPlan, SeedPlan, TaskSetup
from distill.train import FitResult

SETTINGS: dict[str, type] = {"llkd": LLKDSettings, "random_subset": SubsetSettings}


def selection_settings(name: str, params: dict[str, Any], where: str | None = None) -> Any:
    """The settings of an `llkd` / `random_subset` source; every mistake one line (`UserError`)."""
    where = where or f"source '{name}'"
    check_param_values(SETTINGS[name], params, f"{where}: params")
    return from_params(SETTINGS[name], params, where)


def check_selection_method(recipe: Recipe, method: MethodSpec, where: str) -> None:
    """What a selecting method cannot have, refused in one line before anything trains (`Task.check`): a
    teacher cache (LLKD runs the teacher on each batch; a subset would misalign the cache's sample ids), a
    method's own teacher regime, and (LLKD) no teacher at all."""
    source = method.source or recipe.source
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        raise UserError(f"{where}: selects rows of the data set by position; use a live teacher, not a cache")
    if method.teacher is not None:
        raise UserError(
            f"{where}: uses the recipe's teacher; a method's own teacher (methods[].teacher) is refused"
        )
    if source.name == "llkd" and recipe.teacher is None:
        raise UserError(f"{where}: selects rows by the teacher's confidence, but the recipe has no teacher")


def hidden_rows(dataset: Dataset) -> Tensor:
    """(N,) bool: the rows of a training set whose label is hidden (-100, `unlabelled: true`)."""
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, Tensor) and isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        labels = dataset.tensors[1]
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]
    if labels.is_floating_point() or labels.dim() != 1:
        return torch.zeros(len(labels), dtype=torch.bool)
    return labels == IGNORE_LABEL


def selection_plan(base: MethodPlan, recipe: Recipe, method: MethodSpec, setup: TaskSetup) -> MethodPlan:
    """`base` (a classification method's plan) with its unlabelled rows selected as the method's (or the
    recipe's) `llkd` / `random_subset` source says."""
    source = method.source or recipe.source
    kind = source.name
    where = f"method '{method.name}': source '{kind}'"
    settings = selection_settings(kind, source.params, where)
    check_selection_method(recipe, method, where)
    hidden = hidden_rows(setup.train_set)
    if not bool(hidden.any()):
        raise UserError(
            f"{where}: selects among unlabelled rows (label -100) but the training set has none; "
            "set data.params.unlabelled: true with labelled_per_class"
        )
    if kind == "random_subset":
        return SelectionPlan(
            base.train_set, dict(base.info), base=base, kind=kind, settings=settings, hidden=hidden
        )
    if not isinstance(setup.teacher, nn.Module):
        raise UserError(f"{where}: needs a teacher model to run on each batch")
    return SelectionPlan(
        IndexedDataset(base.train_set),
        dict(base.info),
        base=base,
        kind=kind,
        settings=settings,
        hidden=hidden,
        num_classes=int(setup.data.num_classes),
    )


@dataclass
class SelectionPlan(MethodPlan):
    """A `MethodPlan` whose seeds train as `base`'s do (same teacher, the task's own start) on a random
    subset of the pool (`random_subset`) or with LLKD's selection as a batch transform (`llkd`). It overrides
    `seed` rather than setting `start`: `seed` receives the teacher the run gives (a wrapped one included)."""

    base: MethodPlan | None = None
    kind: str = "llkd"
    settings: Any = None
    hidden: Tensor | None = None
    num_classes: int = 0

    def seed(self, student: nn.Module, seed: int, terms: list[Term], teacher: Any) -> SeedPlan:
        assert self.base is not None and self.hidden is not None
        plan = self.base.seed(student, seed, terms, teacher)
        if plan.batch_transform is not None:
            raise UserError(f"source '{self.kind}' cannot be combined with another batch transform")
        if self.kind == "random_subset":
            draw = seed if self.settings.seed is None else self.settings.seed
            kept = random_subset(self.hidden, self.settings.fraction, draw)
            used = float(self.hidden[kept].sum()) / float(self.hidden.sum())
            return replace(
                plan,
                train_set=Subset(plan.train_set, kept.tolist()),
                finish=_reporting({"unlabelled_used": used}, plan.finish),
            )
        if not isinstance(plan.teacher, nn.Module):
            raise UserError("source 'llkd' needs a teacher model to run on each batch")
        transform = LLKDBatches(self.settings, self.num_classes, plan.teacher, self.hidden)
        return replace(
            plan,
            train_set=self.train_set,
            batch_transform=transform,
            finish=_reporting(transform.report, plan.finish),
        )


def _reporting(values: Any, then: Any) -> Any:
    """A seed plan's `finish` that writes `values` (a dict, or a function giving one) into the result's final
    and best metrics, after the plan's own `finish`."""

    def finish(result: FitResult, epochs: int) -> None:
        if then is not None:
            then(result, epochs)
        out = values() if callable(values) else values
        for row in (result.final, result.best):
            row.update(out)

    return finish


class LLKDBatches:
    """The batch transform: `(batch, student, progress) -> batch` for dict batches with `inputs`, `labels`,
    `index` (`IndexedDataset`) and perhaps `mask`. Labelled rows pass as they are; of the unlabelled rows,
    those LLKD keeps get the teacher's pseudo-label (with `pseudo_labels`), the others leave the batch's
    `mask` (no term reads them). The student's need is read in eval mode without gradients (no dropout, no
    batch-norm update)."""

    def __init__(self, settings: LLKDSettings, num_classes: int, teacher: nn.Module, hidden: Tensor) -> None:
        self.settings = settings
        self.teacher = teacher
        self.state = ThresholdState.initial(num_classes)
        self.hidden = hidden.bool().cpu()
        self.used = torch.zeros(len(hidden), dtype=torch.bool)  # unlabelled rows ever kept, by position
        self.met = 0  # unlabelled rows met, over every batch
        self.kept = 0

    def __call__(self, batch: Any, student: nn.Module, progress: Any) -> Any:
        if not isinstance(batch, dict) or "index" not in batch:
            raise UserError("source 'llkd' reads batches with sample ids (an IndexedDataset)")
        inputs, labels, index = batch["inputs"], batch.get("labels"), batch["index"]
        if labels is None or labels.is_floating_point() or labels.dim() != 1:
            raise UserError("source 'llkd' needs one class index per row (label -100 for an unlabelled row)")
        mask = batch.get("mask")
        unlabelled = labels == IGNORE_LABEL
        if mask is not None:
            unlabelled = unlabelled & mask.bool()
        if not bool(unlabelled.any()):
            return batch
        teacher_logits = self._teacher_logits(inputs)
        with torch.no_grad():
            was_training = student.training
            student.eval()
            try:
                student_logits = logits_of(call_model(student, inputs))
            finally:
                student.train(was_training)
        rows = unlabelled.nonzero().flatten()
        selection = llkd_select(
            teacher_logits[rows], student_logits[rows].detach(), self.state, self.settings
        )
        self.state = selection.state
        kept_rows = rows[selection.keep]
        dropped = rows[~selection.keep]
        labels = labels.clone()
        if self.settings.pseudo_labels:
            labels[kept_rows] = selection.labels[selection.keep].to(labels.dtype)
        counted = (
            torch.ones(len(labels), dtype=torch.bool, device=labels.device)
            if mask is None
            else mask.bool().clone()
        )
        counted[dropped] = False
        self.met += len(rows)
        self.kept += len(kept_rows)
        self.used[index[kept_rows].cpu()] = True
        return dict(batch) | {"labels": labels, "mask": counted}

    def _teacher_logits(self, inputs: Any) -> Tensor:
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                return logits_of(call_model(self.teacher, inputs)).float()
        finally:
            self.teacher.train(was_training)

    def report(self) -> dict[str, float]:
        """What the selection used: the share of the unlabelled pool ever kept, the share of the unlabelled
        rows met that were kept, and the thresholds at the end (global terms)."""
        pool = max(1, int(self.hidden.sum()))
        tau_t, tau_s = self.state.global_thresholds()
        return {
            "unlabelled_used": float((self.used & self.hidden).sum()) / pool,
            "unlabelled_rate": self.kept / max(1, self.met),
            "llkd_teacher_threshold": tau_t,
            "llkd_student_threshold": tau_s,
        }
