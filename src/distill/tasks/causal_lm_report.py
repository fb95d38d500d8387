"""The report of a language-model run: per-token metrics on the held-out split (mean ± std over seeds),
exact match for tasks with answers, tokens per second, and a few greedy samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from distill.io import atomic_write_json, atomic_write_text
from distill.tables import markdown_table, objective_text, pm, rich_table
from distill.tasks.report_common import metrics_document, plot_learning_curves, teacher_line
from distill.tasks.results import ExperimentResult


def _values(result: ExperimentResult, method: int, key: str) -> list[float]:
    return [r.result.final[key] for r in result.methods[method].runs if key in r.result.final]


def _has(result: ExperimentResult, key: str) -> bool:
    return any(key in r.result.final for m in result.methods for r in m.runs)


def headers(result: ExperimentResult) -> list[str]:
    columns = ["method", "trainable params", "val ppl", "val CE (nats)", "token acc %", "KL(T‖S)", "agree %"]
    if _has(result, "exact_match"):
        columns.append("exact match %")
    return [*columns, "train tok/s", "train s"]


def summary_rows(result: ExperimentResult) -> list[list[str]]:
    answers = _has(result, "exact_match")
    rows = []
    if result.teacher is not None and result.teacher.metrics:
        m = result.teacher.metrics
        row = [
            "teacher",
            f"{result.teacher.parameters:,}",
            f"{m['perplexity']:.2f}",
            f"{m['loss']:.3f}",
            f"{100 * m['accuracy']:.2f}",
            "-",
            "-",
        ]
        if answers:
            row.append(f"{100 * m['exact_match']:.2f}" if "exact_match" in m else "-")
        rows.append([*row, "-", f"{result.teacher.train_seconds:.1f}"])
    for index, runs in enumerate(result.methods):
        row = [
            runs.name,
            f"{result.student_parameters:,}",
            pm(_values(result, index, "perplexity")),
            pm(_values(result, index, "loss"), 1, 3),
            pm(_values(result, index, "accuracy"), 100),
            pm(_values(result, index, "teacher_kl"), 1, 3),
            pm(_values(result, index, "agreement"), 100),
        ]
        if answers:
            row.append(pm(_values(result, index, "exact_match"), 100))
        row += [
            pm(_values(result, index, "tokens_per_second"), 1, 0),
            pm([r.result.train_seconds for r in runs.runs], 1, 1),
        ]
        rows.append(row)
    return rows


def _samples_text(samples: dict[str, list[dict[str, str]]]) -> str:
    lines = []
    for method, items in samples.items():
        lines.append(f"\n**{method}** (last seed, greedy):\n")
        for item in items:
            lines.append(
                f"- prompt `{_one_line(item['prompt'])}` -> `{_one_line(item['generated'])}` "
                f"(reference `{_one_line(item['reference'])}`)"
            )
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def write_lm_report(result: ExperimentResult) -> Path:
    recipe = result.recipe
    out = result.out_dir
    plot = plot_learning_curves(result, out / "learning_curves.png")
    teacher = teacher_line(result)
    generations = "".join(
        f"- {name}: teacher generations {'reused from the cache' if g['cached'] else 'made now'} "
        f"({g['seconds']:.1f} s), `{g['path']}`.\n"
        for name, g in result.extra.get("generations", {}).items()
    )
    text = (
        f"# {recipe.name}\n\n{recipe.description}\n\n"
        f"- Data: {result.data.description}.\n"
        f"{teacher}"
        f"- Student: `{recipe.student.name}` {recipe.student.params}, {result.student_parameters:,} "
        f"trainable parameters.\n"
        f"- Seeds: {', '.join(map(str, recipe.seeds))}; every cell is mean ± standard deviation over seeds "
        f"at the last epoch, per counted token of the held-out split (perplexity = exp(CE)).\n"
        f"{generations}"
        f"- Wall time of the whole run: {result.wall_seconds:.1f} s.\n\n"
        + markdown_table(headers(result), summary_rows(result))
        + "\nObjectives per method:\n\n"
        + "".join(
            f"- {m.name}: " + ", ".join(objective_text(o) for o in m.objectives) + "\n"
            for m in result.methods
        )
        + "\n## Samples\n"
        + _samples_text(result.extra.get("samples", {}))
        + (f"\n![learning curves]({plot.name})\n" if plot else "")
    )
    atomic_write_text(out / "report.md", text)
    document: dict[str, Any] = metrics_document(result)
    document["task"] = "lm"
    document["samples"] = result.extra.get("samples", {})
    atomic_write_json(out / "metrics.json", document)
    return out / "report.md"


def print_lm_table(result: ExperimentResult, console: Console) -> None:
    title = f"{result.recipe.name}: {len(result.recipe.seeds)} seeds, held-out tokens"
    console.print(rich_table(title, headers(result), summary_rows(result)))
