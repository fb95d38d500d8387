"""The `distill` command. Every user mistake ends in one line on stderr and exit status 2 (`--debug` shows
the traceback)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from distill.errors import UserError
from distill.train.signals import TrainingInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
) -> None:
    """Knowledge distillation from YAML recipes."""
    _state["debug"] = debug


@app.command()
def run(
    recipe: Annotated[
        Path | None, typer.Argument(help="recipe YAML; none runs the built-in quickstart")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="run folder (default: the recipe's output.dir)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in the folder")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an earlier run in the folder")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train the recipe's students (every method x seed) and write report.md, metrics.json and plots."""
    from distill.experiment import run_recipe
    from distill.recipe import load_recipe
    from distill.recipe.check import check_recipe
    from distill.report import print_table, write_report

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    loaded = load_recipe(recipe)
    check_recipe(loaded, str(recipe or "quickstart"))
    result = run_recipe(
        loaded, out=out, resume=resume, overwrite=overwrite, progress=progress, console=console
    )
    if os.environ.get("RANK", "0") == "0":  # several processes (torchrun): the first one reports
        report = write_report(result)
        print_table(result, console)
        console.print(f"report: {report}")


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="recipe YAML")]) -> None:
    """Check a recipe (schema, names, parameters) without training anything."""
    from distill.recipe import load_recipe
    from distill.recipe.check import check_recipe
    from distill.tasks import task_for

    loaded = load_recipe(recipe)
    check_recipe(loaded, str(recipe))
    task = task_for(loaded)
    task.check(loaded)
    methods = loaded.method_list()
    console.print(
        f"{recipe}: valid, task {task.name} ({len(methods)} method(s) x {len(loaded.seeds)} seed(s))",
        soft_wrap=True,
    )


@app.command()
def methods() -> None:
    """List every registered objective, one line each, with its paper."""
    from distill.objectives import OBJECTIVES

    width = max(len(entry.name) for entry in OBJECTIVES)
    for entry in OBJECTIVES:
        paper = f"  [{entry.paper}]" if entry.paper and entry.paper != "-" else ""
        console.print(f"{entry.name:<{width}}  {entry.summary}{paper}", highlight=False, soft_wrap=True)


@app.command()
def cache(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML (or a built-in recipe's name)")],
    out: Annotated[Path, typer.Option("--out", help="the cache folder")],
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="ids kept per sample / token (default: all of them)")
    ] = None,
    tail_draws: Annotated[
        int | None,
        typer.Option(
            "--tail-draws",
            help="draws from the teacher's tail kept beside the top-k; default: language models split "
            "--top-k's slots into k/2 exact ids + k/2 draws, classifiers 0",
        ),
    ] = None,
    hidden: Annotated[
        list[str] | None, typer.Option("--hidden", help="also store the output of this teacher module")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="default: the recipe's objectives' temperature")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace another cache in --out")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Run the recipe's teacher once over its training data and store its top-k log-probabilities (sharded,
    checksummed, resumable); train from it with `teacher: {cache: DIR}`."""
    from distill.build_cache import make_cache
    from distill.recipe import load_recipe
    from distill.recipe.check import check_recipe

    loaded = load_recipe(recipe)
    check_recipe(loaded, str(recipe))
    make_cache(
        loaded,
        out,
        k=top_k,
        tail_draws=tail_draws,
        temperature=temperature,
        hidden=tuple(hidden or ()),
        overwrite=overwrite,
        progress=progress,
        console=console,
    )


bench_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Benchmarks: suites of recipes over methods x seeds."
)
app.add_typer(bench_app, name="bench")

from distill.cli_diagnose import diagnose_app  # noqa: E402  (`distill diagnose alignment`)

app.add_typer(diagnose_app, name="diagnose")


@bench_app.command("vision")
def bench_vision(
    suite: Annotated[str, typer.Option("--suite", help="quick | standard | cifar100")] = "quick",
    out: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="seeds 0..N-1 (default: the suite's 3)")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="comma-separated subset, e.g. hinton_kd,dkd (default: all)"),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the benchmark in --out")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="recipe override KEY.PATH=VALUE, e.g. data.params.root=/data/cifar100"),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
) -> None:
    """Image-classification distillation: every logit objective x seeds; results.md, results.json, plots."""
    import shlex

    from distill.bench.vision import parse_set, print_results, run_vision_bench

    if resume and out is None:
        raise UserError("--resume needs the benchmark folder: give --out DIR")
    command = ["distill", "bench", "vision", "--suite", suite]
    command += ["--out", str(out)] if out is not None else []
    command += ["--seeds", str(seeds)] if seeds is not None else []
    command += ["--methods", methods] if methods else []
    command += ["--resume"] if resume else []
    command += [part for item in set_ or [] for part in ("--set", item)]
    result = run_vision_bench(
        suite,
        out=out,
        seeds=seeds,
        methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
        resume=resume,
        overrides=parse_set(set_),
        progress=progress,
        console=console,
        command=shlex.join(command),
    )
    print_results(result, console)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except UserError as err:
        if debug:
            raise
        err_console.print(f"error: {err}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)
    except TrainingInterrupted as stop:
        err_console.print(f"stopped: {stop}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:  # click's usage errors come here in standalone_mode=False
        import click

        if isinstance(err, click.exceptions.ClickException):
            err_console.print(f"error: {err.format_message()}", highlight=False, markup=False)
            sys.exit(2)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        raise
