"""`distill list datasets|models|objectives|recipes|tasks [--task NAME]`: every registered name with its
one-line summary, grouped by task.

A name's tasks are what the project knows of it, never a guess from its name:
- data sets and models: the tasks of the packaged recipes that use it, else the task `task_for` picks for a
  recipe with that data set (or that student);
- objectives: classification for those the vision benchmark runs (`distill.bench.methods`), and the tasks of
  the packaged recipes that use them;
- recipes: their own task.
An objective no task is known for is listed under "any task".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Annotated

import typer
from rich.console import Console

from distill.errors import UserError, clipped
from distill.recipe.schema import Recipe
from distill.registry import nearest

ANY_TASK = "any task"
SUMMARY_LIMIT = 100  # characters of a recipe's description shown


@dataclass(frozen=True)
class Item:
    name: str
    summary: str
    tasks: tuple[str, ...]


def valid_choice(what: str, name: str, choices: Iterable[str], option: str = "") -> str:
    """`name` when it is one of `choices`; else a one-line error with the nearest one and all of them
    (prefixed with the command-line `option` it came from)."""
    choices = list(choices)
    if name in choices:
        return name
    lower = {choice.lower(): choice for choice in choices}
    hint = lower.get(nearest(name.lower(), list(lower)) or "")
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    prefix = f"{option}: " if option else ""
    raise UserError(f"{prefix}unknown {what} '{clipped(name)}'{suggestion} (one of: {', '.join(choices)})")


# ------------------------------------------------------------------------------------ what is known of names


@cache
def packaged_recipes() -> dict[str, tuple[str, Recipe]]:
    """Every packaged recipe: name -> (its task's name, the recipe)."""
    from distill.recipe import load_recipe
    from distill.recipe.load import builtin_recipes
    from distill.tasks import task_for

    out: dict[str, tuple[str, Recipe]] = {}
    for name in builtin_recipes():
        recipe = load_recipe(name)
        out[name] = (task_for(recipe).name, recipe)
    return out


def _used_by_recipes(uses: Callable[[Recipe], Iterable[str]], name: str) -> set[str]:
    return {task for task, recipe in packaged_recipes().values() if name in set(uses(recipe))}


def _probe_task(data: str = "", student: str = "") -> str:
    """The task `task_for` picks for a recipe with this data set and student (nothing else set)."""
    from distill.recipe.schema import DataSpec, ModelSpec
    from distill.tasks import task_for

    probe = Recipe.model_construct(data=DataSpec(name=data), student=ModelSpec(name=student))
    return task_for(probe).name


def _recipe_data(recipe: Recipe) -> list[str]:
    return [recipe.data.name]


def _recipe_models(recipe: Recipe) -> list[str]:
    teacher = recipe.teacher.name if recipe.teacher is not None else None
    return [recipe.student.name, *([teacher] if teacher else [])]


def _recipe_objectives(recipe: Recipe) -> list[str]:
    return [term.name for method in recipe.method_list() for term in method.objectives]


def _bench_objectives() -> set[str]:
    from distill.bench.methods import classification_methods

    return {term.objective for _, setting in classification_methods() for term in setting.terms}


def datasets() -> list[Item]:
    from distill.data import DATASETS

    return [
        Item(e.name, e.summary, _tasks({_probe_task(data=e.name)}, _used_by_recipes(_recipe_data, e.name)))
        for e in DATASETS
    ]


def models() -> list[Item]:
    from distill.models import MODELS

    return [
        Item(
            e.name, e.summary, _tasks({_probe_task(student=e.name)}, _used_by_recipes(_recipe_models, e.name))
        )
        for e in MODELS
    ]


def objectives() -> list[Item]:
    from distill.objectives import OBJECTIVES

    bench = _bench_objectives()
    items = []
    for e in OBJECTIVES:
        known = _used_by_recipes(_recipe_objectives, e.name) | (
            {"classification"} if e.name in bench else set()
        )
        items.append(Item(e.name, e.summary, _tasks(set(), known)))
    return items


def recipes() -> list[Item]:
    out = []
    for name, (task, recipe) in packaged_recipes().items():
        description = " ".join(recipe.description.split()) or recipe.name
        out.append(Item(name, clipped(description, SUMMARY_LIMIT), (task,)))
    return out


def tasks() -> list[Item]:
    from distill.tasks import TASKS

    return [Item(e.name, e.summary, (e.name,)) for e in TASKS]


def _tasks(probed: set[str], used: set[str]) -> tuple[str, ...]:
    """The tasks a name is known to be used for; else what `task_for` picks for it; else any task."""
    return tuple(sorted(used or probed)) or (ANY_TASK,)


KINDS: dict[str, Callable[[], list[Item]]] = {
    "datasets": datasets,
    "models": models,
    "objectives": objectives,
    "recipes": recipes,
    "tasks": tasks,
}


def task_names() -> list[str]:
    from distill.tasks import TASKS

    return TASKS.names()


# ------------------------------------------------------------------------------------------------ output


def grouped(items: list[Item], task: str | None) -> dict[str, list[Item]]:
    """Items by task (a name may sit under several), tasks in registry order, "any task" last."""
    order = [*task_names(), ANY_TASK]
    groups: dict[str, list[Item]] = {name: [] for name in order}
    for item in items:
        for name in item.tasks:
            groups.setdefault(name, []).append(item)
    if task is not None:
        groups = {task: groups.get(task, []), ANY_TASK: groups[ANY_TASK]}
    return {name: group for name, group in groups.items() if group}


def print_listing(kind: str, task: str | None, console: Console) -> None:
    items = KINDS[kind]()
    width = max((len(item.name) for item in items), default=0)
    for index, (name, group) in enumerate(grouped(items, task).items()):
        if index:
            console.print()
        console.print(f"{name}:", highlight=False, markup=False)
        for item in group:
            console.print(
                f"  {item.name:<{width}}  {item.summary}", highlight=False, soft_wrap=True, markup=False
            )


def list_command(
    kind: Annotated[
        str, typer.Argument(metavar="KIND", help="datasets, models, objectives, recipes or tasks")
    ],
    task: Annotated[str | None, typer.Option("--task", help="only this task's names")] = None,
) -> None:
    """Every registered data set, model, objective, packaged recipe or task, with its one-line summary,
    grouped by task."""
    kind = valid_choice("kind", kind, KINDS)
    if task is not None:
        task = valid_choice("task", task, task_names(), "--task")
    print_listing(kind, task, Console())


def register(app: typer.Typer) -> None:
    app.command("list")(list_command)
