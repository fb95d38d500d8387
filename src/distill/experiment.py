"""Run a recipe: obtain the teacher, train every method x seed, and collect what the report needs.

Built on the Python API (`build_data`, `build_model`, `fit`); the CLI only calls `run_recipe`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from distill.cache.indexed import IndexedDataset
from distill.data import DataSplits, build_data
from distill.errors import UserError
from distill.io import (
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    load_tensors,
    save_tensors,
    sha256_file,
)
from distill.metrics import latency_per_batch
from distill.models import build_model, count_parameters
from distill.recipe.schema import MethodSpec, ModelSpec, Recipe, ScheduleSpec, TeacherSpec, method_slug
from distill.runfolder import RunFolder, recipe_inputs
from distill.train import FitResult, OptimizerConfig, ScheduleConfig, Term, fit
from distill.train.seeding import seed_everything


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


@dataclass
class SeedRun:
    seed: int
    result: FitResult
    wall_seconds: float = 0.0  # the whole fit call: training, evaluation, checkpoints


@dataclass
class MethodRuns:
    name: str
    objectives: list[dict[str, Any]]
    runs: list[SeedRun] = field(default_factory=list)


@dataclass
class TeacherInfo:
    source: str  # "trained", "cache", "checkpoint"
    parameters: int
    metrics: dict[str, float]
    train_seconds: float
    history: list[dict[str, Any]]


@dataclass
class ExperimentResult:
    recipe: Recipe
    out_dir: Path
    data: DataSplits
    teacher: TeacherInfo | None
    student_parameters: int
    methods: list[MethodRuns]
    latency: dict[str, float]
    wall_seconds: float
    task: str = "classification"  # or "lm" (distill.lm): per-token metrics, its own report
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific facts for the report (LM samples)


def optimizer_config(spec: Any) -> OptimizerConfig:
    return OptimizerConfig(
        name=spec.name,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        betas=tuple(spec.betas),
    )


def schedule_config(spec: ScheduleSpec, steps_per_epoch: int) -> ScheduleConfig:
    """Epoch-based recipe settings in optimizer steps."""
    return ScheduleConfig(
        name=spec.name,
        warmup_steps=round(spec.warmup_epochs * steps_per_epoch),
        min_lr_ratio=spec.min_lr_ratio,
        milestones=[round(m * steps_per_epoch) for m in spec.milestones],
        gamma=spec.gamma,
    )


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int) -> int:
    batches = math.ceil(examples / batch_size)
    return math.ceil(batches / grad_accum)


def open_run_folder(recipe: Recipe, *, out: Path | None, resume: bool, overwrite: bool) -> RunFolder:
    """The run folder; an earlier run in it is refused unless resuming or overwriting (which removes only
    what distill's manifest lists, never the recipe or its inputs: `distill.runfolder`)."""
    explicit = out if out is not None else recipe.output.dir
    if explicit is None:
        if resume:
            raise UserError("--resume needs the run folder: give --out DIR or output.dir in the recipe")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        explicit = Path("runs") / recipe.name / stamp
    protected = list(recipe_inputs(recipe.model_dump(mode="json")))
    if recipe.source_file is not None:
        protected.append(recipe.source_file)
    folder = RunFolder(Path(explicit), protected).open(resume=resume, overwrite=overwrite)
    if folder.path.is_dir():
        refuse_links_out(folder.path)
    # Absolute from here on: every artefact is written under this folder, whatever the working directory.
    folder.path = folder.path.resolve()
    return folder


def refuse_links_out(folder: Path) -> None:
    """Refuse a run folder holding a symbolic link that leads outside it: writing the run's files through it
    (checkpoints, logs, reports) would change files elsewhere."""
    root = folder.resolve()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            entry = Path(parent) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise UserError(
                    f"output folder {folder}: {entry.relative_to(root)} links outside it "
                    f"(to {entry.resolve()}); a run writes only inside its folder"
                )


def _load_weights(model: nn.Module, path: Path, role: str) -> None:
    if not path.exists():
        raise UserError(f"{role}.checkpoint not found: {path}")
    try:
        tensors = load_tensors(path)
    except Exception as err:  # safetensors raises several types for a bad file
        raise UserError(f"{role}.checkpoint {path} is not a safetensors file ({err})") from err
    own = model.state_dict()
    for key, tensor in tensors.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"{role}.checkpoint {path} does not fit the {role} model: "
                f"'{key}' has shape {tuple(tensor.shape)}, "
                f"the model {tuple(own[key].shape)} (another class count or architecture?)"
            )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{role}.checkpoint {path} does not fit the {role} model "
            f"(missing {len(missing)} tensors, e.g. {missing[:1]}; unexpected {len(unexpected)})"
        )


