"""The vision benchmark's suites: which packaged recipes each runs, and how `--seeds`, `--methods` and
`--set KEY.PATH=VALUE` overrides are applied to them."""

from __future__ import annotations

from typing import Any

from distill.bench.methods import Setting, method_spec, select_methods
from distill.errors import UserError
from distill.recipe.check import check_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.recipe.overrides import merge, parse_set
from distill.recipe.schema import Recipe
from distill.registry import nearest

__all__ = ["SUITES", "merge", "parse_set", "suite_recipe_names", "suite_recipes"]

SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("bench_vision_quick_digits", "bench_vision_quick_mnist"),
    "standard": ("bench_vision_standard_fashion_mnist", "bench_vision_standard_cifar10"),
    "cifar100": ("bench_vision_cifar100",),
}


def suite_recipe_names(suite: str) -> tuple[str, ...]:
    if suite not in SUITES:
        hint = nearest(suite, list(SUITES))
        raise UserError(
            f"--suite: unknown suite '{suite}'"
            + (f"; did you mean '{hint}'?" if hint else f"; known: {', '.join(SUITES)}")
        )
    return SUITES[suite]


def suite_recipes(
    suite: str,
    *,
    seeds: int | None = None,
    methods: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[tuple[Recipe, list[tuple[str, Setting]]]]:
    """The suite's recipes, each with the benchmark's methods, `seeds` (0..N-1) and `overrides` applied."""
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds: need at least 1, got {seeds}")
    chosen = select_methods(methods)
    out = []
    for name in suite_recipe_names(suite):
        data = parse_yaml(builtin_recipe_text(name), name)
        data = merge(data, overrides or {})
        recipe = recipe_from_dict(data, name)
        epochs = recipe.trainer.epochs
        recipe.methods = [method_spec(setting, epochs) for _, setting in chosen]
        recipe.objectives = None
        if seeds is not None:
            recipe.seeds = list(range(seeds))
        recipe = recipe_from_dict(recipe.model_dump(mode="json"), name)  # validate the result again
        check_recipe(recipe, name)
        out.append((recipe, chosen))
    return out
