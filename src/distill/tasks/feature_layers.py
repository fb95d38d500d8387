"""Feature objectives' layers checked against the recipe's models before anything trains: a misspelt
module path or a tap index out of range is one line at once, not after the teacher has trained for hours."""

from __future__ import annotations

from torch import nn

from distill.errors import UserError
from distill.objectives import OBJECTIVES, build_objective
from distill.recipe.schema import Recipe
from distill.train.feature_taps import bind_feature_objectives


def is_feature(name: str) -> bool:
    return OBJECTIVES.entry(name).extra.get("kind") == "feature"


def reads_features(recipe: Recipe) -> bool:
    """Whether any method of the recipe has a feature objective."""
    return any(is_feature(t.name) for method in recipe.method_list() for t in method.objectives)


def check_feature_layers(recipe: Recipe, student: nn.Module, teacher: nn.Module | None) -> None:
    """Resolve every feature objective's layers against `student` and `teacher` (an untrained model of the
    teacher's architecture will do: only module paths and feature taps are read; None for a cache)."""
    for index, method in enumerate(recipe.method_list()):
        terms = [t for t in method.objectives if is_feature(t.name)]
        if not terms:
            continue
        objectives = [build_objective(t.name, t.params) for t in terms]
        try:
            bind_feature_objectives(objectives, [t.name for t in terms], student, teacher)
        except UserError as err:
            where = f"methods[{index}] ({method.name})" if recipe.methods else "objectives"
            raise UserError(f"{where}: {err}") from None
