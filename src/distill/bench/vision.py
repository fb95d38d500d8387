"""`distill bench vision`: image-classification distillation over methods x seeds, one recipe per data set.

A suite is a list of recipes shipped with the package (`distill/recipes/bench_vision_*.yaml`). Each recipe
fixes the data, teacher, student, optimiser and schedule; the benchmark replaces its `methods` with every
logit objective registered at run time (`distill.bench.methods`), runs it through `run_recipe` (the same
path as `distill run`, so each data set also gets its own report.md and metrics.json in a sub-folder), and
aggregates the data sets into `results.md`, `results.json`, `accuracy.png` and `learning_curves.png`.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from distill.bench.memo import MemoizedTeacher
from distill.bench.methods import Setting, method_spec, select_methods, skipped_objectives
from distill.errors import UserError
from distill.experiment import ExperimentResult, MethodRuns, run_recipe
from distill.io import atomic_write_json, atomic_write_text
from distill.recipe.check import check_recipe
from distill.recipe.load import builtin_recipe_text, parse_yaml, recipe_from_dict
from distill.recipe.schema import Recipe
from distill.registry import nearest
from distill.report import mean_std, rich_table, write_report
from distill.runfolder import holds_run

SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("bench_vision_quick_digits", "bench_vision_quick_mnist"),
    "standard": ("bench_vision_standard_fashion_mnist", "bench_vision_standard_cifar10"),
    "cifar100": ("bench_vision_cifar100",),
}
RESULT_FILES = ("results.md", "results.json")


# ------------------------------------------------------------------------------------------ suite recipes


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["trainer.epochs=2", "data.params.root=/x"]` -> a nested dict (values read as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. trainer.epochs=2")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise UserError(f"--set {item!r}: value is not valid YAML ({err})") from err
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: '{part}' is given both as a value and as a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def suite_recipe_names(suite: str) -> tuple[str, ...]:
    if suite not in SUITES:
        hint = nearest(suite, list(SUITES))
        raise UserError(
            f"--suite: unknown suite '{suite}'"
            + (f"; did you mean '{hint}'?" if hint else f"; known: {', '.join(SUITES)}")
        )
    return SUITES[suite]


def suite_recipes(
    suite: str,
    *,
    seeds: int | None = None,
    methods: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[tuple[Recipe, list[tuple[str, Setting]]]]:
    """The suite's recipes, each with the benchmark's methods, `seeds` (0..N-1) and `overrides` applied."""
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds: need at least 1, got {seeds}")
    chosen = select_methods(methods)
    out = []
    for name in suite_recipe_names(suite):
        data = parse_yaml(builtin_recipe_text(name), name)
        data = merge(data, overrides or {})
        recipe = recipe_from_dict(data, name)
        epochs = recipe.trainer.epochs
        recipe.methods = [method_spec(setting, epochs) for _, setting in chosen]
        recipe.objectives = None
        if seeds is not None:
            recipe.seeds = list(range(seeds))
        recipe = recipe_from_dict(recipe.model_dump(mode="json"), name)  # validate the result again
        check_recipe(recipe, name)
        out.append((recipe, chosen))
    return out


# -------------------------------------------------------------------------------------------- the runs


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


def _default_out(suite: str) -> Path:
    return Path("runs") / f"bench-vision-{suite}" / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_vision_bench(
    suite: str = "quick",
    *,
    out: Path | None = None,
    seeds: int | None = None,
    methods: list[str] | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    memoize_teacher: bool = True,
    progress: bool = False,
    console: Console | None = None,
    command: str = "",
) -> BenchResult:
    """Run every recipe of `suite` (methods x seeds) and write the aggregate results into `out`."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    recipes = suite_recipes(suite, seeds=seeds, methods=methods, overrides=overrides)
    out_dir = Path(out) if out is not None else _default_out(suite)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} is a file")
    earlier = [f for f in RESULT_FILES if (out_dir / f).exists()] + [
        r.name for r, _ in recipes if holds_run(out_dir / r.name)
    ]
    if earlier and not resume:
        raise UserError(
            f"output folder {out_dir} holds an earlier benchmark ({earlier[0]}); pass --resume to continue "
            "it or choose another --out"
        )
    datasets = []
    for recipe, chosen in recipes:
        folder = out_dir / recipe.name
        augmented = bool(recipe.data.params.get("augment", False))
        wrapper = MemoizedTeacher if memoize_teacher and not augmented else None
        experiment = run_recipe(
            recipe,
            out=folder,
            resume=resume and holds_run(folder),
            progress=progress,
            console=console,
            teacher_wrapper=wrapper,
        )
        write_report(experiment)
        datasets.append(DatasetResult(recipe, experiment, chosen))
    result = BenchResult(
        suite,
        out_dir,
        command or f"distill bench vision --suite {suite}",
        datasets,
        skipped_objectives(),
        time.perf_counter() - started,
    )
    write_results(result)
    return result


