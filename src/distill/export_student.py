"""A trained student out of a finished run: which one (method, seed), its checkpoint verified, the model
rebuilt from the run's recipe with the checkpoint's weights, and what a user of the model needs beside it
(a language model's tokenizer; a classifier's input shape, normalisation and class names; a text classifier's
tokenizer, pooling, pad id and label names).

Used by `distill export`, `distill predict` and `distill eval` (`distill.export`, `distill.export_use`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from distill.data.text_classification import text_tokenizer
from distill.errors import UserError, first_line, shown
from distill.experiment import recipe_key
from distill.io import fingerprint
from distill.recipe.load import recipe_from_dict
from distill.recipe.schema import MethodSpec, Recipe, method_slug
from distill.runfolder import MANIFEST
from distill.tasks import task_for
from distill.train.checkpoint import TRAINER_STATE, latest_checkpoint, verify_checkpoint

CLASSIFICATION, CAUSAL_LM, TEXT = "classification", "causal_lm", "text_classification"
# The metric that picks the best seed, and whether higher is better. The final (last-epoch) row is used,
# never the best epoch's: the checkpoint holds the last epoch's weights.
HEADLINE: dict[str, tuple[str, bool]] = {
    CLASSIFICATION: ("accuracy", True),
    CAUSAL_LM: ("perplexity", False),
    TEXT: ("f1", True),  # macro F1: labels are imbalanced (13% spam)
}
# scikit-learn's digits scale their 0..16 pixels to [-1, 1] in the loader and keep no statistics: as
# 8-bit images that is mean 0.5, std 0.5 on the [0, 1] scale; their classes are the digits.
KNOWN_INPUTS: dict[str, dict[str, Any]] = {
    "digits": {"mean": [0.5], "std": [0.5], "class_names": [str(d) for d in range(10)]}
}


@dataclass
class FinishedRun:
    path: Path
    recipe: Recipe
    task: str
    metrics: dict[str, Any]  # the run's metrics.json


@dataclass
class Choice:
    method: MethodSpec
    seed: int
    finals: dict[int, dict[str, Any]]  # every seed's last-epoch metrics, from metrics.json
    why: str  # how the seed was chosen, for the model card


@dataclass
class Student:
    model: nn.Module
    task: str
    data: Any  # the recipe's data (DataSplits, LMData): shapes, normalisation, evaluation split
    tokenizer: Any = None
    spec: dict[str, Any] | None = None  # a classifier's model.json
    step: int = 0


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers while it loads or saves a model: a command's output is its own."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def read_recipe(path: Path) -> Recipe:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not a recipe distill wrote ({first_line(err)})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: not a recipe distill wrote (not a mapping)")
    return recipe_from_dict(document, str(path))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({first_line(err)})") from None


def open_finished_run(path: Path) -> FinishedRun:
    """The run in `path`; one line for a folder that holds none, or an unfinished one."""
    if not path.is_dir():
        raise UserError(f"run folder {path} not found")
    if not (path / MANIFEST).is_file() or not (path / "recipe.yaml").is_file():
        raise UserError(f"{path} holds no distill run (no {MANIFEST} and recipe.yaml)")
    if not (path / "metrics.json").is_file():  # written last, once every method x seed is trained
        raise UserError(
            f"{path} holds an unfinished run (no metrics.json); finish it with "
            f"`distill run RECIPE --out {path} --resume`"
        )
    recipe = read_recipe(path / "recipe.yaml")
    metrics = read_json(path / "metrics.json")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("methods"), list):
        raise UserError(f"{path / 'metrics.json'}: not the metrics of a distill run")
    task = task_for(recipe).name
    if task not in HEADLINE:
        known = ", ".join(HEADLINE)
        raise UserError(f"{path}: a '{task}' run; export, predict and eval know {known} runs")
    return FinishedRun(path.resolve(), recipe, task, metrics)


def find_method(run: FinishedRun, name: str | None) -> MethodSpec:
    """The method named (by its name or its folder name), or the only one."""
    methods = run.recipe.method_list()
    listing = ", ".join(repr(m.name) for m in methods)
    if name is None:
        if len(methods) > 1:
            raise UserError(f"{run.path} has {len(methods)} methods; choose one with --method: {listing}")
        return methods[0]
    for method in methods:
        if name in (method.name, method_slug(method.name)):
            return method
    raise UserError(f"--method {shown(name)} is not a method of {run.path}; its methods: {listing}")


def seed_finals(run: FinishedRun, method: MethodSpec) -> dict[int, dict[str, Any]]:
    entry = next(
        (m for m in run.metrics["methods"] if isinstance(m, dict) and m.get("name") == method.name), {}
    )
    finals = {
        row["seed"]: row["final"]
        for row in entry.get("seeds", [])
        if isinstance(row, dict) and isinstance(row.get("seed"), int) and isinstance(row.get("final"), dict)
    }
    missing = [s for s in run.recipe.seeds if s not in finals]
    if missing:
        raise UserError(
            f"{run.path}: method '{method.name}' has no metrics for seed {missing[0]} (unfinished)"
        )
    return finals


def choose_student(run: FinishedRun, method: str | None = None, seed: int | None = None) -> Choice:
    """Method and seed: as given, else the only method and the seed with the best final headline metric."""
    spec = find_method(run, method)
    finals = seed_finals(run, spec)
    seeds = list(run.recipe.seeds)
    if seed is not None:
        if seed not in seeds:
            raise UserError(f"--seed {seed} is not a seed of {run.path}; its seeds: {seeds}")
        return Choice(spec, seed, finals, "the seed asked for")
    if len(seeds) == 1:
        return Choice(spec, seeds[0], finals, "the run's only seed")
    metric, higher = HEADLINE[run.task]
    scored = [(finals[s][metric], s) for s in seeds if isinstance(finals[s].get(metric), int | float)]
    if not scored:
        return Choice(spec, seeds[0], finals, f"the first seed (no {metric} recorded)")
    best = max(scored, key=lambda p: p[0]) if higher else min(scored, key=lambda p: p[0])
    what = "macro F1" if metric == "f1" else metric
    return Choice(spec, best[1], finals, f"the best final {what} of {len(seeds)} seeds")


def verified_weights(run: FinishedRun, choice: Choice) -> tuple[dict[str, Tensor], int]:
    """The student's weights from its last checkpoint, verified whole (checksums, this run's fingerprint,
    its seed, a completed training); and the checkpoint's step."""
    seed_dir = run.path / "methods" / method_slug(choice.method.name) / f"seed-{choice.seed}"
    if not (seed_dir / "final.json").is_file():
        raise UserError(f"{seed_dir}: this student did not finish training (no final.json)")
    path = latest_checkpoint(seed_dir)
    if path is None:
        raise UserError(f"{seed_dir}: no checkpoint to export")
    state, tensors = verify_checkpoint(
        path,
        fingerprint=fingerprint([recipe_key(run.recipe), choice.method.name, choice.seed]),
        identity={"seed": choice.seed},
        required=TRAINER_STATE,
    )
    final = json.loads((seed_dir / "final.json").read_text())
    if int(state["step"]) != int(final.get("steps", state["step"])):  # max_steps / max_tokens end mid-epoch
        raise UserError(f"checkpoint {path} is from step {state['step']}, the run ended at {final['steps']}")
    return tensors["model"], int(state["step"])


