"""The sources that serve classifiers (`methods[].source`): what each does to a method's training batches,
the one-line check of what it cannot serve (run before anything trains), and the plan of its seeds'
batches. A task lists the ones it takes in `Task.classifier_sources` (image classification: all; text: the
selections, since token ids cannot be mixed); `Task.check` refuses the others in one line.

The checks and plans live beside their maths (`mixing`, `selection`, `kd3`) and are imported when used:
those modules build on `distill.tasks.base`, which reads this table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.recipe.schema import MethodSpec, Recipe
    from distill.tasks.base import MethodPlan, TaskSetup

Check = Callable[["Recipe", "MethodSpec", str], None]
Plan = Callable[["MethodPlan", "Recipe", "MethodSpec", "TaskSetup"], "MethodPlan"]

MIXES = "mixes input images or feature vectors"
SELECTS = "selects unlabelled rows of a classification data set (data.params.unlabelled: true)"
# What each source does, in the words of a refusal ("source 'x' <does>; task 'y' cannot ...").
CLASSIFIER_SOURCES: dict[str, str] = {
    "mixup": MIXES,
    "cutmix": MIXES,
    "llkd": SELECTS,
    "random_subset": SELECTS,
    "kd3": "selects rows of a classification transfer set by the teacher's and the student's predictions",
}


def _handlers(name: str) -> tuple[Check, Plan]:
    if name in ("mixup", "cutmix"):
        from distill.tasks.mixing import check_mixing_method, mixing_plan

        return check_mixing_method, mixing_plan
    if name in ("llkd", "random_subset"):
        from distill.tasks.selection import check_selection_method, selection_plan

        return check_selection_method, selection_plan
    from distill.tasks.kd3 import check_kd3_method, kd3_plan

    return check_kd3_method, kd3_plan


def check_source(name: str, recipe: Recipe, method: MethodSpec) -> None:
    """Refuse, in one line, what source `name` cannot serve in `method`."""
    check, _ = _handlers(name)
    check(recipe, method, f"method '{method.name}': source '{name}'")


def plan_source(
    name: str, base: MethodPlan, recipe: Recipe, method: MethodSpec, setup: TaskSetup
) -> MethodPlan:
    """`base` (the method's plain plan) with each seed's batches as source `name` makes them."""
    _, plan = _handlers(name)
    return plan(base, recipe, method, setup)
