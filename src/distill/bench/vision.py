"""`distill bench vision`: image-classification distillation over methods x seeds, one recipe per data set.

A suite is a list of recipes shipped with the package (`distill/recipes/bench_vision_*.yaml`). Each recipe
fixes the data, teacher, student, optimiser and schedule; the benchmark replaces its `methods` with every
logit objective registered at run time (`distill.bench.methods`), runs it through `run_recipe` (the same
path as `distill run`, so each data set also gets its own report.md and metrics.json in a sub-folder), and
aggregates the data sets into `results.md`, `results.json`, `accuracy.png` and `learning_curves.png`.

The parts live in their own modules, re-exported here: `suites` (which recipes, `--set` overrides),
`runner` (`run_vision_bench`, the terminal table), `results` (the tables, `results.md` / `results.json`)
and `plots`.
"""

from __future__ import annotations

from distill.bench.plots import plot_accuracy, plot_curves
from distill.bench.results import (
    HEADERS,
    BenchResult,
    DatasetResult,
    Row,
    dataset_rows,
    kd_sentence,
    results_document,
    results_markdown,
    table_rows,
)
from distill.bench.runner import RESULT_FILES, load_results, print_results, run_vision_bench, write_results
from distill.bench.suites import SUITES, merge, parse_set, suite_recipe_names, suite_recipes

__all__ = [
    "HEADERS",
    "RESULT_FILES",
    "SUITES",
    "BenchResult",
    "DatasetResult",
    "Row",
    "dataset_rows",
    "kd_sentence",
    "load_results",
    "merge",
    "parse_set",
    "plot_accuracy",
    "plot_curves",
    "print_results",
    "results_document",
    "results_markdown",
    "run_vision_bench",
    "suite_recipe_names",
    "suite_recipes",
    "table_rows",
    "write_results",
]
