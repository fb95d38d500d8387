"""Checks a recipe beyond its schema: every named model, data set and objective exists and takes the
parameters given, with values of the types their code declares. Cheap (nothing is trained or loaded, an
objective is called once on a tiny batch): `distill validate` and `distill run` both use it, before any run
folder exists.

Rules applied to every `params` mapping (data set, models, objectives), whatever the component:
- keys are names (strings);
- a value must fit the type the component's signature declares (`int`, `float`, `bool`, `str`, lists of
  them, mappings, `X | None`);
- a parameter named `seed` or `*_seed` is a whole number in 0 .. 2**32 - 1, as the recipe's `seeds`.
Values that fit their type but not their range are refused by the component itself (a `UserError`, placed in
the recipe here when it is an objective's `ParamError`).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import torch

from distill.data import DATASETS
from distill.errors import UserError, clipped, first_line, shown
from distill.models import MODELS, split_model_name
from distill.objectives import OBJECTIVES, LogitObjective, Objective, Progress, StepOutputs, build_objective
from distill.objectives.base import ParamError
from distill.objectives.features import FeatureObjective
from distill.objectives.opsd import OPSDObjective
from distill.recipe.schema import MAX_SEED, Recipe, SourceSpec
from distill.registry import Registry, nearest

_SHAPE_ARGS = {"num_classes", "input_shape", "in_channels"}
LM_MODELS = ("hf", "causal_lm")
MAX_GENERATED = 2**20  # new tokens per generation: longer than any model's context
# What a component may raise on a parameter value it cannot use (its own checks raise `UserError`).
_VALUE_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError, OverflowError)


# --------------------------------------------------------------------------------------- parameter types


def _fits(value: Any, hint: Any) -> bool:
    """Whether a recipe value (YAML: None, bool, int, float, str, list, mapping) fits a type annotation.
    Annotations this cannot judge (classes a recipe cannot write, `Any`) accept every value."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, str | Path)
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0]) for v in value)
    if container in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        if len(args) == 2:
            return all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
        return True
    return True


