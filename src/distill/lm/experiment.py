"""Run a language-model recipe: tokenizer -> data -> teacher (loaded, cached or trained) -> methods x seeds,
each method on its source (the data, or the teacher's generations), evaluated per token.

`distill.experiment.run_recipe` hands a recipe here when its data set or student is a language model's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from distill.cache import IndexedDataset, TeacherCache
from distill.cache.build import cache_teacher_info, dataset_fingerprint, open_recipe_cache
from distill.data import build_data
from distill.errors import UserError
from distill.experiment import (
    ExperimentResult,
    MethodRuns,
    SeedRun,
    TeacherInfo,
    _load_weights,
    cache_root,
    fit_or_load_teacher,
    method_terms,
    open_run_folder,
    optimizer_config,
    schedule_config,
    steps_per_epoch,
    student_trainer_settings,
    teacher_spec_identity,
)
from distill.io import (
    atomic_write_text,
    fingerprint,
    load_tensors,
)
from distill.lm.data import LMData, LMDataset
from distill.lm.evaluate import LMEvaluator, describe_metrics
from distill.lm.models import build_causal_lm, special_token_ids
from distill.lm.seqkd import GenerationSettings, teacher_generations, tokenizer_fingerprint
from distill.lm.tokenizers import load_tokenizer, shared_vocabulary, slice_logits
from distill.models import count_parameters
from distill.onpolicy.sources import ONPOLICY_SOURCES, SourcePlan
from distill.recipe.schema import ModelSpec, Recipe, SourceSpec, method_slug
from distill.runfolder import RunFolder
from distill.train import fit
from distill.train.seeding import seed_everything

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TEACHER_FORMAT = 1


def _model_tokenizer(spec: ModelSpec | None) -> Any:
    """The tokenizer a model spec names (`params.tokenizer`) or that its folder holds; None if neither."""
    if spec is None:
        return None
    if spec.params.get("tokenizer") is not None:
        return load_tokenizer(spec.params["tokenizer"])
    path = spec.params.get("path")
    if path is not None and any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        return load_tokenizer(path)
    return None


def build_lm_model(spec: ModelSpec, tokenizer: Any, role: str, *, for_training: bool = False) -> nn.Module:
    """The model of a recipe spec; a config takes its vocabulary size and special ids from the tokenizer.
    `for_training` builds a teacher in float32 (its `dtype` applies after training)."""
    params = {k: v for k, v in spec.params.items() if k != "tokenizer"}
    if for_training:
        params.pop("dtype", None)
    unknown = set(params) - {"config", "path", "dtype", "lora"}
    if unknown:
        raise UserError(
            f"{role}.params: unknown key '{sorted(unknown)[0]}'; valid: config, path, dtype, lora, tokenizer"
        )
    model = build_causal_lm(**params, vocab_size=len(tokenizer), special_tokens=special_token_ids(tokenizer))
    if spec.checkpoint is not None:
        _load_weights(model, spec.checkpoint, role)
    return model


def _teacher_key(recipe: Recipe, tokenizer: Any) -> str:
    spec = recipe.teacher
    assert spec is not None
    return fingerprint(
        {
            "model": teacher_spec_identity(spec),
            "data": recipe.data.model_dump(mode="json"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "format": TEACHER_FORMAT,
        }
    )


def obtain_lm_teacher(
    recipe: Recipe, data: LMData, folder: RunFolder, progress: bool, evaluator: LMEvaluator
) -> tuple[nn.Module, TeacherInfo]:
    """A folder's or checkpoint's teacher as it is; a config's teacher trained with cross-entropy on the
    training split (cached by content in `$DISTILL_CACHE/lm-teachers`)."""
    spec = recipe.teacher
    assert spec is not None
    tokenizer = data.tokenizer
    seed_everything(spec.train.seed)
    if spec.params.get("path") is not None or spec.checkpoint is not None:
        teacher = build_lm_model(spec, tokenizer, "teacher")
        return teacher, TeacherInfo("checkpoint", count_parameters(teacher), {}, 0.0, [])
    teacher = build_lm_model(spec, tokenizer, "teacher", for_training=True)
    key = _teacher_key(recipe, tokenizer)
    cached = cache_root() / "lm-teachers" / key
    info = fit_or_load_teacher(
        teacher,
        recipe,
        data.train,
        cached,
        folder,
        progress,
        load=lambda model, weights: model.load_state_dict(load_tensors(weights), strict=False),
        eval_every=spec.train.epochs,
        evaluator=evaluator,
    )
    dtype = spec.params.get("dtype")
    if dtype is not None:
        teacher = teacher.to({"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32))
    return teacher, info


def _source_data(
    source: SourceSpec,
    data: LMData,
    teacher: nn.Module | None,
    out_dir: Path,
    cache: dict[str, tuple[LMDataset, dict[str, Any]]],
    method: str,
) -> tuple[LMDataset, dict[str, Any]]:
    if source.name == "dataset":
        return data.train, {}  # type: ignore[return-value]
    if teacher is None:
        raise UserError(f"method '{method}': source 'teacher_generations' needs a teacher")
    settings = GenerationSettings.from_params(source.params)
    key = json.dumps(source.params, sort_keys=True)
    if key not in cache:
        if settings.max_new_tokens is None and data.layout == "text":
            settings = GenerationSettings(**{**source.params, "fixed_length": True})
        examples, info = teacher_generations(
            teacher,
            data.tokenizer,
            data.train.examples,  # type: ignore[attr-defined]
            settings,
            cache_dir=cache_root(),
            run_dir=out_dir,
        )
        if not examples:
            raise UserError(f"method '{method}': the teacher generated no token to learn from")
        cache[key] = (LMDataset(examples, data.train.pad_id), info)  # type: ignore[attr-defined]
    return cache[key]


@dataclass
class LMSetup:
    """What every language-model run (and `distill cache`) starts from."""

    data: LMData
    tokenizer: Any
    teacher: nn.Module | None
    teacher_info: TeacherInfo | None
    vocabulary: int | None
    evaluator: LMEvaluator
    cache: TeacherCache | None = None  # the recipe's teacher cache, standing in for `teacher`


def prepare_lm_run(recipe: Recipe, folder: RunFolder | Path, *, progress: bool, console: Console) -> LMSetup:
    """Tokenizer -> data -> vocabulary checks -> the frozen teacher (loaded, cached or trained). `folder`: the
    run folder (claimed before a teacher trains into it) or, for `distill cache`, a scratch folder."""
    run_folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    out_dir = run_folder.path
    student_tokenizer = _model_tokenizer(recipe.student)
    teacher_tokenizer = _model_tokenizer(recipe.teacher)
    params = dict(recipe.data.params)
    if student_tokenizer is not None:
        params["tokenizer"] = student_tokenizer
    elif params.get("tokenizer") is None:
        if teacher_tokenizer is None:
            raise UserError(
                "no tokenizer: give student.params.tokenizer (a folder), a student folder with one, or "
                "data.params.tokenizer (a folder or {bpe: {vocab_size: N}})"
            )
        params["tokenizer"] = teacher_tokenizer
    data = build_data(recipe.data.name, **params)
    if not isinstance(data, LMData):
        raise UserError(f"data '{recipe.data.name}' is not a language-model data set")
    tokenizer = data.tokenizer
    console.print(f"[bold]{recipe.name}[/] -> {out_dir}\n{data.description}")

    evaluator = LMEvaluator(data, batch_size=recipe.data.eval_batch_size)
    # Tokenizers and vocabulary sizes are checked before any teacher is trained or loaded.
    probe = build_lm_model(recipe.student, tokenizer, "student")
    from_cache = recipe.teacher is not None and recipe.teacher.cache is not None
    from_folder = recipe.teacher is not None and recipe.teacher.params.get("path") is not None
    probe_teacher = (
        build_lm_model(recipe.teacher, tokenizer, "teacher", for_training=True)
        if recipe.teacher is not None and not (from_folder or from_cache)
        else None
    )
    vocabulary = shared_vocabulary(teacher_tokenizer, tokenizer, probe_teacher, probe)
    del probe_teacher
    teacher, teacher_info = None, None
    if from_cache:
        cache = open_recipe_cache(
            recipe,
            data=dataset_fingerprint(data.train),
            vocab=vocabulary,
            tokenizer=tokenizer_fingerprint(tokenizer),
        )
        return LMSetup(data, tokenizer, None, cache_teacher_info(cache), vocabulary, evaluator, cache)
    if recipe.teacher is not None:
        teacher, teacher_info = obtain_lm_teacher(recipe, data, run_folder, progress, evaluator)
    if from_folder:
        vocabulary = shared_vocabulary(teacher_tokenizer, tokenizer, teacher, probe)
    if teacher is not None:
        slice_logits(teacher, vocabulary)
        if teacher_info is not None and not teacher_info.metrics:
            teacher_info.metrics = evaluator(teacher)
        teacher.eval().requires_grad_(False)
    del probe
    return LMSetup(data, tokenizer, teacher, teacher_info, vocabulary, evaluator)


def run_lm_recipe(
    recipe: Recipe,
    *,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> ExperimentResult:
    """Every method x seed of a language-model recipe; the result reads like a classification one, with
    per-token metrics in each run's `final` and `task == "lm"`."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    folder = open_run_folder(recipe, out=out, resume=resume, overwrite=overwrite)
    try:
        return _run_lm(recipe, folder, resume, progress, console, started)
    finally:
        folder.release()


