"""Running the vision benchmark: every recipe of a suite (methods x seeds) through `run_recipe`, each data
set's report in its own sub-folder, then the aggregate `results.md`, `results.json` and plots."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from distill.bench.memo import MemoizedTeacher
from distill.bench.methods import skipped_objectives
from distill.bench.plots import plot_accuracy, plot_curves
from distill.bench.results import (
    HEADERS,
    BenchResult,
    DatasetResult,
    results_document,
    results_markdown,
    table_rows,
)
from distill.bench.suites import suite_recipes
from distill.errors import UserError
from distill.experiment import ExperimentResult, run_recipe
from distill.io import atomic_write_json, atomic_write_text
from distill.recipe.schema import Recipe
from distill.report import write_report
from distill.runfolder import holds_run
from distill.tables import rich_table

RESULT_FILES = ("results.md", "results.json")


def check_bench_folder(out_dir: Path, recipe_names: list[str], resume: bool) -> None:
    """Refuse, in one line, an output folder that is a file, or that holds an earlier benchmark (its results
    or any of its recipes' runs) unless the benchmark resumes it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} is a file")
    earlier = [f for f in RESULT_FILES if (out_dir / f).exists()]
    earlier += [name for name in recipe_names if holds_run(out_dir / name)]
    if earlier and not resume:
        raise UserError(
            f"output folder {out_dir} holds an earlier benchmark ({earlier[0]}); pass --resume to continue "
            "it or choose another --out"
        )


def run_bench_recipe(
    recipe: Recipe,
    out_dir: Path,
    resume: bool,
    progress: bool,
    console: Console,
    teacher_wrapper: Callable[[nn.Module], nn.Module] | None,
) -> ExperimentResult:
    """One recipe of a benchmark suite, run (or resumed) in `out_dir / recipe.name`, its report written."""
    folder = out_dir / recipe.name
    experiment = run_recipe(
        recipe,
        out=folder,
        resume=resume and holds_run(folder),
        progress=progress,
        console=console,
        teacher_wrapper=teacher_wrapper,
    )
    write_report(experiment)
    return experiment


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
    check_bench_folder(out_dir, [r.name for r, _ in recipes], resume)
    datasets = []
    for recipe, chosen in recipes:
        augmented = bool(recipe.data.params.get("augment", False))
        wrapper = MemoizedTeacher if memoize_teacher and not augmented else None
        experiment = run_bench_recipe(recipe, out_dir, resume, progress, console, wrapper)
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


def write_results(result: BenchResult) -> None:
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(result, out / "accuracy.png")
    plot_curves(result, out / "learning_curves.png")
    atomic_write_json(out / "results.json", results_document(result))
    atomic_write_text(out / "results.md", results_markdown(result))


def print_results(result: BenchResult, console: Console) -> None:
    for dataset in result.datasets:
        title = f"{dataset.recipe.name}: {len(dataset.recipe.seeds)} seeds, test split"
        console.print(rich_table(title, HEADERS, table_rows(dataset)))
    console.print(f"results: {result.out_dir / 'results.md'} ({result.wall_seconds / 60:.1f} min)")


def load_results(path: Path) -> dict[str, Any]:
    return json.loads((path / "results.json").read_text())