def build_recipe_model(spec: ModelSpec, data: DataSplits, role: str) -> nn.Module:
    model = build_model(spec.name, num_classes=data.num_classes, input_shape=data.input_shape, **spec.params)
    if spec.checkpoint is not None:
        _load_weights(model, spec.checkpoint, role)
    return model


def _check_class_counts(model: nn.Module, data: DataSplits, role: str) -> None:
    example = data.test[0][0][None]
    with torch.inference_mode():
        was_training = model.training
        model.eval()
        classes = model(example).shape[-1]
        model.train(was_training)
    if classes != data.num_classes:
        raise UserError(f"the {role} predicts {classes} classes but the data has {data.num_classes}")


def check_labels(data: DataSplits) -> None:
    """Refuse labels outside 0..num_classes-1 before training (a corrupt label file; cross-entropy would stop
    at the first such batch, or trip a device-side assert on a GPU). Splits that keep their labels in one
    tensor are checked; others are left to the loss."""
    for split in ("train", "test", "teacher_train"):
        dataset = getattr(data, split)
        tensors = dataset.tensors if isinstance(dataset, TensorDataset) else ()
        labels = tensors[1] if len(tensors) > 1 else getattr(dataset, "labels", None)
        if not isinstance(labels, torch.Tensor) or labels.numel() == 0 or labels.is_floating_point():
            continue
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= data.num_classes:
            bad = low if low < 0 else high
            raise UserError(
                f"data: the {split} split has label {bad}, outside 0..{data.num_classes - 1} "
                f"(the data set has {data.num_classes} classes)"
            )


def teacher_spec_identity(spec: TeacherSpec) -> dict[str, Any]:
    """The teacher spec's fields that decide its weights (not where caches live)."""
    return spec.model_dump(mode="json", exclude={"cache": True, "train": {"cache"}})


def obtain_teacher(
    recipe: Recipe, data: DataSplits, folder: RunFolder, progress: bool
) -> tuple[nn.Module, TeacherInfo]:
    """The teacher from its checkpoint, from the run cache, or trained now (and cached)."""
    spec: TeacherSpec = recipe.teacher  # type: ignore[assignment]
    seed_everything(spec.train.seed)
    teacher = build_recipe_model(spec, data, "teacher")
    train_set = data.teacher_train or data.train
    if spec.checkpoint is not None:
        _check_class_counts(teacher, data, "teacher")
        return teacher, TeacherInfo("checkpoint", count_parameters(teacher), {}, 0.0, [])

    key = fingerprint(
        {
            "model": teacher_spec_identity(spec),
            "data": recipe.data.model_dump(mode="json"),
            "format": 1,
        }
    )
    cached = cache_root() / "teachers" / key
    info = fit_or_load_teacher(
        teacher,
        recipe,
        train_set,
        cached,
        folder,
        progress,
        load=lambda model, weights: _load_weights(model, weights, "teacher"),
        eval_data=data.test,
        eval_batch_size=recipe.data.eval_batch_size,
    )
    return teacher, info


def fit_or_load_teacher(
    teacher: nn.Module,
    recipe: Recipe,
    train_set: Any,
    cached: Path,
    folder: RunFolder,
    progress: bool,
    *,
    load: Callable[[nn.Module, Path], None],
    **evaluation: Any,
) -> TeacherInfo:
    """Load the teacher's weights from the run cache folder `cached` (when the recipe caches and the
    checksum holds) or train it with cross-entropy and cache it. `evaluation`: `fit` settings for its
    evaluation (an evaluation set, or a language model's evaluator)."""
    spec: TeacherSpec = recipe.teacher  # type: ignore[assignment]
    hit = read_teacher_cache(cached) if spec.train.cache else None
    if hit is not None:
        weights, manifest = hit
        load(teacher, weights)
        return TeacherInfo(
            "cache",
            count_parameters(teacher),
            manifest["metrics"],
            manifest["train_seconds"],
            manifest.get("history", []),
        )
    batch = recipe.data.batch_size
    folder.claim()  # the teacher's checkpoints go into the run folder
    result = fit(
        teacher,
        train_set,
        objectives=["cross_entropy"],
        optimizer=optimizer_config(spec.train.optimizer),
        schedule=schedule_config(spec.train.schedule, steps_per_epoch(len(train_set), batch, 1)),
        run_dir=folder.path / "teacher",
        epochs=spec.train.epochs,
        batch_size=batch,
        seed=spec.train.seed,
        progress=progress,
        tensorboard=False,
        device=recipe.trainer.device,
        label="teacher",
        **evaluation,
    )
    info = TeacherInfo(
        "trained", count_parameters(teacher), result.final, result.train_seconds, result.history
    )
    if spec.train.cache:
        write_teacher_cache(cached, teacher, info, spec)
    return info