# ------------------------------------------------------------------------------------------ aggregation


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


def _rows(dataset: DatasetResult) -> list[Row]:
    settings = {s.label: (key, s) for key, s in dataset.methods}
    rows = []
    for runs in dataset.experiment.methods:
        key, setting = settings[runs.name]
        rows.append(_row(runs, key, setting))
    return rows


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


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _gain(row: Row, base: Row) -> tuple[float, float]:
    mean, std = mean_std(row.accuracy)
    base_mean, base_std = mean_std(base.accuracy)
    return 100 * (mean - base_mean), 100 * (std + base_std)


HEADERS = [
    "method",
    "top-1 % (last)",
    "top-1 % (best epoch)",
    "gain vs alone (last)",
    "gain > spread?",
    "agree %",
    "ECE %",
    "wall s / run",
]


def table_rows(dataset: DatasetResult) -> list[list[str]]:
    experiment = dataset.experiment
    rows: list[list[str]] = []
    teacher = experiment.teacher
    if teacher is not None and teacher.metrics:
        m = teacher.metrics
        rows.append(
            [
                "teacher",
                f"{100 * m['accuracy']:.2f}",
                "-",
                "-",
                "-",
                "-",
                f"{100 * m['ece']:.2f}" if "ece" in m else "-",
                f"{teacher.train_seconds:.1f} (training)",
            ]
        )
    method_rows = _rows(dataset)
    base = method_rows[0] if method_rows else None
    for row in method_rows:
        if base is not None and row is not base:
            gain, spread = _gain(row, base)
            gain_text, verdict = f"{gain:+.2f} (spread {spread:.2f})", "yes" if abs(gain) > spread else "no"
        else:
            gain_text, verdict = "-", "-"
        rows.append(
            [
                row.label,
                _pm(row.accuracy),
                _pm(row.best_accuracy),
                gain_text,
                verdict,
                _pm(row.agreement),
                _pm(row.ece),
                _pm(row.wall_seconds, 1.0, 1),
            ]
        )
    return rows


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _objective_text(objective: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in objective["params"].items())
    text = f"{objective['weight']:g} x {objective['name']}" + (f"({params})" if params else "")
    if objective.get("warmup_epochs"):
        text += f", weight warm-up {objective['warmup_epochs']:g} epochs"
    return text


