"""The report of a language-model run: per-token metrics on the held-out split (mean ± std over seeds),
exact match for tasks with answers, tokens per second, each method against the first (gain against the seed
spread), learning curves by optimizer step (training objective, held-out perplexity), and a few greedy
samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from distill.io import atomic_write_json, atomic_write_text
from distill.tables import markdown_table, objective_text, pm, rich_table
from distill.tasks.report_common import (
    gain_lines,
    logged_rows,
    method_values,
    metrics_document,
    teacher_line,
    teacher_time_cell,
    teacher_time_note,
)
from distill.tasks.results import ExperimentResult
from distill.train import FitResult

Points = list[tuple[int, float]]  # (optimizer step, value)


def _values(result: ExperimentResult, method: int, key: str) -> list[float]:
    return method_values(result.methods[method], key)


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
        rows.append([*row, "-", teacher_time_cell(result.teacher)])
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


def _table_note(result: ExperimentResult) -> str:
    """Under the table: why the teacher row has '-' cells, and no time of this run when it has none."""
    if result.teacher is None or not result.teacher.metrics:
        return ""
    time = teacher_time_note(result.teacher)
    return (
        "The teacher row has no KL, agreement or tokens per second ('-': measured for students)"
        + (f"; {time}" if time else "")
        + "."
    )


def _gain_sentences(result: ExperimentResult) -> str:
    """Each method against the first on perplexity (lower is better) and, for tasks with answers, exact
    match: better, worse, or within the spread of the seeds."""
    text = gain_lines(result, "perplexity", "perplexity (lower is better)", lower_is_better=True)
    if _has(result, "exact_match"):
        text += gain_lines(result, "exact_match", "points of exact match", scale=100)
    return text


# ------------------------------------------------------------------------------------------ curves


def _train_points(fit: FitResult) -> Points:
    """The training objective by optimizer step: the logged training rows (every `log_every` steps), or,
    for a run too short to log one, each epoch's mean."""
    logged = [
        (row["step"], float(row["loss"])) for row in logged_rows(fit.run_dir) if row.get("kind") == "train"
    ]
    if logged:
        return logged
    return [(row["step"], float(row["train_loss"])) for row in fit.history if "train_loss" in row]


def _eval_points(fit: FitResult, key: str) -> Points:
    return [(row["step"], float(row[key])) for row in fit.history if key in row]


def _band(ax: Any, seeds: list[Points], label: str) -> float | None:
    """Mean ± one standard deviation over seeds at the steps every seed has; markers when there are few
    points (a one-epoch run evaluates once). Returns the lowest mean drawn (None: nothing to draw)."""
    import numpy as np

    if not seeds or not all(seeds):
        return None
    steps = sorted(set.intersection(*(set(dict(points)) for points in seeds)))
    if not steps:
        return None
    values = np.array([[dict(points)[step] for step in steps] for points in seeds])
    mean, std = values.mean(0), values.std(0)
    (line,) = ax.plot(steps, mean, marker="o" if len(steps) <= 20 else None, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    return float(mean.min())


def plot_lm_curves(result: ExperimentResult, path: Path) -> Path:
    """Training objective and held-out perplexity by optimizer step, per method (mean ± std over seeds), the
    teacher's perplexity as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    # One step axis for both: a run's single evaluation sits where its training ended.
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    lowest = []
    for runs in result.methods:
        fits = [r.result for r in runs.runs]
        lowest.append(_band(ax_loss, [_train_points(fit) for fit in fits], runs.name))
        _band(ax_ppl, [_eval_points(fit, "perplexity") for fit in fits], runs.name)
    teacher = result.teacher.metrics if result.teacher is not None else {}
    if "perplexity" in teacher:
        ax_ppl.axhline(teacher["perplexity"], color="black", ls="--", lw=1, label="teacher")
    ax_loss.set(
        xlabel="optimizer step", ylabel="training objective", title="Training objective (weighted sum)"
    )
    ax_ppl.set(
        xlabel="optimizer step", ylabel="perplexity", title="Held-out perplexity (mean ± std over seeds)"
    )
    drawn = [value for value in lowest if value is not None]
    # Log scales while positive (perplexity always is; some objectives go below zero).
    ax_loss.set_yscale("log" if drawn and min(drawn) > 0 else "symlog")
    ax_ppl.set_yscale("log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # 9, not 9 x 10^0, on the log scales
    if ax_ppl.get_legend_handles_labels()[0]:
        ax_ppl.legend(loc="best")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ the report


def write_lm_report(result: ExperimentResult) -> Path:
    recipe = result.recipe
    out = result.out_dir
    plot = plot_lm_curves(result, out / "learning_curves.png")
    teacher = teacher_line(result)
    note, gains = _table_note(result), _gain_sentences(result)
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
        f"at the last evaluation, per counted token of the held-out split (perplexity = exp(CE)).\n"
        f"{generations}"
        f"- Wall time of the whole run: {result.wall_seconds:.1f} s.\n\n"
        + markdown_table(headers(result), summary_rows(result))
        + (f"\n{note}\n" if note else "")
        + (f"\n{gains}" if gains else "")
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
    note = _table_note(result)
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