def _signature(fn: Any) -> inspect.Signature | None:
    """`fn`'s signature with its annotations evaluated; None when they cannot be (then types go unchecked)."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # an annotation naming something only imported for type checkers
        return None


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Path: "a path"}


def describe_type(hint: Any) -> str:
    """A type annotation in words, for messages: `list[int] | None` -> `a list of whole numbers or null`."""
    if hint is None or hint is type(None):
        return "null"
    if hint in _WORDS:
        return _WORDS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = list(dict.fromkeys(describe_type(arg) for arg in args))
        return " or ".join(words)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if (origin or hint) in (list, tuple, collections.abc.Sequence):
        if args and args[0] in _WORDS:
            return f"a list of {_WORDS[args[0]].removeprefix('a ')}s"
        return "a list"
    if (origin or hint) in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_param_values(fn: Any, params: dict[str, Any], where: str) -> None:
    """Refuse non-string keys, values that do not fit `fn`'s annotations, and seeds out of 0 .. 2**32 - 1.
    `where` is the path of the params mapping in the recipe (`source: data.params`)."""
    for key in params:
        if not isinstance(key, str):
            raise UserError(f"{where}: parameter names must be strings, got {shown(key)}")
    for key, value in params.items():
        if (key == "seed" or key.endswith("_seed")) and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED
        ):
            raise UserError(
                f"{where}.{clipped(key)}: a seed is a whole number from 0 to {MAX_SEED}, got {shown(value)}"
            )
    signature = _signature(fn)
    if signature is None:
        return
    for key, value in params.items():
        parameter = signature.parameters.get(key)
        if parameter is None or parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if not _fits(value, parameter.annotation):
            raise UserError(
                f"{where}.{clipped(key)}: expected {describe_type(parameter.annotation)}, got {shown(value)}"
            )


# ------------------------------------------------------------------------------------------- factories


def _check_factory(registry: Registry[Any], name: str, params: dict[str, Any], where: str) -> None:
    if name not in registry:
        hint = nearest(name, registry.names())
        raise UserError(
            f"{where}.name: unknown {registry.kind} {shown(name)}"
            + (f"; did you mean '{hint}'?" if hint else "")
        )
    factory = registry.entry(name).factory
    check_param_values(factory, params, f"{where}.params")
    signature = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = [p for p in signature.parameters if p not in _SHAPE_ARGS]
    for key, parameter in signature.parameters.items():
        required = parameter.default is inspect.Parameter.empty and parameter.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        if required and key not in _SHAPE_ARGS and key not in params:
            raise UserError(f"{where}.params.{key}: {registry.kind} '{name}' needs it")
    for key in params:
        if key not in valid:
            hint = nearest(key, valid)
            raise UserError(
                f"{where}.params.{clipped(key)}: {registry.kind} '{name}' has no such parameter"
                + (f"; did you mean '{hint}'?" if hint else f"; valid: {', '.join(valid) or 'none'}")
            )


# ------------------------------------------------------------------------------------------ objectives


def dry_run(objective: Objective) -> None:
    """Call an objective once on a tiny batch and step its schedule, so that a parameter value it cannot use
    is refused now, not at the first training step. Logit losses did this when they were built; objectives
    bound to a source (OPSD) or reading model layers are left to their own checks."""
    if isinstance(objective, LogitObjective | FeatureObjective | OPSDObjective):
        return
    logits = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
    outputs = StepOutputs(student_logits=logits, teacher_logits=logits.flip(-1), labels=torch.tensor([0, 1]))
    outputs.row_data = {key: torch.full((2,), 0.5) for key in objective.row_keys}
    value = objective(outputs)
    if not torch.isfinite(value).all():
        raise ValueError("its value is not finite on a test batch")
    objective.after_step(Progress(step=1, total_steps=10, epoch=0.1), float(value.detach().sum()))


def check_objective(name: str, params: dict[str, Any], where: str) -> Objective:
    """Build the objective `name` with `params` (and dry-run it); every failure is one line at `where`."""
    if name not in OBJECTIVES:
        hint = nearest(name, OBJECTIVES.names())
        raise UserError(
            f"{where}.name: unknown objective {shown(name)}" + (f"; did you mean '{hint}'?" if hint else "")
        )
    entry = OBJECTIVES.entry(name)
    check_param_values(entry.factory, params, f"{where}.params")
    if entry.extra.get("function") is not None:  # the loss function the objective calls
        check_param_values(entry.extra["function"], params, f"{where}.params")
    try:
        objective = build_objective(name, params)
        dry_run(objective)
    except ParamError as err:
        raise UserError(f"{where}.params.{clipped(err.key)}: {err.problem} (objective '{name}')") from err
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    except _VALUE_ERRORS as err:
        raise UserError(f"{where}: objective '{name}': {first_line(err)}") from err
    return objective


# ------------------------------------------------------------------------------------------------ sources


def check_generations(spec: SourceSpec, where: str) -> None:
    """The sampling settings of `teacher_generations` (on-policy sources are checked by the schema)."""
    if spec.name != "teacher_generations":
        return
    from distill.sources.generations import GenerationSettings

    valid = list(inspect.signature(GenerationSettings).parameters)
    for key in spec.params:
        if key not in valid:
            hint = nearest(key, valid)
            raise UserError(
                f"{where}.params.{clipped(key)}: unknown setting"
                + (f"; did you mean '{hint}'?" if hint else f"; valid: {', '.join(valid)}")
            )
    check_param_values(GenerationSettings, spec.params, f"{where}.params")
    try:
        settings = GenerationSettings.from_params(spec.params)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    except _VALUE_ERRORS as err:
        raise UserError(f"{where}.params: {first_line(err)}") from err
    if settings.max_new_tokens is not None and not 1 <= settings.max_new_tokens <= MAX_GENERATED:
        raise UserError(
            f"{where}.params.max_new_tokens: must be a whole number from 1 to {MAX_GENERATED}, "
            f"got {settings.max_new_tokens}"
        )
    if settings.batch_size < 1:
        raise UserError(f"{where}.params.batch_size: must be at least 1, got {settings.batch_size}")


def check_pairing(recipe: Recipe, method_index: int, objectives: list[Objective], where: str) -> None:
    """What a method's source and objectives need of each other (the on-policy sources would refuse these at
    their first seed, after the run folder was made)."""
    method = recipe.method_list()[method_index]
    source = method.source or recipe.source
    names = [term.name for term in method.objectives]
    if source.name == "opsd" and "opsd" not in names:
        raise UserError(f"{where}: source 'opsd' needs the objective 'opsd' (the self-teacher's divergence)")
    if source.name == "soda":
        if "soda" not in names:
            raise UserError(
                f"{where}: source 'soda' needs the objective 'soda' (SFT + preference over the snapshot)"
            )
        others = [n for n, o in zip(names, objectives, strict=True) if n != "soda" and o.needs_teacher]
        if others:
            raise UserError(
                f"{where}: with source 'soda' the teacher slot holds the DPO reference; only 'soda' may use "
                f"it, not '{others[0]}'"
            )
        responses = source.params.get("responses", "teacher_generations")
        if responses != "dataset" and recipe.teacher is None:
            raise UserError(
                f"{where}: source 'soda' takes the teacher's responses: give a teacher, or responses: dataset"
            )
    if recipe.trainer.fused_loss == "on":
        dense = [n for n, o in zip(names, objectives, strict=True) if not o.fused_capable]
        if dense:
            raise UserError(
                f"{where}: trainer.fused_loss is 'on' but objective '{dense[0]}' needs the full logits"
            )


# ------------------------------------------------------------------------------------------------ recipe


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
            raise UserError(f"{source}: {path}.checkpoint not found: {clipped(str(spec), 200)}")
    check_generations(recipe.source, f"{source}: source")
    if recipe.trainer.fused_loss == "on" and recipe.student.name not in LM_MODELS:
        raise UserError(
            f"{source}: trainer.fused_loss is 'on', which needs a language-model student (hf) with a plain "
            f"linear output layer, not '{recipe.student.name}'"
        )
    cache = None
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        from distill.cache.store import TeacherCache

        cache = TeacherCache(recipe.teacher.cache)  # exists, complete, readable: else one line now
    for m_index, method in enumerate(recipe.method_list()):
        if method.source is not None:
            check_generations(method.source, f"{source}: methods[{m_index}].source")
        built: list[Objective] = []
        for o_index, term in enumerate(method.objectives):
            where = (
                f"methods[{m_index}].objectives[{o_index}]" if recipe.methods else f"objectives[{o_index}]"
            )
            objective = check_objective(term.name, term.params, f"{source}: {where}")
            if cache is not None:
                try:
                    cache.check_objectives([term.name], [objective])
                except UserError as err:
                    raise UserError(f"{source}: {where}: {err}") from err
            method_source = (method.source or recipe.source).name
            # OPSD's objective is bound to its self-teacher by source 'opsd'; with another source it would
            # fail at the first training step
            if isinstance(objective, OPSDObjective) and method_source != "opsd":
                raise UserError(
                    f"{source}: {where}: objective '{term.name}' needs source 'opsd' (the student's rollouts "
                    f"with a privileged context), not '{method_source}'"
                )
            if objective.needs_teacher and recipe.teacher is None:
                raise UserError(
                    f"{source}: {where}: objective '{term.name}' needs a teacher, but the recipe has none"
                )
            built.append(objective)
        check_pairing(recipe, m_index, built, f"{source}: methods[{m_index}]" if recipe.methods else source)