def _kd_sentence(dataset: DatasetResult) -> str:
    rows = _rows(dataset)
    kd = next((r for r in rows if r.key == "hinton_kd"), None)
    if kd is None or not rows or rows[0] is kd:
        return ""
    gain, spread = _gain(kd, rows[0])
    verdict = "is larger than" if abs(gain) > spread else "is NOT larger than"
    return (
        f"KD vs student alone (last epoch): {gain:+.2f} points; this {verdict} the combined standard "
        f"deviation of the two ({spread:.2f}).\n"
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
        "- Every cell is mean ± standard deviation over the seeds, on the test split. 'last' is the final "
        "epoch (the headline rule); 'best epoch' picks each seed's epoch of best test accuracy and is "
        "optimistic. 'gain vs alone' is the last-epoch difference to the student alone, 'spread' the sum "
        "of the two standard deviations; 'gain > spread?' says whether the gain exceeds it. 'agree %' is "
        "top-1 agreement with the teacher; ECE uses 15 bins; 'wall s / run' is one seed's whole fit "
        "(training, evaluation, checkpoints).\n",
        "- Teacher logits are memoised across runs (the teacher is frozen and the data un-augmented, so "
        "each image's logits are computed once and reused): wall times exclude repeated teacher passes.\n"
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
        parts.append(_markdown_table(HEADERS, table_rows(dataset)))
        parts.append("\n" + _kd_sentence(dataset))
    parts.append("\n## Methods\n\nObjectives per method, and where the settings come from:\n\n")
    first = result.datasets[0] if result.datasets else None
    if first is not None:
        objectives = {m.name: m.objectives for m in first.experiment.methods}
        for key, setting in first.methods:
            terms = " + ".join(_objective_text(o) for o in objectives.get(setting.label, []))
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
        rows = _rows(dataset)
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
                        "gain_vs_alone": None
                        if base is None or row is base
                        else dict(zip(("points", "spread"), _gain(row, base), strict=True)),
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


def write_results(result: BenchResult) -> None:
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(result, out / "accuracy.png")
    plot_curves(result, out / "learning_curves.png")
    atomic_write_json(out / "results.json", results_document(result))
    atomic_write_text(out / "results.md", results_markdown(result))


# ------------------------------------------------------------------------------------------------ plots


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _colors(count: int) -> list[Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")  # distinct hues; the curves plot adds line styles past ten methods
    return [cmap(i % 10) for i in range(count)]


def plot_accuracy(result: BenchResult, path: Path) -> Path:
    """Last-epoch test accuracy per method (mean, error bar one std over seeds), one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, len(result.datasets))
    methods = max((len(d.experiment.methods) for d in result.datasets), default=1)
    fig, axes = plt.subplots(1, count, figsize=(6.2 * count, 1.2 + 0.34 * methods), squeeze=False)
    for ax, dataset in zip(axes[0], result.datasets, strict=False):
        rows = _rows(dataset)
        labels = [r.label for r in rows]
        stats = [mean_std([100 * a for a in r.accuracy]) for r in rows]
        y = list(range(len(rows)))[::-1]
        colors = _colors(len(rows))
        for yi, (mean, std), color in zip(y, stats, colors, strict=True):
            ax.errorbar(mean, yi, xerr=std, fmt="o", color=color, ecolor=color, capsize=4, ms=6, lw=1.5)
            ax.annotate(
                f"{mean:.1f} ± {std:.1f}",
                (mean + std, yi),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="dimgrey",
            )
        notes = []
        if stats:
            base = stats[0][0]
            ax.axvline(base, color="grey", ls=":", lw=1)
            notes.append(f"student alone {base:.1f} (dotted)")
        teacher = dataset.experiment.teacher
        if teacher is not None and "accuracy" in teacher.metrics:
            acc = 100 * teacher.metrics["accuracy"]
            ax.axvline(acc, color="black", ls="--", lw=1)
            notes.append(f"teacher {acc:.1f} (dashed)")
        ax.set_yticks(y, labels)
        ax.set_xlabel("test top-1 accuracy, last epoch (%)")
        ax.margins(x=0.12)
        seeds = len(dataset.recipe.seeds)
        ax.set_title(
            f"{dataset.recipe.name}: mean ± std over {seeds} seed{'s' if seeds > 1 else ''}\n"
            + ", ".join(notes),
            fontsize=9,
        )
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_curves(result: BenchResult, path: Path) -> Path:
    """Test accuracy per epoch (mean over seeds) for every method, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    count = max(1, len(result.datasets))
    fig, axes = plt.subplots(1, count, figsize=(6.2 * count + 2.4, 4.6), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, dataset in zip(axes[0], result.datasets, strict=False):
        runs_list = dataset.experiment.methods
        colors = _colors(len(runs_list))
        styles = ["-", "--", "-.", ":"]
        for index, (runs, color) in enumerate(zip(runs_list, colors, strict=True)):
            curves = [[row for row in r.result.history if "accuracy" in row] for r in runs.runs]
            if not curves or not all(curves):
                continue
            length = min(len(c) for c in curves)
            epochs = np.array([row["epoch"] for row in curves[0][:length]])
            acc = 100 * np.array([[row["accuracy"] for row in c[:length]] for c in curves])
            (line,) = ax.plot(
                epochs,
                acc.mean(0),
                color=color,
                ls=styles[(index // 10) % len(styles)],
                lw=2.4 if index == 0 else 1.3,
                marker="o" if len(epochs) < 12 else None,
                ms=3,
            )
            handles.setdefault(runs.name, line)
        teacher = dataset.experiment.teacher
        title = dataset.recipe.name
        if teacher is not None and "accuracy" in teacher.metrics:
            line = ax.axhline(100 * teacher.metrics["accuracy"], color="black", ls="--", lw=1)
            handles.setdefault("teacher", line)
            title += f" (teacher {100 * teacher.metrics['accuracy']:.1f}%)"
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        lows = []
        for runs in runs_list:
            for r in runs.runs:
                evaluated = [row for row in r.result.history if "accuracy" in row]
                skip = len(evaluated) // 4 if len(evaluated) >= 6 else 0  # zoom past the first quarter
                lows += [100 * row["accuracy"] for row in evaluated[skip:]]
        if lows:  # where the methods differ (the teacher's line shows only when it falls in range)
            ax.set_ylim(max(0.0, min(lows) - 2), min(100.5, max(lows) + 2))
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
        title="mean over seeds",
    )
    fig.tight_layout()
    _save(fig, path)
    return path


# ---------------------------------------------------------------------------------------------- terminal


def print_results(result: BenchResult, console: Console) -> None:
    for dataset in result.datasets:
        title = f"{dataset.recipe.name}: {len(dataset.recipe.seeds)} seeds, test split"
        console.print(rich_table(title, HEADERS, table_rows(dataset)))
    console.print(f"results: {result.out_dir / 'results.md'} ({result.wall_seconds / 60:.1f} min)")


def load_results(path: Path) -> dict[str, Any]:
    return json.loads((path / "results.json").read_text())
