"""Sentence embeddings with no head: a frozen sentence embedder (all-MiniLM-L6-v2: mean pooling and L2 norm,
as sentence-transformers runs it) teaches a smaller `sentence_encoder` (`distill.models.sentence_encoders`)
to embed texts as it does.

Data are the text-classification sets (`distill.data.text_classification`: `sms_spam`, `fortunes_topics`,
`text_table` over any csv / tsv / jsonl / parquet), tokenised with the teacher's tokenizer; their labels are
never trained on, only used for the downstream checks. The teacher is used as it is (no fine-tuning); its
embeddings of the training texts are computed once and served by sample id (`EmbeddingTeacher`) when the
objectives read nothing but them, else it runs live (TinyBERT's / MiniLM's objectives read its blocks).
The student is built with the teacher's embedding width (`projection`, a linear map after pooling, when its
own width differs), so both embed into one space and the projection ships with the student.

Each evaluation (`EmbeddingEvaluator`, metrics in `distill.tasks.embedding_eval`) embeds the held-out texts
and the training texts: cosine to the teacher's embedding of the same text, Spearman's rho of pairwise
similarities against the teacher's, k-NN and linear-probe accuracy / macro F1 with the data's labels.
`accuracy` (the key `fit` picks its best epoch by) is the k-NN accuracy.

A teacher cache (`distill cache RECIPE --hidden embedding`) holds the training texts' embeddings; a run
with `teacher: {cache: DIR}` reads them, and embeds the held-out texts with the teacher only if the recipe
also names it (`teacher.name`), else reports the label metrics alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from distill.cache.indexed import IndexedDataset
from distill.data import build_data
from distill.data.text_classification import TextClassificationData
from distill.errors import UserError
from distill.io import cache_root, fingerprint, load_tensors, save_tensors
from distill.metrics import latency_per_batch
from distill.models import build_model, count_parameters
from distill.models.sentence_encoders import EMBEDDING_TAP
from distill.recipe.schema import Recipe
from distill.runfolder import RunFolder
from distill.sources.generations import model_fingerprint
from distill.tasks.base import TASKS, Task, TaskSetup
from distill.tasks.embedding_eval import embed, label_metrics, mean_cosine, similarity_spearman
from distill.tasks.results import ExperimentResult, TeacherInfo
from distill.tasks.teacher_cache import (
    CacheSource,
    cache_teacher_info,
    dataset_fingerprint,
    open_recipe_cache,
)
from distill.tasks.teacher_store import load_weights
from distill.tasks.text_classification import LATENCY_BATCH, check_reads_tokens
from distill.teachers import CachedTeacher, FrozenTeacher, Teacher, TeacherOutputs, TeacherRequest

STUDENT_MODEL = "sentence_encoder"


class IndexedTexts(IndexedDataset):
    """The training texts with their sample ids (for the served embeddings) and token counts (the sampler
    batches texts of similar length)."""

    def __init__(self, base: Any) -> None:
        super().__init__(base)
        self.lengths = getattr(base, "lengths", None)


class EmbeddingTeacher(Teacher):
    """A frozen sentence embedder whose embeddings of the training texts were computed once: served by sample
    id when the objectives read only its output (`embedding` tap), else the live model runs."""

    kind = "embedding"

    def __init__(self, model: nn.Module, train_embeddings: Tensor) -> None:
        self.live = FrozenTeacher(model)
        self.table = train_embeddings
        self.served = False

    @property
    def module(self) -> nn.Module:
        return self.live.module

    def attach(
        self, device: Any, autocast: Callable[[], AbstractContextManager[Any]], layers: Sequence[str]
    ) -> None:
        self.served = set(layers) <= {EMBEDDING_TAP}
        if self.served:
            self.table = self.table.to(device)
        else:
            self.live.attach(device, autocast, layers)

    def skip_logits(self) -> None:
        if not self.served:
            self.live.skip_logits()

    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        if not self.served:
            return self.live.outputs(request)
        if request.index is None:
            raise UserError("the text-embedding teacher needs the batch's sample ids (an IndexedDataset)")
        rows = self.table[request.index.to(self.table.device)]
        # The output is the embedding: logit objectives (e.g. mse on outputs) read the same vectors.
        return TeacherOutputs(logits=rows, features={EMBEDDING_TAP: rows})

    def detach(self) -> None:
        self.live.detach()


class EmbeddingEvaluator:
    """A student's (or the teacher's) embeddings of the held-out and training texts, scored against the
    teacher's and with the labels (`distill.tasks.embedding_eval`)."""

    def __init__(self, data: TextClassificationData, teacher_test: Tensor | None, batch_size: int) -> None:
        self.train_ids, self.train_labels = data.train.tensors  # type: ignore[attr-defined]
        self.test_ids, self.test_labels = data.test.tensors  # type: ignore[attr-defined]
        self.classes, self.pad_id = data.num_classes, data.pad_id
        self.teacher_test = teacher_test
        self.batch_size = batch_size

    def __call__(self, model: nn.Module, teacher: nn.Module | None = None) -> dict[str, float]:
        test = embed(model, self.test_ids, self.pad_id, self.batch_size)
        train = embed(model, self.train_ids, self.pad_id, self.batch_size)
        return self.score(train, test)

    def score(self, train: Tensor, test: Tensor) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.teacher_test is not None and test.shape == self.teacher_test.shape:
            metrics["teacher_cosine"] = mean_cosine(test, self.teacher_test)
            metrics["spearman"] = similarity_spearman(test, self.teacher_test)
        metrics |= label_metrics(train, self.train_labels, test, self.test_labels, self.classes)
        metrics["accuracy"] = metrics["knn_accuracy"]  # the key `fit` picks its best epoch by
        return metrics


