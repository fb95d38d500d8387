"""Text classification with encoders: labelled texts (`distill.data.text_classification`) tokenised once,
Hugging Face encoder teachers and students (`hf_encoder`, `distill.models.encoders`).

It is the classification task with three differences: the teacher and student must read the data's token
ids (same tokenizer: vocabulary and pad id are checked before anything trains); the report's headline is
macro F1 beside accuracy (labels are imbalanced: 13% spam); latency is measured at batch 1 and batch 64.
Teacher training, caching, `--resume`, feature objectives and the 2-process run are the classification
task's, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from distill.data import DataSplits
from distill.data.text_classification import TEXT_DATASETS, TextClassificationData
from distill.errors import UserError
from distill.metrics import latency_per_batch
from distill.recipe.schema import Recipe
from distill.tasks.base import TASKS, TaskSetup
from distill.tasks.classification import ClassificationTask, build_recipe_model
from distill.tasks.results import ExperimentResult

LATENCY_BATCH = 64


def embedding_rows(model: nn.Module) -> int | None:
    embeddings = getattr(model, "get_input_embeddings", None)
    inner = getattr(model, "encoder", None)
    if embeddings is None and inner is not None:
        embeddings = getattr(inner, "get_input_embeddings", None)
    if not callable(embeddings):
        return None
    layer = embeddings()
    return int(layer.num_embeddings) if isinstance(layer, nn.Embedding) else None


def check_reads_tokens(model: nn.Module, data: TextClassificationData, role: str) -> None:
    """The model embeds every token id of the data and pads as the tokenizer does, else one line."""
    rows = embedding_rows(model)
    largest = max(int(data.train.tensors[0].max()), int(data.test.tensors[0].max()))  # type: ignore[attr-defined]
    if rows is not None and largest >= rows:
        raise UserError(
            f"vocabulary mismatch: the {role} embeds {rows} tokens but the data's tokenizer "
            f"({data.tokenizer}) gives ids up to {largest}; "
            f"use the {role}'s tokenizer (data.params.tokenizer)"
        )
    pad = getattr(model, "pad_id", None)
    if pad is not None and pad != data.pad_id:
        raise UserError(
            f"the {role} pads with token {pad} but the data's tokenizer pads with {data.pad_id}; "
            f"use the {role}'s tokenizer (data.params.tokenizer)"
        )


class TextClassificationTask(ClassificationTask):
    name = "text_classification"
    # Token ids cannot be mixed: mixup / cutmix are refused (Task.check); the selections are served.
    classifier_sources = ("llkd", "random_subset", "kd3")

    def claims(self, recipe: Recipe) -> bool:
        return recipe.data.name in TEXT_DATASETS

    def check_models(self, recipe: Recipe, data: DataSplits, student: nn.Module) -> None:
        if not isinstance(data, TextClassificationData):
            return
        check_reads_tokens(student, data, "student")
        if recipe.teacher is not None and recipe.teacher.cache is None:
            check_reads_tokens(build_recipe_model(recipe.teacher, data, "teacher"), data, "teacher")

    def latency(self, recipe: Recipe, setup: TaskSetup, student: nn.Module) -> dict[str, float]:
        """Median CPU seconds per forward pass at batch 1 and batch 64, for student and teacher."""
        if not recipe.evaluation.latency:
            return {}
        test = setup.data.test
        batch = torch.stack([test[i][0] for i in range(min(len(test), LATENCY_BATCH))])
        measured = {"batch": float(len(batch))}
        models = {"student": student.cpu()}
        if setup.bare_teacher is not None:
            models["teacher"] = setup.bare_teacher.cpu()
        for role, model in models.items():
            measured[role] = latency_per_batch(model, batch)
            measured[f"{role}_b1"] = latency_per_batch(model, batch[:1])
        return measured

    def write_report(self, result: ExperimentResult) -> Path:
        from distill.tasks.classification_report import write_classification_report

        return write_classification_report(result, f1=True)

    def print_table(self, result: ExperimentResult, console: Console) -> None:
        from distill.tasks.classification_report import print_classification_table

        print_classification_table(result, console, f1=True)

    def describe(self, metrics: dict[str, float]) -> str:
        if "f1" not in metrics:
            return super().describe(metrics)
        return f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1']:.4f}"


TASKS.add(
    "text_classification",
    TextClassificationTask,
    summary="text classifiers from Hugging Face encoders (macro F1, agreement, ECE, latency at batch 1 / 64)",
)
