"""`distill export`, `distill predict` and `distill eval`: from a trained student to a shipped model.

`register(app)` adds the three commands to the main `distill` app (`distill.cli`). Mistakes are `UserError`s,
which the main app turns into one line on stderr and exit status 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from distill.errors import UserError

console = Console(highlight=False)

Method = Annotated[
    str | None,
    typer.Option("--method", help="the method's name (or folder name); default: the run's only method"),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="default: the seed with the best final accuracy (classifiers), macro F1 (text classifiers) or "
        "perplexity (language models)",
    ),
]


def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run's folder")],
    out: Annotated[Path, typer.Option("--out", help="the export folder: new, or empty")],
    method: Method = None,
    seed: Seed = None,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="hf (language models and text classifiers: save_pretrained with the tokenizer), "
            "safetensors (zoo and text classifiers: weights + model.json), onnx; default: hf for language "
            "models and text classifiers, safetensors for zoo classifiers",
        ),
    ] = None,
) -> None:
    """Write a run's student as a folder its ecosystem loads without distill, with a model card."""
    from distill.export import export_student

    done = export_student(run_dir, out, method=method, seed=seed, fmt=format_)
    console.print(
        f"exported '{done.method}' seed {done.seed} ({done.why}) as {done.fmt} to {done.path}", soft_wrap=True
    )


def predict(
    source: Annotated[Path, typer.Argument(help="a finished run's folder or an export folder")],
    inputs: Annotated[
        list[str], typer.Argument(help="image files (classifiers), texts (text classifiers) or prompts (LMs)")
    ],
    method: Method = None,
    seed: Seed = None,
    top_k: Annotated[int, typer.Option("--top-k", help="classes shown per image or text")] = 3,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens generated per prompt")] = 32,
) -> None:
    """The student's top classes for image files or texts, or its greedy continuation of text prompts."""
    from distill.export_student import CAUSAL_LM
    from distill.export_use import classify, continue_prompts, load_students

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    (loaded,) = load_students(source, method, seed)
    if loaded.student.task == CAUSAL_LM:
        for prompt, text in zip(inputs, continue_prompts(loaded, inputs, max_new_tokens), strict=True):
            console.print(f"{prompt} -> {text}", markup=False, soft_wrap=True)
        return
    for name, ranked in zip(inputs, classify(loaded, inputs, top_k), strict=True):
        shown = ", ".join(f"{label} {p:.3f}" for label, p in ranked)
        console.print(f"{name}: {shown}", markup=False, soft_wrap=True)


# key, column, scale, digits
COLUMNS = {
    "classification": [
        ("accuracy", "acc %", 100.0, 2),
        ("loss", "CE (nats)", 1.0, 3),
        ("ece", "ECE %", 100.0, 2),
    ],
    "text_classification": [
        ("f1", "macro F1 %", 100.0, 2),
        ("accuracy", "acc %", 100.0, 2),
        ("loss", "CE (nats)", 1.0, 3),
        ("ece", "ECE %", 100.0, 2),
    ],
    "causal_lm": [
        ("perplexity", "ppl", 1.0, 2),
        ("loss", "CE (nats)", 1.0, 3),
        ("accuracy", "token acc %", 100.0, 2),
        ("exact_match", "exact match %", 100.0, 2),
    ],
}


def eval_(
    source: Annotated[Path, typer.Argument(help="a finished run's folder or an export folder")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="a registered data set name, an LM data file, a table of texts and labels (text "
            "classifiers: csv / tsv / jsonl / parquet) or a folder of <class>/ images "
            "(default: the recipe's data; its held-out split)",
        ),
    ] = None,
    method: Method = None,
    seed: Seed = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="default: the recipe's eval_batch_size")
    ] = None,
) -> None:
    """Evaluate a run's students (every method x seed unless chosen) or an export, with the task's metrics."""
    from distill.export_use import evaluate, evaluation_data, load_students
    from distill.tables import rich_table

    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    students = load_students(source, method, seed, every=True)
    dataset = evaluation_data(students[0], data)
    size = batch_size or students[0].recipe.data.eval_batch_size
    results: dict[str, list[dict[str, float]]] = {}
    for loaded in students:
        results.setdefault(loaded.method, []).append(evaluate(loaded, dataset, size))
    columns = COLUMNS[students[0].student.task]
    columns = [c for c in columns if any(c[0] in row for rows in results.values() for row in rows)]
    table_rows = [
        [name, str(len(rows)), *(_cell([r[k] for r in rows if k in r], s, d) for k, _, s, d in columns)]
        for name, rows in results.items()
    ]
    where = data or f"{students[0].recipe.data.name}, held-out split"
    console.print(
        rich_table(f"{source.name} on {where}", ["method", "seeds", *(c[1] for c in columns)], table_rows)
    )
    if getattr(dataset, "description", ""):
        console.print(dataset.description, markup=False)


def _cell(values: list[float], scale: float, digits: int) -> str:
    """One seed's value as it is; several seeds' as mean ± std."""
    from distill.tables import pm

    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return pm(values, scale, digits)


COMMANDS: dict[str, Callable[..., Any]] = {"export": export, "predict": predict, "eval": eval_}


def register(app: typer.Typer) -> None:
    """Add `export`, `predict` and `eval` to `app` (once: a second call adds nothing)."""
    present = {command.name for command in app.registered_commands}
    for name, function in COMMANDS.items():
        if name not in present:
            app.command(name)(function)
