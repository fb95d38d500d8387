"""The `distill` command. Every mistake, in a recipe or on the command line (an unknown command or option, a
missing or extra argument, a bad value), ends in one line on stderr and exit status 2; Ctrl-C in one line and
status 130. `--debug` shows the traceback instead."""

from __future__ import annotations

import importlib
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from typer.core import TyperGroup

from distill.cli_export import register as register_export
from distill.cli_list import register as register_list
from distill.cli_list import valid_choice
from distill.errors import UserError, clipped, first_line
from distill.recipe.schema import MAX_SEED, Recipe, method_slug
from distill.registry import nearest, unknown_name_message
from distill.train.signals import TrainingInterrupted

# click's exceptions live where `typer.BadParameter` does: in click itself, or in the copy of click that newer
# typer versions ship as `typer._click`
click_errors = importlib.import_module(typer.BadParameter.__module__)
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class UnknownCommand(click_errors.UsageError):  # type: ignore[name-defined,misc]
    """A command name no group knows."""


class CliGroup(TyperGroup):
    """A group whose unknown command is one line with the nearest known one (or all of them)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            message = unknown_name_message("command", clipped(name), self.list_commands(ctx))
            raise UnknownCommand(message, ctx)
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=CliGroup, add_completion=False, no_args_is_help=False, help=__doc__, pretty_exceptions_enable=False
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")] = False,
) -> None:
    """Knowledge distillation from YAML recipes."""
    _state["debug"] = debug


# ------------------------------------------------------------------------- recipe options (run, validate)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="change the recipe: KEY.PATH=VALUE (repeatable; VALUE read as YAML), e.g. trainer.epochs=2",
    ),
]
SeedsOption = Annotated[
    str | None, typer.Option("--seeds", help="the seeds to run, e.g. 0,1,2 (default: the recipe's seeds)")
]
MethodsOption = Annotated[
    str | None,
    typer.Option(
        "--methods", help="the recipe's methods to run, by name or folder name, e.g. kd,dkd (default: all)"
    ),
]


def split_names(text: str, option: str, what: str = "names") -> list[str]:
    """`"kd, dkd"` -> `["kd", "dkd"]`; none at all is a mistake."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError(f"{option}: give one or more {what} separated by commas")
    return names


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> `[0, 1, 2]`: distinct whole numbers in the range the recipe's `seeds` take."""
    seeds: list[int] = []
    for part in split_names(text, "--seeds", "seeds"):
        if not part.isdecimal() or int(part) > MAX_SEED:
            raise UserError(
                f"--seeds: expected whole numbers from 0 to {MAX_SEED} separated by commas (e.g. 0,1,2), "
                f"got '{clipped(part)}'"
            )
        if int(part) in seeds:
            raise UserError(f"--seeds: seed {int(part)} is given twice")
        seeds.append(int(part))
    return seeds


def choose_methods(recipe: Recipe, text: str) -> None:
    """Keep the recipe's methods that `text` names (comma-separated; a method's name or its folder name, in
    any case), in the recipe's order. A name with commas in it is matched whole first."""
    methods = recipe.method_list()
    by_slug = {method_slug(method.name): method for method in methods}
    wanted = [text] if method_slug(text) in by_slug else split_names(text, "--methods")
    chosen = set()
    for name in wanted:
        if method_slug(name) not in by_slug:
            valid_choice("method", name, [method.name for method in methods], "--methods")
        chosen.add(method_slug(name))
    if recipe.methods is not None:
        recipe.methods = [method for method in methods if method_slug(method.name) in chosen]


