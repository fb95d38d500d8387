"""Read a recipe file into a validated `Recipe`, turning every mistake into one line that says where."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distill.errors import UserError, clipped, shown
from distill.recipe.schema import Recipe
from distill.registry import nearest

# YAML 1.2 core-schema scalars (PyYAML implements YAML 1.1): only true / false are booleans (`on`, `off`,
# `yes`, `no` stay strings: `fused_loss: on` is the string "on"), `5e-4` is a number, `010` is ten, `1:20`
# is a string.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
MAX_EXPANDED_NODES = 50_000  # a recipe is a few hundred nodes; aliases may not blow it up beyond this


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader (no tags that build objects) with YAML 1.2 core-schema scalars, that refuses a key given
    twice in one mapping. Merge keys (`<<: *anchor`) stay allowed: the mapping's own keys override the merged
    ones, as YAML specifies."""

    yaml_implicit_resolvers = {
        first: [
            (tag, regexp)
            for tag, regexp in resolvers
            if tag.rsplit(":", 1)[-1] not in {"bool", "int", "float"}
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = str(self.construct_scalar(node))
        if value.startswith(("0x", "0o")):
            return int(value[2:], 16 if value[1] == "x" else 8)
        return int(value, 10)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
for _tag, _pattern, _first in (
    ("bool", _BOOL, "tTfF"),
    ("int", _INT, "-+0123456789"),
    ("float", _FLOAT, "-+.0123456789"),
):
    RecipeLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _pattern, list(_first))


class _RecursiveAlias(Exception):
    """A node that contains itself through an alias."""


def expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """How many nodes the document has once every alias is expanded (each alias counts its anchor's size
    again). A node that contains itself through an alias is refused."""
    key = id(node)
    if key in open_:
        raise _RecursiveAlias
    if key in memo:
        return memo[key]
    open_.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    size = 1
    for child in children:
        size += expanded_size(child, memo, open_)
        if size > MAX_EXPANDED_NODES:
            break
    open_.discard(key)
    memo[key] = size
    return size


def builtin_recipe_text(name: str) -> str:
    return resources.files("distill.recipes").joinpath(f"{name}.yaml").read_text()


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package (`distill run NAME` runs one)."""
    files = resources.files("distill.recipes").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        loader = RecipeLoader(text)  # refuses characters YAML does not allow (NUL, most control characters)
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({clipped(str(err).splitlines()[0], 200)})") from None
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node, {}, set()) > MAX_EXPANDED_NODES:
            raise UserError(
                f"{source}: the recipe expands to more than {MAX_EXPANDED_NODES:,} values through its "
                "aliases (*name); write it out or use fewer aliases"
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}{where}: {err.problem or err}".rstrip()) from err
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({shown(str(err), 200)})") from err
    except _RecursiveAlias:
        raise UserError(
            f"{source}: the recipe refers to itself through an alias (a recursive anchor)"
        ) from None
    except RecursionError:
        raise UserError(f"{source}: the recipe nests too deeply") from None
    finally:
        loader.dispose()
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
        if not isinstance(part, int):  # a key the user wrote: one line, and never unbounded
            part = clipped(" ".join(str(part).split()))
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
        message = f"expected a mapping, got {shown(first.get('input'))}"
    elif "input" in first and first["type"] not in {"missing", "value_error", "assertion_error"}:
        message += f" (got {shown(first['input'])})"
    message = message.removeprefix("Value error, ")
    return f"{source}: {_loc_text(loc)}: {message}"


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, source)) from err


def load_recipe(
    path: str | Path | None = None, *, edit: Callable[[dict[str, Any]], dict[str, Any]] | None = None
) -> Recipe:
    """A recipe from a YAML file, a built-in recipe by name (`lm_shakespeare`), or the quickstart when `path`
    is None. A file that exists wins over a built-in of the same name. `edit` changes the parsed mapping
    before it is validated (`distill run --set`), so a wrong key it brings is named as one in the file."""
    if path is None:
        path = "quickstart"
    path = Path(path)
    edit = edit or (lambda data: data)
    if not path.exists():
        name = str(path)
        if name in builtin_recipes():
            return recipe_from_dict(edit(parse_yaml(builtin_recipe_text(name), name)), name)
        hint = nearest(name, builtin_recipes())
        raise UserError(f"recipe file not found: {path}" + (f" (built-in recipe '{hint}'?)" if hint else ""))
    if path.is_dir():
        raise UserError(f"recipe {clipped(str(path), 200)} is a folder; give a recipe's YAML file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise UserError(
            f"recipe {clipped(str(path), 200)} is not UTF-8 text (byte {byte:#04x} at offset {err.start}): "
            "a recipe is a YAML file"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err}") from err
    recipe = recipe_from_dict(edit(parse_yaml(text, str(path))), str(path))
    recipe._source_file = path
    return recipe
