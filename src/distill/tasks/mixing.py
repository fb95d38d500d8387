"""Mixing a classification method's batches (S37, `distill.sources.mixup`): the source's settings, what a
mixing method cannot have (refused in one line before anything trains), and the plan whose seeds train
on mixed batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from distill.errors import UserError
from distill.objectives.terms import Term
from distill.recipe.check import check_param_values
from distill.recipe.schema import MethodSpec, Recipe
from distill.sources.mixup import MixBatches, MixSettings, check_mixable
from distill.sources.settings import from_params
from distill.tasks.base import MethodPlan, SeedPlan, TaskSetup


def mix_settings(name: str, params: dict[str, Any], where: str | None = None) -> MixSettings:
    """The settings of a `mixup` / `cutmix` source; every mistake one line (`UserError`)."""
    where = where or f"source '{name}'"
    check_param_values(MixSettings, params, f"{where}: params")
    return from_params(MixSettings, params, where)


def check_mixing_method(recipe: Recipe, method: MethodSpec, where: str) -> None:
    """What a method mixing its batches cannot have, refused in one line before anything trains (`Task.check`
    calls this): a teacher cache (it holds the unmixed images' targets), and objectives that read class
    indices (dkd, pld): of the label objectives only `cross_entropy` reads mixed (soft) labels."""
    from distill.objectives.base import build_objective
    from distill.objectives.supervised import CrossEntropy

    if recipe.teacher is not None and recipe.teacher.cache is not None:
        raise UserError(f"{where}: a teacher cache holds the unmixed images' targets; use a live teacher")
    for spec in method.objectives:
        objective = build_objective(spec.name, spec.params)
        if objective.needs_labels and not isinstance(objective, CrossEntropy):
            raise UserError(
                f"{where}: objective '{spec.name}' reads class indices; of the label objectives only "
                "cross_entropy reads mixed (soft) labels"
            )


def mixing_plan(base: MethodPlan, recipe: Recipe, method: MethodSpec, setup: TaskSetup) -> MethodPlan:
    """`base` (a classification method's plan), each seed trained on batches mixed as the method's (or the
    recipe's) `mixup` / `cutmix` source says. What cannot be mixed is refused in one line."""
    from distill.teachers import CachedTeacher

    source = method.source or recipe.source
    kind = source.name
    where = f"method '{method.name}': source '{kind}'"
    settings = mix_settings(kind, source.params, where)
    check_mixing_method(recipe, method, where)
    if isinstance(setup.teacher, CachedTeacher):
        raise UserError(f"{where}: a teacher cache holds the unmixed images' targets; use a live teacher")
    sample = setup.train_set[0]
    inputs = sample[0] if isinstance(sample, list | tuple) else sample
    if isinstance(inputs, Tensor):
        try:
            check_mixable(kind, inputs[None])
        except UserError as err:
            raise UserError(f"{where}: {str(err).removeprefix(f'source {kind!r} ')}") from None
    num_classes = int(setup.data.num_classes)
    return MixingPlan(
        base.train_set,
        dict(base.info),
        base=base,
        transform=lambda seed: MixBatches(kind, settings, num_classes, seed),
    )


@dataclass
class MixingPlan(MethodPlan):
    """A `MethodPlan` whose seeds train as `base`'s do (same data, same teacher, the task's own start) with
    the mixing transform added. It overrides `seed` rather than setting `start`: `seed` receives the
    teacher the run gives (a wrapped one included), which `start` does not."""

    base: MethodPlan | None = None
    transform: Callable[[int], MixBatches] | None = None

    def seed(self, student: nn.Module, seed: int, terms: list[Term], teacher: Any) -> SeedPlan:
        assert self.base is not None and self.transform is not None
        plan = self.base.seed(student, seed, terms, teacher)
        if plan.batch_transform is not None:
            raise UserError("mixup / cutmix cannot be combined with another batch transform")
        plan.batch_transform = self.transform(seed)
        return plan
