"""KD^3's selection for a classification method (S35, `distill.sources.kd3`): the source's settings, what a
`kd3` method cannot have (refused in one line before anything trains), and the plan whose seeds train on the
transfer rows KD^3 keeps per batch. See docs/kd3.md.

After `fit` the result's `final` and `best` metrics carry what the selection did: `kd3_kept_rate`, `kd3_used`
and, on a `shifted` transfer set (`distill.data.shift`, which marks its outliers), `kd3_real_kept_rate` and
`kd3_outlier_kept_rate`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from distill.cache.indexed import IndexedDataset
from distill.errors import UserError
from distill.objectives.terms import Term
from distill.recipe.check import check_param_values
from distill.recipe.schema import MethodSpec, Recipe
from distill.sources.kd3 import KD3Batches, KD3Settings
from distill.sources.settings import from_params
from distill.tasks.base import MethodPlan, SeedPlan, TaskSetup
from distill.train import FitResult


def kd3_settings(params: dict[str, Any], where: str = "source 'kd3'") -> KD3Settings:
    """The settings of a `kd3` source; every mistake one line (`UserError`)."""
    check_param_values(KD3Settings, params, f"{where}: params")
    return from_params(KD3Settings, params, where)


def check_kd3_method(recipe: Recipe, method: MethodSpec, where: str) -> None:
    """What a `kd3` method cannot have, refused in one line before anything trains (`Task.check`): no
    teacher, a teacher cache (the selection runs the teacher on each batch), a method's own teacher regime."""
    if recipe.teacher is None:
        raise UserError(
            f"{where}: selects rows by the teacher's and the student's predictions; add a teacher"
        )
    if recipe.teacher.cache is not None:
        raise UserError(f"{where}: runs the teacher on every batch; use a live teacher, not a cache")
    if method.teacher is not None:
        raise UserError(
            f"{where}: uses the recipe's teacher; a method's own teacher (methods[].teacher) is refused"
        )


def kd3_plan(base: MethodPlan, recipe: Recipe, method: MethodSpec, setup: TaskSetup) -> MethodPlan:
    """`base` (a classification method's plan) with KD^3's selection as each seed's batch transform."""
    source = method.source or recipe.source
    where = f"method '{method.name}': source 'kd3'"
    settings = kd3_settings(source.params, where)
    check_kd3_method(recipe, method, where)
    if not isinstance(setup.teacher, nn.Module):
        raise UserError(f"{where}: needs a teacher model to run on each batch")
    outlier = getattr(base.train_set, "outlier", None)  # a `shifted` transfer set marks its outliers
    return KD3Plan(
        IndexedDataset(base.train_set),
        dict(base.info),
        base=base,
        settings=settings,
        outlier=outlier if isinstance(outlier, Tensor) else None,
    )


@dataclass
class KD3Plan(MethodPlan):
    """A `MethodPlan` whose seeds train as `base`'s do, on the same rows with sample ids, KD^3's selection
    added as the batch transform. It overrides `seed` (which receives the teacher the run gives)."""

    base: MethodPlan | None = None
    settings: KD3Settings | None = None
    outlier: Tensor | None = None

    def seed(self, student: nn.Module, seed: int, terms: list[Term], teacher: Any) -> SeedPlan:
        assert self.base is not None and self.settings is not None
        plan = self.base.seed(student, seed, terms, teacher)
        if plan.batch_transform is not None:
            raise UserError("source 'kd3' cannot be combined with another batch transform")
        if not isinstance(plan.teacher, nn.Module):
            raise UserError("source 'kd3' needs a teacher model to run on each batch")
        transform = KD3Batches(self.settings, plan.teacher, len(self.train_set), self.outlier)  # type: ignore[arg-type]
        then = plan.finish

        def finish(result: FitResult, epochs: int) -> None:
            if then is not None:
                then(result, epochs)
            for row in (result.final, result.best):
                row.update(transform.report())

        return replace(plan, train_set=self.train_set, batch_transform=transform, finish=finish)