def text_data(recipe: Recipe) -> TextClassificationData:
    data = build_data(recipe.data.name, **recipe.data.params)
    if not isinstance(data, TextClassificationData):
        raise UserError(
            f"task 'text_embedding' reads texts (sms_spam, fortunes_topics, text_table), not "
            f"'{recipe.data.name}'"
        )
    return data


def build_teacher(recipe: Recipe, data: TextClassificationData) -> nn.Module:
    """The recipe's teacher model, at its own width (no projection), frozen."""
    spec = recipe.teacher
    assert spec is not None and spec.name is not None
    model = build_model(spec.name, num_classes=0, input_shape=data.input_shape, **spec.params)
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint, "teacher")
    check_reads_tokens(model, data, "teacher")
    return model.eval().requires_grad_(False)


def output_width(model: nn.Module, data: TextClassificationData) -> int:
    with torch.inference_mode():
        was_training = model.training
        model.eval()
        shape = model(data.test.tensors[0][:1]).shape  # type: ignore[attr-defined]
        model.train(was_training)
    if len(shape) != 2:
        raise UserError(
            f"task 'text_embedding': the model gives {tuple(shape[1:])} per text, not one embedding "
            f"(use model '{STUDENT_MODEL}')"
        )
    return int(shape[-1])


def teacher_embeddings(teacher: nn.Module, data: TextClassificationData, batch: int) -> dict[str, Tensor]:
    """The teacher's embeddings of the training and held-out texts, kept in the run cache
    (`$DISTILL_CACHE/embedding_teachers`) under a hash of its weights and of the token ids: a frozen teacher
    embeds the same texts the same way in every run and seed. An unreadable entry is made again."""
    key = fingerprint(
        {
            "teacher": model_fingerprint(teacher),
            "train": dataset_fingerprint(data.train),
            "test": dataset_fingerprint(data.test),
            "format": 1,
        }
    )
    path = cache_root() / "embedding_teachers" / f"{key}.safetensors"
    try:
        stored = load_tensors(path)
        if stored["train"].shape[0] == len(data.train) and stored["test"].shape[0] == len(data.test):
            return stored
    except Exception:  # noqa: BLE001 - absent, torn or foreign: computed again below
        pass
    table = {
        split: embed(teacher, getattr(data, split).tensors[0], data.pad_id, batch)
        for split in ("train", "test")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, table)
    return table


