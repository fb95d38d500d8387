"""The vision benchmark's results: per data set, one row per method (mean ± std over seeds, the gain over the
student alone and whether it is beyond the seed-to-seed spread), as `results.md`, `results.json` and a
terminal table."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from distill.bench.methods import Setting
from distill.experiment import ExperimentResult, MethodRuns
from distill.recipe.schema import Recipe
from distill.tables import gain_and_spread, markdown_table, mean_std, noise_verdict, objective_text, pm


@dataclass
class DatasetResult:
    recipe: Recipe
    experiment: ExperimentResult
    methods: list[tuple[str, Setting]]


@dataclass
class BenchResult:
    suite: str
    out_dir: Path
    command: str
    datasets: list[DatasetResult]
    skipped: dict[str, str]
    wall_seconds: float


@dataclass
class Row:
    key: str
    label: str
    source: str
    objectives: list[dict[str, Any]]
    accuracy: list[float]  # last epoch, one per seed
    best_accuracy: list[float]
    agreement: list[float]
    ece: list[float]
    wall_seconds: list[float]
    seeds: list[int]


def _row(runs: MethodRuns, key: str, setting: Setting) -> Row:
    def column(metric: str, best: bool = False) -> list[float]:
        found = [(r.result.best if best else r.result.final).get(metric) for r in runs.runs]
        return [float(v) for v in found if v is not None]

    return Row(
        key,
        runs.name,
        setting.source,
        runs.objectives,
        column("accuracy"),
        column("accuracy", best=True),
        column("agreement"),
        column("ece"),
        [r.wall_seconds or r.result.train_seconds for r in runs.runs],
        [r.seed for r in runs.runs],
    )


def dataset_rows(dataset: DatasetResult) -> list[Row]:
    """One row per method, in the order they ran (the first is the student alone)."""
    settings = {s.label: (key, s) for key, s in dataset.methods}
    return [_row(runs, *settings[runs.name]) for runs in dataset.experiment.methods]


def gain_vs_alone(row: Row, base: Row) -> tuple[float, float]:
    """(last-epoch accuracy gain over `base`, spread = the sum of the two standard deviations), in points."""
    return gain_and_spread(row.accuracy, base.accuracy, 100)


HEADERS = [
    "method",
    "top-1 % (last)",
    "top-1 % (best epoch)",
    "gain vs alone (last)",
    "vs student alone",
    "agree %",
    "ECE %",
    "wall s / run",
]

LEGEND = (
    "- Every cell is mean ± standard deviation over the seeds, on the test split. 'last' is the final "
    "epoch (the headline rule); 'best epoch' picks each seed's epoch of best test accuracy and is "
    "optimistic. 'gain vs alone' is the last-epoch difference to the student alone in points, 'spread' the "
    "sum of the two standard deviations over seeds (the method's and the student alone's); 'vs student "
    "alone' is 'better' when the gain exceeds the spread, 'worse' when the loss exceeds it (gain below "
    "minus the spread), 'within noise' otherwise. 'agree %' is top-1 agreement with the teacher; ECE uses "
    "15 bins; 'wall s / run' is one seed's whole fit (training, evaluation, checkpoints).\n"
)


def table_rows(dataset: DatasetResult) -> list[list[str]]:
    experiment = dataset.experiment
    rows: list[list[str]] = []
    teacher = experiment.teacher
    if teacher is not None and teacher.metrics:
        m = teacher.metrics
        ece = f"{100 * m['ece']:.2f}" if "ece" in m else "-"
        rows.append(
            ["teacher", f"{100 * m['accuracy']:.2f}", "-", "-", "-", "-", ece]
            + [f"{teacher.train_seconds:.1f} (training)"]
        )
    method_rows = dataset_rows(dataset)
    base = method_rows[0] if method_rows else None
    for row in method_rows:
        if base is not None and row is not base:
            gain, spread = gain_vs_alone(row, base)
            gain_text, verdict = f"{gain:+.2f} (spread {spread:.2f})", noise_verdict(gain, spread)
        else:
            gain_text, verdict = "-", "-"
        rows.append(
            [row.label, pm(row.accuracy, 100), pm(row.best_accuracy, 100), gain_text, verdict]
            + [pm(row.agreement, 100), pm(row.ece, 100), pm(row.wall_seconds, 1, 1)]
        )
    return rows


def kd_sentence(dataset: DatasetResult) -> str:
    """The line under a data set's table: KD against the student alone, with the verdict."""
    rows = dataset_rows(dataset)
    kd = next((r for r in rows if r.key == "hinton_kd"), None)
    if kd is None or not rows or rows[0] is kd:
        return ""
    gain, spread = gain_vs_alone(kd, rows[0])
    return (
        f"KD vs student alone (last epoch): {gain:+.2f} points, spread {spread:.2f} (the sum of the two "
        f"standard deviations): {noise_verdict(gain, spread)}.\n"
    )


def _environment() -> str:
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"torch {torch.__version__}, {device}, {threads} torch thread(s), Python {platform.python_version()}"
    )


