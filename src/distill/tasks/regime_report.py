"""What a report says about methods whose teacher came from a regime (`distill.tasks.regimes`): each
ensemble's members and the ensemble on the test split, and each self-distillation generation's label weight
and accuracy over seeds."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from distill.tables import markdown_table, pm
from distill.tasks.results import ExperimentResult, MethodRuns


def regime_text(method: MethodRuns) -> str:
    """The method's teacher regime in a few words ('' for the recipe's teacher)."""
    if method.teacher is not None:
        return f" (teacher: ensemble of {len(method.teacher.members)})"
    generations = method.runs[0].extra.get("generations") if method.runs else None
    return f" (teacher: self-distillation, {len(generations)} generations)" if generations else ""


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def ensemble_section(method: MethodRuns) -> str:
    info = method.teacher
    rows = [
        [member["name"], member["source"], _percent(member["metrics"].get("accuracy"))]
        for member in info.members
    ]
    rows.append(["ensemble", f"{info.parameters:,} parameters", _percent(info.metrics.get("accuracy"))])
    return f"\nTeacher of {method.name} (test split):\n\n" + markdown_table(
        ["teacher", "source", "acc %"], rows
    )


def generations_section(method: MethodRuns) -> str:
    per_seed = [run.extra["generations"] for run in method.runs]
    rows = []
    for index, generation in enumerate(per_seed[0]):
        alphas = [seed[index]["alpha"] for seed in per_seed]
        accuracy = [seed[index]["metrics"].get("accuracy", float("nan")) for seed in per_seed]
        alpha = "labels only" if alphas[0] is None else pm(alphas, 1, 3)
        rows.append([str(generation["generation"]), alpha, pm(accuracy, 100)])
    return f"\nGenerations of {method.name} (mean ± std over seeds):\n\n" + markdown_table(
        ["generation", "alpha (label weight)", "acc % (last)"], rows
    )


def regime_sections(result: ExperimentResult) -> str:
    parts = []
    for method in result.methods:
        if method.teacher is not None:
            parts.append(ensemble_section(method))
        elif method.runs and method.runs[0].extra.get("generations"):
            parts.append(generations_section(method))
    return "".join(parts)


def regime_document(method: MethodRuns) -> dict[str, Any]:
    """metrics.json's record of the method's regime (empty for the recipe's teacher)."""
    out: dict[str, Any] = {}
    if method.teacher is not None:
        out["ensemble"] = asdict(method.teacher)
    generations = [run.extra["generations"] for run in method.runs if "generations" in run.extra]
    if generations:
        out["generations"] = generations
    return out
