"""Checks a recipe beyond its schema: every named model, data set and objective exists and takes the
parameters given. Cheap (nothing is trained or loaded): `distill validate` and `distill run` both use it."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from distill.data import DATASETS
from distill.errors import UserError
from distill.models import MODELS, split_model_name
from distill.objectives import build_objective
from distill.recipe.schema import Recipe
from distill.registry import Registry, nearest

_SHAPE_ARGS = {"num_classes", "input_shape", "in_channels"}


def _check_factory(registry: Registry[Any], name: str, params: dict[str, Any], where: str) -> None:
    if name not in registry:
        hint = nearest(name, registry.names())
        raise UserError(
            f"{where}.name: unknown {registry.kind} '{name}'" + (f"; did you mean '{hint}'?" if hint else "")
        )
    signature = inspect.signature(registry.entry(name).factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = [p for p in signature.parameters if p not in _SHAPE_ARGS]
    for key in params:
        if key not in valid:
            hint = nearest(key, valid)
            raise UserError(
                f"{where}.params.{key}: {registry.kind} '{name}' has no such parameter"
                + (f"; did you mean '{hint}'?" if hint else f"; valid: {', '.join(valid) or 'none'}")
            )


def check_recipe(recipe: Recipe, source: str = "recipe") -> None:
    if recipe.trainer.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{source}: trainer.device is 'cuda' but no CUDA device is available")
    _check_factory(DATASETS, recipe.data.name, recipe.data.params, f"{source}: data")
    for role, spec in (("student", recipe.student), ("teacher", recipe.teacher)):
        if spec is not None and spec.name is not None:
            name, external = split_model_name(spec.name)
            _check_factory(MODELS, name, {**external, **spec.params}, f"{source}: {role}")
    for spec, path in (
        (recipe.student.checkpoint, "student"),
        (recipe.teacher and recipe.teacher.checkpoint, "teacher"),
    ):
        if spec is not None and not spec.exists():
            raise UserError(f"{source}: {path}.checkpoint not found: {spec}")
    cache = None
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        from distill.cache.store import TeacherCache

        cache = TeacherCache(recipe.teacher.cache)  # exists, complete, readable: else one line now
    for m_index, method in enumerate(recipe.method_list()):
        for o_index, term in enumerate(method.objectives):
            where = (
                f"methods[{m_index}].objectives[{o_index}]" if recipe.methods else f"objectives[{o_index}]"
            )
            try:
                objective = build_objective(term.name, term.params)
            except UserError as err:
                raise UserError(f"{source}: {where}: {err}") from err
            except (TypeError, ValueError) as err:
                raise UserError(f"{source}: {where}: objective '{term.name}': {err}") from err
            if cache is not None:
                try:
                    cache.check_objectives([term.name], [objective])
                except UserError as err:
                    raise UserError(f"{source}: {where}: {err}") from err
            if objective.needs_teacher and recipe.teacher is None:
                raise UserError(
                    f"{source}: {where}: objective '{term.name}' needs a teacher, but the recipe has none"
                )