def results_markdown(result: BenchResult) -> str:
    parts = [
        f"# Vision distillation benchmark: `{result.suite}` suite\n\n",
        f"```sh\n{result.command}\n```\n\n",
        f"- Run on {datetime.now().strftime('%Y-%m-%d')}; {_environment()}; whole suite "
        f"{result.wall_seconds / 60:.1f} min wall time.\n",
        LEGEND,
        "- Teacher logits are memoised across runs (the teacher is frozen and the data un-augmented, so "
        "each image's logits are computed once and reused): wall times exclude repeated teacher passes; "
        "feature rows (FitNet, AT, SP, PKT, RKD, FSP, CRD, ACAM-KD, TRG) read the teacher's modules and run "
        "it at every step.\n"
        if any(not d.recipe.data.params.get("augment") for d in result.datasets)
        else "",
        "\n![accuracy per method](accuracy.png)\n\n![learning curves](learning_curves.png)\n",
    ]
    for dataset in result.datasets:
        recipe, experiment = dataset.recipe, dataset.experiment
        teacher = recipe.teacher
        parts.append(f"\n## {recipe.name}\n\n{recipe.description}\n\n")
        parts.append(f"- Data: {experiment.data.description}.\n")
        if teacher is not None and experiment.teacher is not None:
            source = {"trained": "trained in this run", "cache": "from the run cache"}.get(
                experiment.teacher.source, "from its checkpoint"
            )
            parts.append(
                f"- Teacher: `{teacher.name}` {teacher.params or ''}, "
                f"{experiment.teacher.parameters:,} parameters, {teacher.train.epochs} epochs, {source}.\n"
            )
        parts.append(
            f"- Student: `{recipe.student.name}` {recipe.student.params or ''}, "
            f"{experiment.student_parameters:,} parameters; {recipe.trainer.epochs} epochs, "
            f"{recipe.optimizer.name} lr {recipe.optimizer.lr:g}, {recipe.schedule.name} schedule, "
            f"batch {recipe.data.batch_size}; seeds {', '.join(map(str, recipe.seeds))}.\n"
        )
        parts.append(f"- Per-run reports: `{recipe.name}/report.md`.\n\n")
        parts.append(markdown_table(HEADERS, table_rows(dataset)))
        parts.append("\n" + kd_sentence(dataset))
    parts.append("\n## Methods\n\nObjectives per method, and where the settings come from:\n\n")
    first = result.datasets[0] if result.datasets else None
    if first is not None:
        objectives = {m.name: m.objectives for m in first.experiment.methods}
        for key, setting in first.methods:
            terms = " + ".join(objective_text(o) for o in objectives.get(setting.label, []))
            parts.append(f"- **{setting.label}** (`{key}`): {terms}. {setting.source}.\n")
    if result.skipped:
        parts.append("\nRegistered objectives not run (not classification distillation methods):\n\n")
        parts += [f"- `{name}`: {reason}\n" for name, reason in result.skipped.items()]
    return "".join(parts)


def results_document(result: BenchResult) -> dict[str, Any]:
    def summary(values: list[float]) -> dict[str, float]:
        mean, std = mean_std(values)
        return {"mean": mean, "std": std}

    datasets = []
    for dataset in result.datasets:
        experiment = dataset.experiment
        rows = dataset_rows(dataset)
        base = rows[0] if rows else None
        datasets.append(
            {
                "recipe": dataset.recipe.name,
                "data": experiment.data.description,
                "run_dir": str(experiment.out_dir),
                "teacher": None
                if experiment.teacher is None
                else {
                    "name": dataset.recipe.teacher.name if dataset.recipe.teacher else None,
                    "parameters": experiment.teacher.parameters,
                    "source": experiment.teacher.source,
                    "metrics": experiment.teacher.metrics,
                    "train_seconds": experiment.teacher.train_seconds,
                },
                "student": {"name": dataset.recipe.student.name, "parameters": experiment.student_parameters},
                "epochs": dataset.recipe.trainer.epochs,
                "seeds": dataset.recipe.seeds,
                "wall_seconds": experiment.wall_seconds,
                "methods": [
                    {
                        "key": row.key,
                        "name": row.label,
                        "source": row.source,
                        "objectives": row.objectives,
                        "accuracy_last": summary(row.accuracy),
                        "accuracy_best_epoch": summary(row.best_accuracy),
                        "gain_vs_alone": None if base is None or row is base else _gain_document(row, base),
                        "agreement": summary(row.agreement),
                        "ece": summary(row.ece),
                        "wall_seconds": summary(row.wall_seconds),
                        "per_seed": [
                            {
                                "seed": seed,
                                "accuracy_last": acc,
                                "accuracy_best_epoch": best,
                                "agreement": agree,
                                "ece": ece,
                                "wall_seconds": wall,
                            }
                            for seed, acc, best, agree, ece, wall in zip(
                                row.seeds,
                                row.accuracy,
                                row.best_accuracy,
                                row.agreement or [None] * len(row.seeds),
                                row.ece,
                                row.wall_seconds,
                                strict=False,
                            )
                        ],
                    }
                    for row in rows
                ],
            }
        )
    return {
        "suite": result.suite,
        "command": result.command,
        "environment": _environment(),
        "rule": "last epoch (best epoch reported beside it)",
        "wall_seconds": result.wall_seconds,
        "datasets": datasets,
        "skipped_objectives": result.skipped,
    }


def _gain_document(row: Row, base: Row) -> dict[str, Any]:
    gain, spread = gain_vs_alone(row, base)
    return {"points": gain, "spread": spread, "verdict": noise_verdict(gain, spread)}
