"""Run a recipe, whatever its task: the task prepares data and teacher, then every method x seed is trained
with `fit`, and the result is what the task's report reads.

The runner never branches on the kind of task (`distill.tasks`): a new task is a new module there. It owns
what every run shares: the run folder (`distill.runfolder`), the same-recipe check of `--resume`, the
recipe copy, seeds, schedules in optimizer steps (for every process count), checkpoints per method x seed.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from rich.console import Console
from torch import nn

from distill.errors import UserError
from distill.io import atomic_write_text, fingerprint
from distill.objectives.terms import Term
from distill.recipe.schema import MethodSpec, Recipe, SelfTeacherSpec, method_slug
from distill.runfolder import RunFolder, manifest_recipe, recipe_inputs
from distill.tasks import ExperimentResult, MethodRuns, SeedRun, Task, TaskSetup, TeacherInfo, task_for
from distill.tasks.base import MethodPlan
from distill.tasks.feature_layers import method_reads_features
from distill.tasks.regimes import Regimes, estimated_alpha, generation_terms, held_out_split
from distill.tasks.teacher_store import optimizer_config, schedule_config, steps_per_epoch, world_size
from distill.teachers import FrozenTeacher
from distill.train import FitResult, fit
from distill.train.logs import warn
from distill.train.seeding import seed_everything

__all__ = ["ExperimentResult", "MethodRuns", "SeedRun", "TeacherInfo", "open_run_folder", "run_recipe"]


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
    # The folder's manifest keeps the recipe from the first write on (before a teacher trains into it).
    document = recipe.model_dump(mode="json")
    folder = RunFolder(Path(explicit), protected, document).open(resume=resume, overwrite=overwrite)
    if folder.path.is_dir():
        refuse_links_out(folder.path)
    # Absolute from here on: every artefact is written under this folder, whatever the working directory.
    folder.path = folder.path.resolve()
    return folder


def refuse_links_out(folder: Path) -> None:
    """Refuse a run folder holding a symbolic link that leads outside it: writing the run's files through it
    (checkpoints, logs, reports) would change files elsewhere."""
    try:
        root = folder.resolve()
    except (RuntimeError, OSError) as err:  # a loop of links (Python 3.11 raises RuntimeError)
        raise UserError(f"output folder {folder}: cannot resolve it ({err})") from None
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            entry = Path(parent) / name
            if not entry.is_symlink():
                continue
            try:
                target = entry.resolve()
            except (RuntimeError, OSError):
                raise UserError(
                    f"output folder {folder}: {entry.relative_to(root)} is a symbolic link loop; "
                    "remove it (a run writes only inside its folder)"
                ) from None
            if not target.is_relative_to(root):
                raise UserError(
                    f"output folder {folder}: {entry.relative_to(root)} links outside it "
                    f"(to {target}); a run writes only inside its folder"
                )


def recipe_key(recipe: Recipe) -> str:
    """What makes two recipes the same run (the output section aside)."""
    return fingerprint(recipe.model_dump(mode="json", exclude={"output"}))


def refuse_another_recipe(folder: RunFolder, recipe: Recipe) -> None:
    """`--resume` continues only the run of the same recipe: its copy in the folder (`recipe.yaml`, written
    once the teacher is ready) or, for a run stopped before that (while its teacher trained), the one its
    manifest keeps. A run that has neither (from before manifests kept it) resumes unchecked."""
    stored = folder.path / "recipe.yaml"
    if stored.exists() or stored.is_symlink():
        earlier = _stored_recipe(stored)
    else:
        document = manifest_recipe(folder.path)
        if document is None:
            return
        try:
            earlier = Recipe.model_validate(document)
        except (ValidationError, TypeError, ValueError):  # a manifest from another version of the schema
            earlier = None
    if earlier is None or recipe_key(earlier) != recipe_key(recipe):
        raise UserError(
            f"--resume: {folder.path} was started from a different recipe; run the recipe it was started "
            "from, or start afresh with --overwrite or another --out"
        )


def _stored_recipe(stored: Path) -> Recipe:
    try:
        text = stored.read_text()
        if not text.strip():
            raise UserError(f"--resume: {stored} is empty, not the recipe distill wrote there")
        return Recipe.model_validate(yaml.safe_load(text))
    except UserError:
        raise
    except (OSError, RuntimeError, yaml.YAMLError, ValidationError, TypeError, ValueError) as err:
        raise UserError(f"--resume: {stored} is not a recipe distill wrote ({type(err).__name__})") from None


def warn_larger_student(student: nn.Module, teacher: TeacherInfo | None) -> None:
    """Distillation compresses: a student with more parameters than its teacher is most often a recipe
    with the two swapped, so say so (once, before the first student trains); it is not refused, since
    distilling into a larger model is a legitimate experiment."""
    if teacher is None or teacher.parameters <= 0:
        return
    size = sum(p.numel() for p in student.parameters())
    if size > teacher.parameters:
        warn(
            f"the student has more parameters ({size:,}) than the teacher ({teacher.parameters:,}); "
            "are student and teacher swapped?"
        )


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
        "max_steps": t.max_steps,
        "max_tokens": t.max_tokens,
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
        "trackers": list(recipe.output.trackers),
        "tracker_project": recipe.name,
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
    """Run every method x seed of `recipe`. `teacher_wrapper`, if given, wraps the teacher model the students
    see (e.g. `distill.bench.memo.MemoizedTeacher`); latency is still measured on the bare teacher."""
    task = task_for(recipe)
    task.check(recipe)
    console = console or Console(stderr=True)
    started = time.perf_counter()
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    folder = open_run_folder(recipe, out=out, resume=resume, overwrite=overwrite)
    try:
        if resume:
            refuse_another_recipe(folder, recipe)
        setup = task.prepare(recipe, folder, progress=progress, console=console)
        wrapped = None
        if teacher_wrapper is not None and isinstance(setup.teacher, nn.Module):
            wrapped = teacher_wrapper(setup.teacher)
        # Only now, with data, student and teacher known to fit, does the run folder appear.
        folder.claim()
        atomic_write_text(
            folder.path / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        )
        info = setup.teacher_info
        if info is not None:
            console.print(
                f"teacher ({info.source}): {info.parameters:,} parameters, {task.describe(info.metrics)}"
            )
        methods, student = _train_methods(task, recipe, setup, folder, resume, progress, console, wrapped)
        return ExperimentResult(
            recipe=recipe,
            out_dir=folder.path,
            data=setup.data,
            teacher=info,
            student_parameters=task.student_parameters(student) if student is not None else 0,
            methods=methods,
            latency=task.latency(recipe, setup, student) if student is not None else {},
            wall_seconds=time.perf_counter() - started,
            task=task.name,
            extra=task.result_extra(setup),
        )
    finally:
        folder.release()


@dataclass
class MethodTraining:
    """What every student fit of one method shares; `fit_student` trains one (a seed, or a generation)."""

    recipe: Recipe
    method: MethodSpec
    setup: TaskSetup
    plan: MethodPlan
    method_dir: Path
    recipe_key: str
    resume: bool
    progress: bool

    def fit_student(
        self,
        student: nn.Module,
        seed: int,
        terms: list[Term],
        teacher: Any,
        run_name: str,
        label: str,
        train_set: Any = None,
    ) -> FitResult:
        recipe = self.recipe
        seeded = self.plan.seed(student, seed, terms, teacher)
        if self.method.teacher is not None:  # the regime's teacher, whatever the source planned
            seeded = replace(seeded, teacher=teacher)
        if train_set is not None:  # a part of the training set (self-distillation's held-out split)
            seeded = replace(seeded, train_set=train_set)
        # The schedule spans the method's planned data (or the part of it this student trains on).
        planned = self.plan.train_set if train_set is None else train_set
        per_epoch = steps_per_epoch(
            len(planned), recipe.data.batch_size, recipe.trainer.grad_accum, world_size()
        )
        # Earlier runs' fingerprints (resume checks) had no run name: the seed's own run keeps that form.
        named = [] if run_name == f"seed-{seed}" else [run_name]
        result = fit(
            student,
            seeded.train_set,
            teacher=seeded.teacher,
            objectives=seeded.objectives,
            batch_transform=seeded.batch_transform,
            optimizer=optimizer_config(recipe.optimizer),
            schedule=schedule_config(recipe.schedule, per_epoch),
            run_dir=self.method_dir / run_name,
            resume=self.resume,
            fingerprint=fingerprint([self.recipe_key, self.method.name, seed, *named]),
            label=label,
            **self.setup.fit_settings,
            **student_trainer_settings(recipe, seed=seed, progress=self.progress),
        )
        if seeded.finish is not None:
            seeded.finish(result, recipe.trainer.epochs)
        return result


def _train_methods(
    task: Task,
    recipe: Recipe,
    setup: TaskSetup,
    folder: RunFolder,
    resume: bool,
    progress: bool,
    console: Console,
    wrapped_teacher: nn.Module | None = None,
) -> tuple[list[MethodRuns], nn.Module | None]:
    key = recipe_key(recipe)
    regimes = Regimes(task, recipe, setup, folder, progress)
    methods: list[MethodRuns] = []
    student = None
    for method in recipe.method_list():
        runs = MethodRuns(method.name, [o.model_dump(mode="json") for o in method.objectives])
        plan = task.plan_method(recipe, method, setup, folder)
        # A wrapped teacher (a memo of its logits) serves logit objectives; features need the hooks.
        teacher = regimes.method_teacher(method) or (
            setup.teacher if wrapped_teacher is None or method_reads_features(method) else wrapped_teacher
        )
        if method.name in regimes.ensembles:
            runs.teacher = regimes.ensembles[method.name]
            console.print(f"  {method.name}: ensemble teacher {task.describe(runs.teacher.metrics)}")
        training = MethodTraining(
            recipe,
            method,
            setup,
            plan,
            folder.path / "methods" / method_slug(method.name),
            key,
            resume,
            progress,
        )
        for seed in recipe.seeds:
            seed_everything(seed)
            first = student is None
            student = task.build_student(recipe, setup)
            if first:
                warn_larger_student(student, setup.teacher_info)
            fit_started = time.perf_counter()
            extra: dict[str, Any] = {}
            if isinstance(method.teacher, SelfTeacherSpec):
                result, extra, student = _self_distillation(task, training, student, seed, console)
            else:
                seed_teacher = regimes.seed_teacher(method, student) or teacher
                terms = method_terms(method)
                label = f"{method.name} seed {seed}"
                result = training.fit_student(student, seed, terms, seed_teacher, f"seed-{seed}", label)
            task.finish_seed(recipe, method, result, setup)
            runs.runs.append(SeedRun(seed, result, time.perf_counter() - fit_started, extra))
            shown = f"{task.describe(result.final)} ({result.train_seconds:.1f}s)"
            console.print(f"  {method.name:<16} seed {seed}: {shown}")
        methods.append(runs)
    return methods, student


def _self_distillation(
    task: Task,
    training: MethodTraining,
    student: nn.Module,
    seed: int,
    console: Console,
) -> tuple[FitResult, dict[str, Any], nn.Module]:
    """S22's generations for one seed: the first on the label terms alone, each later one a fresh student
    (the same initial weights) taught by the last, frozen, with the labels weighted alpha and the teacher
    terms 1 - alpha. With `alpha: estimate`, each generation first trains a student with alpha 0 and takes
    the alpha that best mixes its held-out predictions with the first generation's (S22's estimate). The
    last generation trains in `seed-N` (what reports and `distill export` read); the others beside it."""
    method, recipe = training.method, training.recipe
    spec = method.teacher
    assert isinstance(spec, SelfTeacherSpec)
    estimate = spec.alpha == "estimate"
    train_set, held_out = None, None
    if estimate:
        train_set, held_out = held_out_split(training.plan.train_set, spec.held_out, seed)
    generations: list[dict[str, Any]] = []
    first: nn.Module | None = None
    previous: nn.Module | None = None
    result: FitResult | None = None

    def fresh_student() -> nn.Module:
        seed_everything(seed)
        return task.build_student(recipe, training.setup)

    for generation in range(1, spec.generations + 1):
        if generation > 1:
            student = fresh_student()
        teacher = FrozenTeacher(copy.deepcopy(previous)) if previous is not None else None
        alpha: float | None = None
        if previous is not None and estimate:
            assert first is not None and held_out is not None
            probe = fresh_student()
            name = f"seed-{seed}-generation-{generation}-alpha-0"
            probe_terms = generation_terms(method, method_terms(method), 0.0)
            training.fit_student(probe, seed, probe_terms, teacher, name, f"{method.name} {name}", train_set)
            alpha = estimated_alpha(first, probe, held_out, recipe.data.eval_batch_size)
        elif previous is not None:
            alpha = float(spec.alpha)  # type: ignore[arg-type]
        terms = generation_terms(method, method_terms(method), alpha)
        run_name = (
            f"seed-{seed}" if generation == spec.generations else f"seed-{seed}-generation-{generation}"
        )
        label = f"{method.name} seed {seed} generation {generation}"
        result = training.fit_student(student, seed, terms, teacher, run_name, label, train_set)
        generations.append({"generation": generation, "alpha": alpha, "metrics": dict(result.final)})
        weighting = f"alpha {alpha:.3f}" if alpha is not None else "labels only"
        console.print(f"    generation {generation} ({weighting}): {task.describe(result.final)}")
        first = first or student
        previous = student
    assert result is not None
    return result, {"generations": generations}, student