def _run_lm(
    recipe: Recipe, folder: RunFolder, resume: bool, progress: bool, console: Console, started: float
) -> ExperimentResult:
    out_dir = folder.path
    recipe_text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    recipe_key = fingerprint(recipe.model_dump(mode="json", exclude={"output"}))

    setup = prepare_lm_run(recipe, folder, progress=progress, console=console)
    data, tokenizer, teacher, teacher_info = setup.data, setup.tokenizer, setup.teacher, setup.teacher_info
    vocabulary, evaluator, t = setup.vocabulary, setup.evaluator, recipe.trainer
    folder.claim()
    atomic_write_text(out_dir / "recipe.yaml", recipe_text)
    if teacher_info is not None:
        console.print(
            f"teacher ({teacher_info.source}): {teacher_info.parameters:,} parameters, "
            f"{describe_metrics(teacher_info.metrics)}"
        )

    methods: list[MethodRuns] = []
    samples: dict[str, list[dict[str, str]]] = {}
    generations: dict[str, dict[str, Any]] = {}
    sources: dict[str, tuple[LMDataset, dict[str, Any]]] = {}
    student_parameters = 0
    for method in recipe.method_list():
        runs = MethodRuns(method.name, [o.model_dump(mode="json") for o in method.objectives])
        source = method.source or recipe.source
        plan = None  # on-policy sources (student rollouts, OPSD, SODA, MixSD): `distill.onpolicy.sources`
        if source.name in ONPOLICY_SOURCES:
            plan = SourcePlan(
                source.name, source.params, method.name, data=data, teacher=teacher, out_dir=out_dir
            )
            train_set, generation = plan.train_set, plan.info  # type: ignore[assignment]
        else:
            train_set, generation = _source_data(source, data, teacher, out_dir, sources, method.name)
        if generation:
            generations[method.name] = generation
        train_tokens = train_set.counted_tokens()
        if setup.cache is not None:
            if train_set is not data.train:
                raise UserError(
                    f"method '{method.name}': a teacher cache covers the data set, not '{source.name}'"
                )
            train_set = IndexedDataset(train_set)  # type: ignore[assignment]
        for seed in recipe.seeds:
            seed_everything(seed)
            student = slice_logits(build_lm_model(recipe.student, tokenizer, "student"), vocabulary)
            student_parameters = count_parameters(student, trainable_only=True)
            per_epoch = steps_per_epoch(len(train_set), recipe.data.batch_size, t.grad_accum)
            fit_started = time.perf_counter()
            run = plan.start(student, seed, method_terms(method)) if plan is not None else None
            result = fit(
                student,
                run.train_set if run is not None else train_set,
                teacher=run.teacher if run is not None else teacher,
                teacher_cache=setup.cache,
                objectives=run.terms if run is not None else method_terms(method),
                batch_transform=run.batch_transform if run is not None else None,
                optimizer=optimizer_config(recipe.optimizer),
                schedule=schedule_config(recipe.schedule, per_epoch),
                run_dir=out_dir / "methods" / method_slug(method.name) / f"seed-{seed}",
                resume=resume,
                fingerprint=fingerprint([recipe_key, method.name, seed]),
                label=f"{method.name} seed {seed}",
                evaluator=evaluator,
                **student_trainer_settings(recipe, seed=seed, progress=progress),
            )
            seconds = max(result.train_seconds, 1e-9)
            for row in (result.final, result.best):
                row["tokens_per_second"] = train_tokens * t.epochs / seconds
            if run is not None:  # the tokens actually trained on, generation and teacher costs
                run.finish(result, t.epochs)
            runs.runs.append(SeedRun(seed, result, time.perf_counter() - fit_started))
            samples[method.name] = list(evaluator.samples)
            shown = describe_metrics(result.final) if "perplexity" in result.final else "not evaluated"
            console.print(f"  {method.name:<16} seed {seed}: {shown} ({result.train_seconds:.1f}s)")
        methods.append(runs)
    return ExperimentResult(
        recipe=recipe,
        out_dir=out_dir,
        data=data,
        teacher=teacher_info,
        student_parameters=student_parameters,
        methods=methods,
        latency={},
        wall_seconds=time.perf_counter() - started,
        task="lm",
        extra={"samples": samples, "generations": generations, "vocabulary": vocabulary},
    )