def read_teacher_cache(cached: Path) -> tuple[Path, dict[str, Any]] | None:
    """The cached teacher's weights file and manifest, when both are there and the checksum holds."""
    manifest_path, weights = cached / "manifest.json", cached / "model.safetensors"
    if not (manifest_path.exists() and weights.exists()):
        return None
    manifest = json.loads(manifest_path.read_text())
    return (weights, manifest) if sha256_file(weights) == manifest["sha256"] else None


def write_teacher_cache(cached: Path, teacher: nn.Module, info: TeacherInfo, spec: TeacherSpec) -> None:
    """Weights + manifest (checksum, metrics, spec), staged under a private name and renamed into place."""
    if int(os.environ.get("RANK", "0")) != 0:  # several processes trained the same teacher: rank 0 stores it
        return
    staging = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_tensors(staging / "model.safetensors", teacher.state_dict())
    atomic_write_json(
        staging / "manifest.json",
        {
            "sha256": sha256_file(staging / "model.safetensors"),
            "metrics": info.metrics,
            "train_seconds": info.train_seconds,
            "history": info.history,
            "spec": spec.model_dump(mode="json"),
        },
    )
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(staging, cached)


def method_terms(method: MethodSpec) -> list[Term]:
    return [
        Term(o.name, weight=o.weight, params=dict(o.params), warmup_epochs=o.warmup_epochs)
        for o in method.objectives
    ]


def student_trainer_settings(recipe: Recipe, *, seed: int, progress: bool) -> dict[str, Any]:
    """The recipe's trainer section as `fit()` settings for one student run."""
    t = recipe.trainer
    return {
        "epochs": t.epochs,
        "batch_size": recipe.data.batch_size,
        "grad_accum": t.grad_accum,
        "mixed_precision": t.mixed_precision,
        "max_grad_norm": t.max_grad_norm,
        "checkpoint_every": t.checkpoint_every,
        "keep_checkpoints": t.keep_checkpoints,
        "eval_every": t.eval_every,
        "log_every": t.log_every,
        "nonfinite": t.nonfinite,
        "fused_loss": t.fused_loss,
        "device": t.device,
        "seed": seed,
        "progress": progress,
        "tensorboard": recipe.output.tensorboard,
    }


def run_recipe(
    recipe: Recipe,
    *,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    teacher_wrapper: Callable[[nn.Module], nn.Module] | None = None,
) -> ExperimentResult:
    """Run every method x seed of `recipe`. `teacher_wrapper`, if given, wraps the frozen teacher the students
    see (e.g. `distill.bench.memo.MemoizedTeacher`); latency is still measured on the bare teacher."""
    from distill.lm import is_lm_recipe

    if is_lm_recipe(recipe):  # language models: their own runner (tokenizers, generations, per-token metrics)
        from distill.lm.experiment import run_lm_recipe

        return run_lm_recipe(
            recipe, out=out, resume=resume, overwrite=overwrite, progress=progress, console=console
        )
    if any(m.source is not None and m.source.name != "dataset" for m in recipe.method_list()) or (
        recipe.source.name != "dataset"
    ):
        raise UserError("source 'teacher_generations' needs a language-model recipe (data: text, jsonl, ...)")
    console = console or Console(stderr=True)
    started = time.perf_counter()
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    folder = open_run_folder(recipe, out=out, resume=resume, overwrite=overwrite)
    try:
        return _run_classification(recipe, folder, resume, progress, console, teacher_wrapper, started)
    finally:
        folder.release()