def load_checked(
    recipe: Path | None,
    settings: list[str] | None = None,
    seeds: str | None = None,
    methods: str | None = None,
) -> Recipe:
    """The recipe with the command line's changes, checked (names, parameters, data files) as `run` needs it.
    `--set` and `--seeds` change the YAML mapping before it is validated, so a wrong key they bring is named
    as one in the file would be."""
    from distill.recipe import load_recipe
    from distill.recipe.check import check_recipe
    from distill.recipe.data_files import check_data_files
    from distill.recipe.overrides import merge, parse_set

    source = str(recipe or "quickstart")
    overrides = parse_set(settings)
    if seeds is not None:
        overrides["seeds"] = parse_seeds(seeds)
    loaded = load_recipe(recipe, edit=(lambda data: merge(data, overrides)) if overrides else None)
    if methods is not None:
        choose_methods(loaded, methods)
    check_recipe(loaded, source)
    check_data_files(loaded, source)
    return loaded


# ------------------------------------------------------------------------------------------------ commands


@app.command()
def run(
    recipe: Annotated[
        Path | None, typer.Argument(metavar="RECIPE", help="recipe YAML; none runs the built-in quickstart")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="run folder (default: the recipe's output.dir)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in the folder")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an earlier run in the folder")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    set_: SetOption = None,
    seeds: SeedsOption = None,
    methods: MethodsOption = None,
) -> None:
    """Train the recipe's students (every method x seed) and write report.md, metrics.json and plots."""
    from distill.experiment import run_recipe
    from distill.report import print_table, write_report

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    loaded = load_checked(recipe, set_, seeds, methods)
    result = run_recipe(
        loaded, out=out, resume=resume, overwrite=overwrite, progress=progress, console=console
    )
    if os.environ.get("RANK", "0") == "0":  # several processes (torchrun): the first one reports
        report = write_report(result)
        print_table(result, console)
        console.print(f"report: {report}")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe YAML")],
    set_: SetOption = None,
    seeds: SeedsOption = None,
    methods: MethodsOption = None,
) -> None:
    """Check a recipe (schema, names, parameters, data files) without training anything."""
    from distill.tasks import task_for

    loaded = load_checked(recipe, set_, seeds, methods)
    task = task_for(loaded)
    task.check(loaded)
    count = len(loaded.method_list())
    console.print(
        f"{recipe}: valid, task {task.name} ({count} method(s) x {len(loaded.seeds)} seed(s))",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )


@app.command()
def methods(
    task: Annotated[
        str | None, typer.Option("--task", help="only the objectives known for this task")
    ] = None,
) -> None:
    """List every registered objective, one line each, with its paper (`distill list objectives` groups them
    by task)."""
    from distill.cli_list import ANY_TASK, objectives, task_names
    from distill.objectives import OBJECTIVES

    entries = list(OBJECTIVES)
    if task is not None:
        task = valid_choice("task", task, task_names(), "--task")
        known = {item.name for item in objectives() if task in item.tasks or ANY_TASK in item.tasks}
        entries = [entry for entry in entries if entry.name in known]
    width = max((len(entry.name) for entry in entries), default=0)
    for entry in entries:
        paper = f"  [{entry.paper}]" if entry.paper and entry.paper != "-" else ""
        console.print(
            f"{entry.name:<{width}}  {entry.summary}{paper}", highlight=False, soft_wrap=True, markup=False
        )


@app.command()
def cache(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="recipe YAML (or a built-in recipe's name)")
    ],
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
    set_: SetOption = None,
) -> None:
    """Run the recipe's teacher once over its training data and store its top-k log-probabilities (sharded,
    checksummed, resumable); train from it with `teacher: {cache: DIR}`."""
    from distill.build_cache import make_cache

    make_cache(
        load_checked(recipe, set_),
        out,
        k=top_k,
        tail_draws=tail_draws,
        temperature=temperature,
        hidden=tuple(hidden or ()),
        overwrite=overwrite,
        progress=progress,
        console=console,
    )


