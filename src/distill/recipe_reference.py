"""The recipe reference, `docs/recipe_reference.md`, generated from the pydantic schema
(`distill.recipe.schema`: every section, key, type, default, range and description) and from the registries
(the names a key takes: data sets, models, objectives, sources, tasks), so that it cannot drift from the
code. `python -m distill.recipe_reference` writes it; `tests/test_recipe_reference.py` fails while the
committed page differs from what this writes.

A module of its own above the floors (not in `distill.recipe`): the task names come from `distill.tasks`,
a floor above the recipe's.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from distill.io import atomic_write_text
from distill.recipe import schema
from distill.recipe.schema import SOURCES, Recipe

COMMAND = "python -m distill.recipe_reference"
REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "recipe_reference.md"
# Bounds that depend on the machine, shown by what they are rather than by this machine's value.
MACHINE_BOUNDS = {("TrainerSpec", "threads"): ("MAX_THREADS", "`MAX_THREADS` = max(1024, 4 × the CPU count)")}
TYPE_NAMES = {int: "integer", float: "number", str: "text", bool: "true / false", Path: "path", Any: "any"}


# ------------------------------------------------------------------------------------------ the sections


def section_classes(annotation: Any) -> list[type[BaseModel]]:
    """The sections (pydantic models) inside `X`, `X | None`, `list[X]` or a union of sections (`X | Y`,
    one per `kind`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [inner for inner in section_classes(arg) if inner not in found]
    return found


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The first section inside `annotation`, if any."""
    found = section_classes(annotation)
    return found[0] if found else None


def _kind(model: type[BaseModel]) -> str:
    """The `kind` that selects one section of a union (`methods[].teacher.kind: ensemble`)."""
    return str(typing.get_args(model.model_fields["kind"].annotation)[0])


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(arg) is list for arg in typing.get_args(annotation)
    )


def sections() -> dict[type[BaseModel], list[str]]:
    """Every section class and the keys it sits at (`methods[].objectives[]`), outermost first."""
    found: dict[type[BaseModel], list[str]] = {Recipe: [""]}
    queue: list[tuple[str, type[BaseModel]]] = [("", Recipe)]
    while queue:  # breadth first: a section is named by its shortest key (`optimizer`, not a teacher's)
        path, model = queue.pop(0)
        for name, field in model.model_fields.items():
            inners = section_classes(field.annotation)
            for inner in inners:
                key = f"{path}.{name}" if path else name
                key += "[]" if _is_list(field.annotation) else ""
                key += f" (kind: {_kind(inner)})" if len(inners) > 1 else ""
                first = inner not in found
                found.setdefault(inner, []).append(key)
                if first:
                    queue.append((key, inner))
    return found


def anchor(key: str) -> str:
    """GitHub's anchor of a `## \\`key\\`` heading."""
    return "".join(c for c in key.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


# ------------------------------------------------------------------------------------------ one key


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e4:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _constants() -> dict[Any, str]:
    """The schema's named limits by value (`MAX_SEED`, ...), but those that depend on the machine."""
    return {
        value: name
        for name, value in vars(schema).items()
        if name.startswith("MAX_") and isinstance(value, int | float) and name != "MAX_THREADS"
    }


# Each constraint: its words, and where it sorts (lower bounds, upper bounds, lengths, patterns).
BOUNDS = ((Gt, "gt", ">", 0), (Ge, "ge", "≥", 0), (Lt, "lt", "<", 1), (Le, "le", "≤", 1))
LENGTHS = ((MinLen, "min_length", "at least", 2), (MaxLen, "max_length", "at most", 3))


def _limit(value: Any, owner: str, key: str, unit: str = "") -> str:
    """A bound's value (with its unit), its constant's name, or the rule of a machine-dependent one."""
    machine = MACHINE_BOUNDS.get((owner, key))
    if machine is not None and value == getattr(schema, machine[0]):
        return machine[1]
    if unit:
        unit = " " + (unit.removesuffix("s") if value == 1 else unit)
    name = _constants().get(value)
    return f"{_number(value)}{unit}" + (f" (`{name}`)" if name else "")


def constraints(metadata: Iterable[Any], owner: str, key: str, unit: str) -> list[str]:
    """Pydantic's constraints (`Gt`, `Le`, `MaxLen`, a pattern, ...) as words, lower bounds first."""
    found: list[tuple[int, str]] = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # `Annotated[int, Field(ge=0)]`
            found += [(0, text) for text in constraints(item.metadata, owner, key, unit)]
        for kind, attribute, words, order in BOUNDS:
            if isinstance(item, kind):
                found.append((order, f"{words} {_limit(getattr(item, attribute), owner, key)}"))
        for kind, attribute, words, order in LENGTHS:
            if isinstance(item, kind):
                found.append((order, f"{words} {_limit(getattr(item, attribute), owner, key, unit)}"))
        if getattr(item, "pattern", None):
            found.append((4, f"matching `{item.pattern}`"))
    return [text for _, text in sorted(found, key=lambda pair: pair[0])]


def type_text(annotation: Any, owner: str, key: str, keys: dict[type[BaseModel], list[str]]) -> str:
    """A type in words: `integer (> 0)`, `one of "a", "b"`, `list of section objectives[]`, `... or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        limits = constraints(args[1:], owner, key, "items")
        base = type_text(args[0], owner, key, keys)
        return f"{base} ({', '.join(limits)})" if limits else base
    if origin in (typing.Union, types.UnionType):
        options = [type_text(a, owner, key, keys) for a in args if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {type_text(args[0], owner, key, keys)}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a, owner, key, keys) for a in args) + "]"
    if origin is dict:
        return "mapping"
    inner = section_class(annotation)
    if inner is not None:
        first = keys[inner][0]
        return f"section [`{first}`](#{anchor(first)})"
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "its defaults"
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):  # a list of sections (an online peer's objectives) as the YAML gives them
        value = [
            v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value
        ]
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def field_row(
    owner: type[BaseModel], name: str, field: FieldInfo, keys: dict[type[BaseModel], list[str]]
) -> str:
    """One key's row: its type (with the ranges of the value itself, then of the key), default, meaning."""
    unit = "characters" if field.annotation in (str, str | None) else "items"
    kind = type_text(field.annotation, owner.__name__, name, keys)
    limits = constraints(field.metadata, owner.__name__, name, unit)
    if limits:
        kind += f"; {', '.join(limits)}"
    cells = [f"`{name}`", kind, default_text(field), " ".join((field.description or "").split())]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def section_text(model: type[BaseModel], keys: dict[type[BaseModel], list[str]]) -> str:
    where = keys[model]
    title = "The top level" if where[0] == "" else f"`{where[0]}`"
    lines = [f"## {title}", ""]
    if model.__doc__:
        lines += [" ".join(inspect.cleandoc(model.__doc__).split()), ""]
    if len(where) > 1:
        lines += ["Also at " + ", ".join(f"`{key}`" for key in where[1:]) + ".", ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [field_row(model, name, field, keys) for name, field in model.model_fields.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the names


def _table(rows: Iterable[tuple[str, ...]], headers: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [" ".join(cell.split()).replace("|", "\\|") for cell in row]
        lines.append("| " + " | ".join([f"`{cells[0]}`", *cells[1:]]) + " |")
    return "\n".join(lines) + "\n"


def registered_names() -> dict[str, tuple[str, list[tuple[str, ...]], tuple[str, ...]]]:
    """Heading -> (the keys that take these names, rows, column headers)."""
    from distill.data import DATASETS
    from distill.models import MODELS
    from distill.objectives import OBJECTIVES
    from distill.tasks import TASKS

    return {
        "Data sets": ("`data.name`", [(e.name, e.summary) for e in DATASETS], ("name", "summary")),
        "Models": (
            "`student.name`, `teacher.name`",
            [(e.name, e.summary) for e in MODELS],
            ("name", "summary"),
        ),
        "Objectives": (
            "`objectives[].name`, `methods[].objectives[].name`",
            [(e.name, e.summary, e.paper if e.paper != "-" else "") for e in OBJECTIVES],
            ("name", "summary", "paper"),
        ),
        "Sources": (
            "`source.name`, `methods[].source.name`",
            list(SOURCES.items()),
            ("name", "summary"),
        ),
        "Tasks": ("`task`", [(e.name, e.summary) for e in TASKS], ("name", "summary")),
    }


def names_text() -> str:
    parts = ["## Registered names", "", "The names a key takes, each with its one-line summary.", ""]
    for heading, (keys, rows, headers) in registered_names().items():
        parts += [f"### {heading}", "", f"Taken by {keys}.", "", _table(rows, headers)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ the page


def render() -> str:
    keys = sections()
    intro = (
        "# Recipe reference\n\n"
        f"Generated from the schema (`distill.recipe.schema`) and the registries by `{COMMAND}`; do not edit "
        "it by hand (a test fails when it is out of date). A recipe is a YAML mapping of these sections; "
        "`distill validate RECIPE` checks one without training.\n\n"
        + inspect.cleandoc(schema.__doc__ or "")
        + "\n"
    )
    body = [section_text(model, keys) for model in keys]
    return "\n".join([intro, *body, names_text()])


def write_reference(path: Path = REFERENCE) -> Path:
    atomic_write_text(path, render())
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = write_reference(Path(args[0]) if args else REFERENCE)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
