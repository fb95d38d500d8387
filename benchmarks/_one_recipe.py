"""The command line of a benchmark that is one recipe (methods x seeds): `--quick`, `--seeds`, `--run-dir`,
`--out`; it runs the recipe the script builds, writes the markdown the script renders from the result (by the
results-file rule of `_results.py`) and prints it."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from _results import command_line, out_help, output_file, write_results
from distill.experiment import run_recipe

Recipe = Callable[[bool, list[int], Path], Any]  # (quick, seeds, run folder) -> the recipe
Document = Callable[[Any, str, bool, float], str]  # (result, command, quick, wall seconds) -> markdown


def one_recipe_main(
    name: str, description: str, quick_help: str, recipe: Recipe, document: Document, argv: list[str] | None
) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)"
    )
    parser.add_argument("--out", type=Path, default=None, help=out_help(name))
    args = parser.parse_args(argv)
    default = 2 if args.quick else 3
    seeds = list(range(args.seeds or default))
    out = output_file(parser, name, args.out, quick=args.quick, partial=len(seeds) != default)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "runs"
        started = time.perf_counter()
        result = run_recipe(recipe(args.quick, seeds, run_dir), progress=False, console=Console(stderr=True))
        text = document(result, command_line(name, argv), args.quick, time.perf_counter() - started)
    write_results(out, text)
    print(text)
    print(f"wrote {out}")
    return 0