@app.command()
def search(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="recipe YAML (or a built-in recipe's name)")
    ],
    candidates: Annotated[
        Path, typer.Option("--candidates", help="YAML list of student configs ({name, params}) to rank")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="markdown file (default: search.md in the recipe's run folder)"),
    ] = None,
    teacher: Annotated[
        str,
        typer.Option("--teacher", help="random (the paper's random-init teacher) | trained (the recipe's)"),
    ] = "random",
    init: Annotated[
        str, typer.Option("--init", help="gaussian (official N(0, 1) redraw) | default")
    ] = "gaussian",
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows of the scoring mini-batch")] = 64,
    seed: Annotated[
        int, typer.Option("--seed", help="seed of the batch and the random draws", min=0, max=MAX_SEED)
    ] = 0,
    repeats: Annotated[int, typer.Option("--repeats", help="random draws averaged per score")] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
    set_: SetOption = None,
) -> None:
    """Rank candidate students for the recipe's teacher without training them (DisWOT, S18)."""
    from distill.bench.search import SearchSettings, load_candidates, print_search, run_search

    settings = SearchSettings(batch_size, teacher, init, seed, repeats)  # type: ignore[arg-type]
    specs = load_candidates(candidates)
    result = run_search(
        load_checked(recipe, set_), specs, settings, out=out, progress=progress, console=console
    )
    print_search(result, console)


register_list(app)  # `distill list`
register_export(app)  # `distill export`, `distill predict`, `distill eval`

bench_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Benchmarks: suites of recipes over methods x seeds."
)
app.add_typer(bench_app, name="bench", cls=CliGroup)

from distill.cli_diagnose import diagnose_app  # noqa: E402  (`distill diagnose alignment`)

app.add_typer(diagnose_app, name="diagnose", cls=CliGroup)


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
        methods=split_names(methods, "--methods") if methods is not None else None,
        resume=resume,
        overrides=parse_set(set_),
        progress=progress,
        console=console,
        command=shlex.join(command),
    )
    print_results(result, console)


@bench_app.command("text")
def bench_text(
    suite: Annotated[str, typer.Option("--suite", help="quick | standard")] = "quick",
    out: Annotated[Path | None, typer.Option("--out", help="output folder")] = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="seeds 0..N-1 (default: the recipes' own)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the benchmark in --out")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="recipe override KEY.PATH=VALUE, e.g. trainer.epochs=2"),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
) -> None:
    """Text classification with encoders (SMS spam, fortunes): macro F1, agreement, ECE, latency."""
    import shlex

    from distill.bench.text import print_text_results, run_text_bench
    from distill.bench.vision import parse_set

    if resume and out is None:
        raise UserError("--resume needs the benchmark folder: give --out DIR")
    command = ["distill", "bench", "text", "--suite", suite]
    command += ["--out", str(out)] if out is not None else []
    command += ["--seeds", str(seeds)] if seeds is not None else []
    command += ["--resume"] if resume else []
    command += [part for item in set_ or [] for part in ("--set", item)]
    bench = run_text_bench(
        suite,
        out=out,
        seeds=seeds,
        resume=resume,
        overrides=parse_set(set_),
        progress=progress,
        console=console,
        command=shlex.join(command),
    )
    print_text_results(bench, console)


# ------------------------------------------------------------------------------------------ errors, main


def _options_of(ctx: Any) -> list[str]:
    names = {name for param in ctx.command.get_params(ctx) for name in (*param.opts, *param.secondary_opts)}
    return sorted(name for name in names if name.startswith("-"))


def recipe_key(option: str) -> str | None:
    """`--epochs` -> `trainer.epochs`: the one recipe section field of that name, for a hint towards --set."""
    name = option.lstrip("-").replace("-", "_")
    found = []
    for section, field in Recipe.model_fields.items():
        for model in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(model, type) and issubclass(model, BaseModel) and name in model.model_fields:
                found.append(f"{section}.{name}")
    return found[0] if len(found) == 1 else None


