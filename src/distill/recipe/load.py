"""Read a recipe file into a validated `Recipe`, turning every mistake into one line that says where."""

from __future__ import annotations

import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distill.errors import UserError
from distill.recipe.schema import Recipe
from distill.registry import nearest


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader (no tags that build objects) that refuses a key given twice in one mapping. Merge keys
    (`<<: *anchor`) stay allowed: the mapping's own keys override the merged ones, as YAML specifies."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def builtin_recipe_text(name: str) -> str:
    return resources.files("distill.recipes").joinpath(f"{name}.yaml").read_text()


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package (`distill run NAME` runs one)."""
    files = resources.files("distill.recipes").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}{where}: {err.problem or err}".rstrip()) from err
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({err})") from err
    if data is None:
        raise UserError(f"{source}: the recipe is empty")
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            inner = _inner_model(arg)
            if inner is not None:
                return inner
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at `loc` (for suggesting keys)."""
    current: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):  # a list index: `_inner_model` already stepped inside the list
            continue
        field = current.model_fields.get(part) if current is not None else None
        current = _inner_model(field.annotation) if field is not None else None
    return current


def _loc_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "recipe"


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line for the first problem pydantic found."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        hint = nearest(str(loc[-1]), list(owner.model_fields)) if owner else None
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return f"{source}: {_loc_text(loc)}: unknown key{suggestion}"
    message = first["msg"]
    if first["type"] in {"model_type", "dict_type"}:
        message = f"expected a mapping, got {first.get('input')!r}"
    elif "input" in first and first["type"] not in {"missing", "value_error", "assertion_error"}:
        message += f" (got {first['input']!r})"
    message = message.removeprefix("Value error, ")
    return f"{source}: {_loc_text(loc)}: {message}"


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, source)) from err


def load_recipe(path: str | Path | None = None) -> Recipe:
    """A recipe from a YAML file, a built-in recipe by name (`lm_shakespeare`), or the quickstart when `path`
    is None. A file that exists wins over a built-in of the same name."""
    if path is None:
        path = "quickstart"
    path = Path(path)
    if not path.exists():
        name = str(path)
        if name in builtin_recipes():
            return recipe_from_dict(parse_yaml(builtin_recipe_text(name), name), name)
        hint = nearest(name, builtin_recipes())
        raise UserError(f"recipe file not found: {path}" + (f" (built-in recipe '{hint}'?)" if hint else ""))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read recipe {path}: {err}") from err
    recipe = recipe_from_dict(parse_yaml(text, str(path)), str(path))
    recipe._source_file = path
    return recipe
