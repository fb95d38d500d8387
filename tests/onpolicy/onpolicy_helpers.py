"""The packaged on-policy recipes, shrunk to seconds: tiny Llama teacher and student, a few dozen 2-digit
additions, one epoch, one seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.recipe.schema import Recipe

TINY = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def shrunk(name: str, tmp_path: Path, **changes: Any) -> Recipe:
    data = parse_yaml(builtin_recipe_text(name), name)
    small: dict[str, Any] = {
        "student": {"params": {"config": TINY}},
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    if data["data"]["name"] == "arithmetic":
        small["data"] = {
            "params": {"digits": 2, "train_examples": 32, "test_examples": 6},
            "batch_size": 8,
            "eval_batch_size": 8,
        }
    if "teacher" in data:
        small["teacher"] = {"params": {"config": {**TINY, "hidden_size": 24}}, "train": {"epochs": 1}}
    return recipe_from_dict(merged(merged(data, small), changes), name)
