"""Feature objectives' layers checked against the recipe's models before anything trains: a misspelt
module path or a tap index out of range is one line at once, not after the teacher has trained for hours."""

from __future__ import annotations

from torch import nn

from distill.errors import UserError
from distill.objectives import build_objective
from distill.objectives.features import is_feature_objective
from distill.recipe.schema import MethodSpec, Recipe
from distill.train.feature_taps import bind_feature_objectives


def method_reads_features(method: MethodSpec) -> bool:
    """Whether any of the method's objectives reads module outputs (a feature objective)."""
    return any(is_feature_objective(t.name) for t in method.objectives)


def reads_features(recipe: Recipe) -> bool:
    """Whether any method of the recipe has a feature objective."""
    return any(method_reads_features(method) for method in recipe.method_list())


def check_feature_layers(recipe: Recipe, student: nn.Module, teacher: nn.Module | None) -> None:
    """Resolve every feature objective's layers against `student` and `teacher` (an untrained model of the
    teacher's architecture will do: only module paths and feature taps are read; None for a cache)."""
    for index, method in enumerate(recipe.method_list()):
        terms = [t for t in method.objectives if is_feature_objective(t.name)]
        if not terms:
            continue
        objectives = [build_objective(t.name, t.params) for t in terms]
        try:
            bind_feature_objectives(objectives, [t.name for t in terms], student, teacher)
        except UserError as err:
            where = f"methods[{index}] ({method.name})" if recipe.methods else "objectives"
            raise UserError(f"{where}: {err}") from None