def load_weights_into(model: nn.Module, weights: dict[str, Tensor], where: str) -> None:
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"{where}: the weights do not fit the recipe's student ({first_line(err)})") from None


def constructor_args(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A zoo model's constructor arguments: the recipe's, with the factory's defaults for the rest, so that
    model.json describes the model whole (no default left to guess)."""
    from distill.models import MODELS, split_model_name

    base, external = split_model_name(name)
    signature = inspect.signature(MODELS.entry(base).factory).parameters
    args = {**external}
    for key, parameter in signature.items():
        if key in {"num_classes", "input_shape", "in_channels"} or parameter.kind is parameter.VAR_KEYWORD:
            continue
        if parameter.default is not inspect.Parameter.empty:
            args[key] = list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
    return {**args, **params}


def classifier_spec(recipe: Recipe, data: Any) -> dict[str, Any]:
    """model.json of a classifier: architecture, constructor arguments, classes, input shape and
    normalisation."""
    test = data.test
    known = KNOWN_INPUTS.get(recipe.data.name, {})
    mean, std = getattr(test, "mean", None), getattr(test, "std", None)
    normalise = None
    if isinstance(mean, Tensor) and isinstance(std, Tensor):
        normalise = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    elif "mean" in known:
        normalise = {"mean": known["mean"], "std": known["std"]}
    names = [str(c) for c in getattr(test, "classes", None) or known.get("class_names", [])]
    return {
        "format": 1,
        "framework": "pytorch",
        "architecture": recipe.student.name,
        "params": constructor_args(recipe.student.name, dict(recipe.student.params)),
        "num_classes": int(data.num_classes),
        "input_shape": [int(n) for n in data.input_shape],
        "weights": "model.safetensors",
        "preprocessing": None
        if normalise is None
        else {
            **normalise,
            "rule": "x = (pixels / 255 - mean) / std per channel, after resizing the shorter side and "
            "centre-cropping to input_shape",
        },
        "class_names": names if len(names) == data.num_classes else None,
    }


def text_spec(recipe: Recipe, data: Any, model: nn.Module) -> dict[str, Any]:
    """What a text classifier needs beside its weights (model.json / head.json): how it pools, which token
    pads, how long a text may be, and its label names (numbered as in training: sorted label strings)."""
    names = [str(n) for n in data.label_names]
    return {
        "format": 1,
        "framework": "pytorch",
        "architecture": recipe.student.name,
        "params": dict(recipe.student.params),
        "num_classes": int(data.num_classes),
        "label_names": names,
        "class_names": names,
        "pooling": str(model.pooling),
        "pad_id": int(model.pad_id),
        "max_length": int(data.input_shape[0]),
        "input_shape": [int(data.input_shape[0])],
    }


def lm_data(recipe: Recipe) -> Any:
    """The recipe's language-model data with the run's tokenizer: the student's, else the data section's,
    else the teacher's (as `distill.tasks.causal_lm.prepare_lm_run` chose it)."""
    from distill.data import build_data
    from distill.tasks.causal_lm import _model_tokenizer

    params = dict(recipe.data.params)
    tokenizer = _model_tokenizer(recipe.student)
    if tokenizer is None and params.get("tokenizer") is None:
        tokenizer = _model_tokenizer(recipe.teacher)
    if tokenizer is not None:
        params["tokenizer"] = tokenizer
    return build_data(recipe.data.name, **params)


def build_student(run: FinishedRun, weights: dict[str, Tensor], where: str, data: Any = None) -> Student:
    """The recipe's student with `weights`, in eval mode; a LoRA student merged into its base model. `data`:
    the recipe's data when already built (students of one run share it)."""
    recipe = run.recipe
    if run.task == CAUSAL_LM:
        from distill.tasks.causal_lm import build_lm_model

        data = data if data is not None else lm_data(recipe)
        with quiet_transformers():
            model = build_lm_model(recipe.student, data.tokenizer, "student")
        load_weights_into(model, weights, where)
        if hasattr(model, "merge_and_unload"):  # a PEFT (LoRA) student ships as one plain model
            model = model.merge_and_unload()
        model.config.use_cache = True  # training turned the key/value cache off; generation wants it
        return Student(model.eval(), run.task, data, tokenizer=data.tokenizer)
    from distill.data import build_data
    from distill.models import build_model

    data = data if data is not None else build_data(recipe.data.name, **recipe.data.params)
    model = build_model(
        recipe.student.name,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        **recipe.student.params,
    )
    load_weights_into(model, weights, where)
    if run.task == TEXT:
        tokenizer = text_tokenizer(data.tokenizer)
        return Student(model.eval(), run.task, data, tokenizer=tokenizer, spec=text_spec(recipe, data, model))
    return Student(model.eval(), run.task, data, spec=classifier_spec(recipe, data))


def load_run_student(run: FinishedRun, choice: Choice, data: Any = None) -> Student:
    weights, step = verified_weights(run, choice)
    student = build_student(run, weights, f"{run.path} {choice.method.name} seed {choice.seed}", data)
    student.step = step
    return student
