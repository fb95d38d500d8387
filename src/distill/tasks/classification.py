"""Classification: (input, label) data sets from `distill.data`, models from the zoo, accuracy, agreement
with the teacher, KL and calibration on the test split, and the latency of student and teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from distill.cache.indexed import IndexedDataset
from distill.data import DataSplits, build_data
from distill.data.base import IGNORE_LABEL
from distill.errors import UserError
from distill.io import cache_root, fingerprint
from distill.metrics import latency_per_batch
from distill.models import build_model, count_parameters
from distill.recipe.schema import MethodSpec, ModelSpec, Recipe, TeacherSpec
from distill.runfolder import RunFolder
from distill.tasks.base import TASKS, MethodPlan, Task, TaskSetup
from distill.tasks.classifier_sources import CLASSIFIER_SOURCES, plan_source
from distill.tasks.feature_layers import check_feature_layers, reads_features
from distill.tasks.results import ExperimentResult, TeacherInfo
from distill.tasks.teacher_cache import (
    CacheSource,
    cache_teacher_info,
    dataset_fingerprint,
    open_recipe_cache,
    refuse_augmented,
)
from distill.tasks.teacher_store import fit_or_load_teacher, load_weights, teacher_spec_identity
from distill.teachers import CachedTeacher
from distill.train.seeding import seed_everything


def build_recipe_model(spec: ModelSpec, data: DataSplits, role: str) -> nn.Module:
    model = build_model(spec.name, num_classes=data.num_classes, input_shape=data.input_shape, **spec.params)
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, role)
    return model


def check_class_counts(model: nn.Module, data: DataSplits, role: str) -> None:
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
        if split == "train":  # hidden labels of a semi-supervised training split
            labels = labels[labels != IGNORE_LABEL]
            if labels.numel() == 0:
                raise UserError("data: every label of the training split is hidden (-100)")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= data.num_classes:
            bad = low if low < 0 else high
            raise UserError(
                f"data: the {split} split has label {bad}, outside 0..{data.num_classes - 1} "
                f"(the data set has {data.num_classes} classes)"
            )


def obtain_teacher(
    recipe: Recipe, data: DataSplits, folder: RunFolder, progress: bool, run_name: str = "teacher"
) -> tuple[nn.Module, TeacherInfo]:
    """The teacher from its checkpoint, from the run cache, or trained now (and cached) in the run folder's
    `run_name`."""
    spec: TeacherSpec = recipe.teacher  # type: ignore[assignment]
    seed_everything(spec.train.seed)
    teacher = build_recipe_model(spec, data, "teacher")
    train_set = data.teacher_train or data.train
    if spec.checkpoint is not None:
        check_class_counts(teacher, data, "teacher")
        return teacher, TeacherInfo("checkpoint", count_parameters(teacher), {}, 0.0, [])
    key = fingerprint(  # the data's content, not only its spec: a rewritten file trains a new teacher
        {
            "model": teacher_spec_identity(spec),
            "data": recipe.data.model_dump(mode="json"),
            "content": dataset_fingerprint(train_set),
            "format": 1,
        }
    )
    info = fit_or_load_teacher(
        teacher,
        recipe,
        train_set,
        cache_root() / "teachers" / key,
        folder,
        progress,
        load=lambda model, weights: load_weights(model, weights, "teacher"),
        eval_data=data.test,
        eval_batch_size=recipe.data.eval_batch_size,
        run_name=run_name,
    )
    return teacher, info


class ClassificationTask(Task):
    name = "classification"
    teacher_kinds = ("ensemble", "online", "ema", "self", "mixture")
    classifier_sources = tuple(CLASSIFIER_SOURCES)

    def prepare(self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console) -> TaskSetup:
        data = build_data(recipe.data.name, **recipe.data.params)
        check_labels(data)
        student = build_recipe_model(recipe.student, data, "student")
        self.check_models(recipe, data, student)
        check_class_counts(student, data, "student")
        if recipe.teacher is not None and reads_features(recipe):
            # Before the teacher trains: its architecture is all that is read (a cache has none).
            cached = recipe.teacher.cache is not None
            skeleton = None if cached else build_recipe_model(recipe.teacher, data, "teacher")
            check_feature_layers(recipe, student, skeleton)
        console.print(f"[bold]{recipe.name}[/] -> {folder.path}\n{data.description}")
        settings = {"eval_data": data.test, "eval_batch_size": recipe.data.eval_batch_size}
        if recipe.teacher is not None and recipe.teacher.cache is not None:
            refuse_augmented(data.train)
            cache = open_recipe_cache(recipe, data=dataset_fingerprint(data.train), vocab=data.num_classes)
            return TaskSetup(
                data,
                IndexedDataset(data.train),
                CachedTeacher(cache),
                cache_teacher_info(cache),
                fit_settings=settings,
            )
        teacher, info = None, None
        if recipe.teacher is not None:
            teacher, info = obtain_teacher(recipe, data, folder, progress)
        return TaskSetup(data, data.train, teacher, info, bare_teacher=teacher, fit_settings=settings)

    def check_models(self, recipe: Recipe, data: DataSplits, student: nn.Module) -> None:
        """Refuse, in one line and before the teacher trains, models that cannot read the data."""

    def build_student(self, recipe: Recipe, setup: TaskSetup) -> nn.Module:
        return build_recipe_model(recipe.student, setup.data, "student")

    def plan_method(
        self, recipe: Recipe, method: MethodSpec, setup: TaskSetup, folder: RunFolder
    ) -> MethodPlan:
        """The data set as it is, or each seed's batches as the method's classifier source makes them
        (`distill.tasks.classifier_sources`: mixup / cutmix, S37; llkd / random_subset, S05; kd3, S35)."""
        plan = super().plan_method(recipe, method, setup, folder)
        source = (method.source or recipe.source).name
        if source not in self.classifier_sources:
            return plan
        return plan_source(source, plan, recipe, method, setup)

    def cache_source(
        self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console
    ) -> CacheSource:
        data = build_data(recipe.data.name, **recipe.data.params)
        refuse_augmented(data.train)
        teacher, info = obtain_teacher(recipe, data, folder, progress)
        fingerprint_ = dataset_fingerprint(data.train)
        return CacheSource(data.train, teacher, info, "classification", data.num_classes, fingerprint_, None)

    def latency(self, recipe: Recipe, setup: TaskSetup, student: nn.Module) -> dict[str, float]:
        if not recipe.evaluation.latency:
            return {}
        test = setup.data.test
        example = torch.stack([test[i][0] for i in range(min(len(test), recipe.data.eval_batch_size))])
        latency = {"student": latency_per_batch(student.cpu(), example), "batch": float(len(example))}
        if setup.bare_teacher is not None:
            latency["teacher"] = latency_per_batch(setup.bare_teacher.cpu(), example)
        return latency

    def peer_model(self, recipe: Recipe, spec: ModelSpec, setup: TaskSetup) -> nn.Module:
        return build_recipe_model(spec, setup.data, "peer")

    def member_teacher(
        self,
        recipe: Recipe,
        spec: TeacherSpec,
        setup: TaskSetup,
        folder: RunFolder,
        *,
        progress: bool,
        run_name: str,
    ) -> tuple[nn.Module, TeacherInfo]:
        if spec.name is None:
            raise UserError("an ensemble member needs a model (name); a teacher cache cannot be a member")
        member = recipe.model_copy(update={"teacher": spec})
        return obtain_teacher(member, setup.data, folder, progress, run_name=run_name)

    def write_report(self, result: ExperimentResult) -> Path:
        from distill.tasks.classification_report import write_classification_report

        return write_classification_report(result)

    def print_table(self, result: ExperimentResult, console: Console) -> None:
        from distill.tasks.classification_report import print_classification_table

        print_classification_table(result, console)


TASKS.add(
    "classification", ClassificationTask, summary="image / tabular classifiers (accuracy, agreement, ECE)"
)
