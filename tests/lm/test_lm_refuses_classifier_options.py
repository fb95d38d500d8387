"""A language-model recipe refuses, in one line and before anything runs, the options that serve classifiers:
image-mixing and sample-selection sources, and teacher regimes."""

from __future__ import annotations

import pytest

from distill.errors import UserError
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.tasks import task_for


def lm_recipe(**method: object) -> object:
    data = parse_yaml(builtin_recipe_text("lm_shakespeare"), "lm_shakespeare")
    data.pop("objectives", None)
    data["methods"] = [{"name": "m", "objectives": [{"name": "forward_kl"}], **method}]
    return recipe_from_dict(data, "lm_shakespeare")


@pytest.mark.parametrize("source", ["mixup", "cutmix", "llkd", "random_subset", "kd3"])
def test_classifier_sources_are_refused(source: str) -> None:
    recipe = lm_recipe(source={"name": source})
    with pytest.raises(UserError, match=f"source '{source}' serves classifiers") as err:
        task_for(recipe).check(recipe)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_teacher_regimes_are_refused() -> None:
    recipe = lm_recipe(teacher={"kind": "ema"})
    with pytest.raises(UserError, match="teacher kind 'ema' is not available for language models"):
        task_for(recipe).check(recipe)  # type: ignore[arg-type]