def unknown_option(err: Any) -> str:
    option = clipped(err.option_name or "")
    known = _options_of(err.ctx) if err.ctx is not None else []
    bare = {name.lstrip("-"): name for name in known}  # the dashes would make every option look alike
    hint = bare.get(nearest(option.lstrip("-"), list(bare)) or "")
    key = recipe_key(option) if "--set" in known else None
    if key is not None:
        return f"unknown option {option}; recipe settings go through --set, e.g. --set {key}=VALUE"
    if hint:
        return f"unknown option {option}; did you mean {hint}?"
    return f"unknown option {option} (options: {', '.join(known)})"


def sentence(text: str) -> str:
    """click's messages as this project writes them: lower case, no full stop."""
    text = text.strip().removesuffix(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def usage_of(ctx: Any) -> str:
    return " ".join(ctx.get_usage().split()).removeprefix("Usage: ")


def show_help(ctx: Any) -> None:
    """The command's help on stdout (typer's rich help prints itself and returns nothing)."""
    text = ctx.get_help()
    if text:
        console.print(text, highlight=False, markup=False)


def usage_line(err: Any) -> str:
    """One line for a command-line mistake click found, naming the command it concerns."""
    ctx = err.ctx
    where = f"{ctx.command_path}: " if ctx is not None else ""
    message = clipped((err.format_message().strip().splitlines() or [""])[0], 300)
    no_args = getattr(click_errors, "NoArgsIsHelpError", ())
    if isinstance(err, click_errors.NoSuchOption):
        text = unknown_option(err)
    elif ctx is not None and (isinstance(err, no_args) or message.startswith("Missing command")):
        if not isinstance(err, no_args):  # that one printed the help already
            show_help(ctx)
        commands = ", ".join(ctx.command.list_commands(ctx))
        text = f"missing command (one of: {commands})"
    elif ctx is None or (
        isinstance(err, UnknownCommand | click_errors.BadParameter)
        and not isinstance(err, click_errors.MissingParameter)
    ):
        text = sentence(message)
    else:
        text = f"{sentence(message)}; usage: {usage_of(ctx)}"
    return f"error: {where}{text}"


# typer's own Abort and Exit, and click's where they are other classes (typer before it shipped click)
ABORTS = (KeyboardInterrupt, typer.Abort, getattr(click_errors, "Abort", typer.Abort))
EXITS = (typer.Exit, getattr(click_errors, "Exit", typer.Exit))


def outcome(err: BaseException) -> tuple[str, int] | None:
    """The line to print and the exit status for an exception that left the app; None for a bug."""
    if isinstance(err, UserError):
        return f"error: {err}", 2
    if isinstance(err, TrainingInterrupted):
        return f"stopped: {err}", err.exit_code
    if isinstance(err, ABORTS):
        return "interrupted", INTERRUPTED
    if isinstance(err, click_errors.ClickException):
        return usage_line(err), 2
    if isinstance(err, EXITS):
        return "", err.exit_code
    return None


def finish(line: str, code: int) -> NoReturn:
    if line:
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)
    sys.exit(code)


def one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any
) -> None:
    """Python warnings as one `warning: ...` line each (not two lines of file, line and source), so that every
    line on stderr is one message, the final `error: ...` included."""
    err_console.print(f"warning: {first_line(str(message))}", highlight=False, soft_wrap=True, markup=False)


def main(argv: list[str] | None = None) -> None:
    """The console script (`argv`: the arguments, default `sys.argv[1:]`). A bug still raises: only the
    user's mistakes and interruptions become one line."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    previous = warnings.showwarning
    if not debug:  # --debug keeps Python's own format: file and line of each warning
        warnings.showwarning = one_line_warning
    try:
        try:
            code = app(args=args, prog_name="distill", standalone_mode=False)
        except BaseException as err:
            result = outcome(err)
            if result is None or (debug and isinstance(err, UserError | click_errors.ClickException)):
                raise
            finish(*result)
        if isinstance(code, int) and code:  # click returns the status of an Exit (typer: Ctrl-C is Exit(130))
            finish("interrupted" if code == INTERRUPTED else "", code)
    finally:
        warnings.showwarning = previous
