"""Command-line changes to a recipe, `--set KEY.PATH=VALUE` (`distill run`, `distill bench vision`): parsed
into a nested mapping and merged into the recipe's YAML mapping before it is validated, so that a wrong key
is refused as one written in the file. Values are read as the recipe's YAML (1.2 scalars: `on` stays a
string; flow lists and mappings: `seeds=[0, 1]`)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from distill.errors import UserError, clipped
from distill.recipe.load import RecipeLoader


def parse_value(text: str, item: str) -> Any:
    """`text` as a YAML value read like the recipe's; empty is null. A malformed one is one line."""
    if not text.strip():
        return None
    loader = None
    try:
        loader = RecipeLoader(text)
        return loader.get_single_data()
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise UserError(f"--set '{clipped(item)}': value is not valid YAML ({clipped(problem)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["trainer.epochs=2", "data.params.root=/x"]` -> a nested dict."""
    tree: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{clipped(item)}': expected KEY.PATH=VALUE, e.g. trainer.epochs=2")
        value = parse_value(text, item)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(
                    f"--set '{clipped(item)}': '{clipped(part)}' is given both as a value and as a section"
                )
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