def _run_classification(
    recipe: Recipe,
    folder: RunFolder,
    resume: bool,
    progress: bool,
    console: Console,
    teacher_wrapper: Callable[[nn.Module], nn.Module] | None,
    started: float,
) -> ExperimentResult:
    out_dir = folder.path
    recipe_text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    recipe_key = fingerprint(recipe.model_dump(mode="json", exclude={"output"}))
    if resume:
        stored = out_dir / "recipe.yaml"
        if (
            stored.exists()
            and fingerprint(
                Recipe.model_validate(yaml.safe_load(stored.read_text())).model_dump(
                    mode="json", exclude={"output"}
                )
            )
            != recipe_key
        ):
            raise UserError(f"--resume: {out_dir} was started from a different recipe")

    data = build_data(recipe.data.name, **recipe.data.params)
    check_labels(data)
    _check_class_counts(build_recipe_model(recipe.student, data, "student"), data, "student")
    console.print(f"[bold]{recipe.name}[/] -> {out_dir}\n{data.description}")

    teacher, teacher_info, cache = None, None, None
    if recipe.teacher is not None and recipe.teacher.cache is not None:
        from distill.cache.build import (
            cache_teacher_info,
            dataset_fingerprint,
            open_recipe_cache,
            refuse_augmented,
        )

        refuse_augmented(data.train)
        cache = open_recipe_cache(recipe, data=dataset_fingerprint(data.train), vocab=data.num_classes)
        teacher_info = cache_teacher_info(cache)
    elif recipe.teacher is not None:
        teacher, teacher_info = obtain_teacher(recipe, data, folder, progress)
    train_set = data.train if cache is None else IndexedDataset(data.train)
    bare_teacher = teacher
    if teacher is not None and teacher_wrapper is not None:
        teacher = teacher_wrapper(teacher)
    # Only now, with data, student and teacher known to fit, does the run folder appear.
    folder.claim()
    atomic_write_text(out_dir / "recipe.yaml", recipe_text)
    if teacher_info is not None:
        accuracy = teacher_info.metrics.get("accuracy")
        shown = f"{accuracy:.4f}" if accuracy is not None else "not evaluated"
        console.print(
            f"teacher ({teacher_info.source}): {teacher_info.parameters:,} parameters, accuracy {shown}"
        )

    t = recipe.trainer
    methods: list[MethodRuns] = []
    student_parameters = 0
    student = None
    for method in recipe.method_list():
        runs = MethodRuns(method.name, [o.model_dump(mode="json") for o in method.objectives])
        for seed in recipe.seeds:
            seed_everything(seed)
            student = build_recipe_model(recipe.student, data, "student")
            student_parameters = count_parameters(student)
            per_epoch = steps_per_epoch(len(data.train), recipe.data.batch_size, t.grad_accum)  # type: ignore[arg-type]
            fit_started = time.perf_counter()
            result = fit(
                student,
                train_set,
                teacher=teacher,
                teacher_cache=cache,
                eval_data=data.test,
                objectives=method_terms(method),
                optimizer=optimizer_config(recipe.optimizer),
                schedule=schedule_config(recipe.schedule, per_epoch),
                run_dir=out_dir / "methods" / method_slug(method.name) / f"seed-{seed}",
                resume=resume,
                fingerprint=fingerprint([recipe_key, method.name, seed]),
                label=f"{method.name} seed {seed}",
                eval_batch_size=recipe.data.eval_batch_size,
                **student_trainer_settings(recipe, seed=seed, progress=progress),
            )
            runs.runs.append(SeedRun(seed, result, time.perf_counter() - fit_started))
            console.print(
                f"  {method.name:<16} seed {seed}: accuracy {result.final.get('accuracy', float('nan')):.4f} "
                f"({result.train_seconds:.1f}s)"
            )
        methods.append(runs)

    latency: dict[str, float] = {}
    if recipe.evaluation.latency and student is not None:
        example = torch.stack(
            [data.test[i][0] for i in range(min(len(data.test), recipe.data.eval_batch_size))]
        )
        latency["student"] = latency_per_batch(student.cpu(), example)
        if bare_teacher is not None:
            latency["teacher"] = latency_per_batch(bare_teacher.cpu(), example)
        latency["batch"] = float(len(example))
    return ExperimentResult(
        recipe=recipe,
        out_dir=out_dir,
        data=data,
        teacher=teacher_info,
        student_parameters=student_parameters,
        methods=methods,
        latency=latency,
        wall_seconds=time.perf_counter() - started,
    )