class TextEmbeddingTask(Task):
    name = "text_embedding"

    def claims(self, recipe: Recipe) -> bool:
        return recipe.student.name == STUDENT_MODEL

    def check(self, recipe: Recipe) -> None:
        super().check(recipe)
        if recipe.teacher is None:
            raise UserError(
                "task 'text_embedding' needs a teacher: a sentence embedder (teacher.name) or a teacher "
                "cache (teacher.cache)"
            )

    def prepare(self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console) -> TaskSetup:
        spec = recipe.teacher
        assert spec is not None
        data = text_data(recipe)
        teacher = build_teacher(recipe, data) if spec.name is not None else None
        console.print(f"[bold]{recipe.name}[/] -> {folder.path}\n{data.description}")
        started = time.perf_counter()
        batch = recipe.data.eval_batch_size
        table = teacher_embeddings(teacher, data, batch) if teacher is not None else None
        teacher_test = table["test"] if table is not None else None
        evaluator = EmbeddingEvaluator(data, teacher_test, batch)
        train_set = IndexedTexts(data.train)
        if spec.cache is not None:
            cache = open_recipe_cache(
                recipe, data=dataset_fingerprint(data.train), vocab=self._width(teacher)
            )
            setup = TaskSetup(data, train_set, CachedTeacher(cache), cache_teacher_info(cache))
            width = int(cache.manifest["vocab"])
        else:
            assert teacher is not None and table is not None
            train_embeddings = table["train"]
            metrics = evaluator.score(train_embeddings, teacher_test)  # type: ignore[arg-type]
            seconds = time.perf_counter() - started
            info = TeacherInfo("checkpoint", count_parameters(teacher), metrics, seconds, [])
            setup = TaskSetup(data, train_set, EmbeddingTeacher(teacher, train_embeddings), info)
            width = int(train_embeddings.shape[-1])
        setup.bare_teacher = teacher
        setup.fit_settings = {"evaluator": evaluator}
        setup.extra = {"width": width, "teacher_seconds": time.perf_counter() - started}
        student = self.build_student(recipe, setup)  # refused now, before the run folder appears
        check_reads_tokens(student, data, "student")
        got = output_width(student, data)
        if got != width:
            raise UserError(
                f"the student embeds into {got} dimensions, the teacher into {width}; leave "
                "student.params.projection out (a projection to the teacher's width) or set it to "
                f"{width}"
            )
        return setup

    @staticmethod
    def _width(teacher: nn.Module | None) -> int | None:
        return int(teacher.width) if teacher is not None and hasattr(teacher, "width") else None

    def build_student(self, recipe: Recipe, setup: TaskSetup) -> nn.Module:
        spec = recipe.student
        width = int(setup.extra.get("width", 0))
        student = build_model(spec.name, num_classes=width, input_shape=setup.data.input_shape, **spec.params)
        if spec.checkpoint is not None:
            load_weights(student, spec.checkpoint, "student")
        return student

    def cache_source(
        self, recipe: Recipe, folder: RunFolder, *, progress: bool, console: Console
    ) -> CacheSource:
        if recipe.teacher is None or recipe.teacher.name is None:
            raise UserError("distill cache needs a recipe whose teacher is a model (teacher.name)")
        data = text_data(recipe)
        teacher = build_teacher(recipe, data)
        width = output_width(teacher, data)
        info = TeacherInfo("checkpoint", count_parameters(teacher), {}, 0.0, [])
        # The "logits" a classification cache stores are the embedding's entries; `--hidden embedding`
        # stores the embeddings themselves, which is what the objectives read.
        return CacheSource(
            data.train, teacher, info, "classification", width, dataset_fingerprint(data.train), None
        )

    def describe(self, metrics: dict[str, float]) -> str:
        parts = []
        if "teacher_cosine" in metrics:
            parts.append(f"cosine to teacher {metrics['teacher_cosine']:.4f}")
            parts.append(f"Spearman {metrics['spearman']:.4f}")
        if "knn_f1" in metrics:
            parts.append(f"k-NN F1 {metrics['knn_f1']:.4f}, probe F1 {metrics['probe_f1']:.4f}")
        return ", ".join(parts) or "not evaluated"

    def latency(self, recipe: Recipe, setup: TaskSetup, student: nn.Module) -> dict[str, float]:
        """Median CPU seconds per forward pass at batch 1 and batch 64, for student and teacher."""
        if not recipe.evaluation.latency:
            return {}
        ids = setup.data.test.tensors[0][:LATENCY_BATCH]
        measured = {"batch": float(len(ids))}
        models = {"student": student.cpu()}
        if setup.bare_teacher is not None:
            models["teacher"] = setup.bare_teacher.cpu()
        for role, model in models.items():
            with torch.inference_mode():
                measured[role] = latency_per_batch(model, ids)
                measured[f"{role}_b1"] = latency_per_batch(model, ids[:1])
        return measured

    def result_extra(self, setup: TaskSetup) -> dict[str, Any]:
        return {"width": setup.extra.get("width"), "teacher_seconds": setup.extra.get("teacher_seconds")}

    def write_report(self, result: ExperimentResult) -> Path:
        from distill.tasks.text_embedding_report import write_embedding_report

        return write_embedding_report(result)

    def print_table(self, result: ExperimentResult, console: Console) -> None:
        from distill.tasks.text_embedding_report import print_embedding_table

        print_embedding_table(result, console)


TASKS.add(
    "text_embedding",
    TextEmbeddingTask,
    summary="sentence embedders from Hugging Face encoders, no head (cosine / Spearman to the teacher, "
    "k-NN and probe F1)",
)
