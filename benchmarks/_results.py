"""Where a benchmark script writes its markdown, by one rule shared by every script under benchmarks/.

A full run (the default settings, everything in it) writes `benchmarks/results/<name>.md`, the committed
file. A quick run (`--quick`) or a partial one (a subset of the tasks, methods, parts or seeds, or other
sizes) writes its own file beside it, `<name>_quick.md`, `<name>_partial.md` or `<name>_quick_partial.md`,
and never over the full run's file, even when `--out` names it. Any other `--out` is used as given.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def results_path(name: str, quick: bool, partial: bool, out: Path | None = None) -> Path:
    """The markdown file of benchmark `name` for this run; `out` is the caller's `--out` (None: the default).

    Raises ValueError when a quick or partial run is pointed at the full run's file."""
    full = RESULTS / f"{name}.md"
    suffix = ("_quick" if quick else "") + ("_partial" if partial else "")
    if out is None:
        return RESULTS / f"{name}{suffix}.md"
    if suffix and Path(out).resolve() == full:
        kind = " and ".join(k for k, on in (("quick", quick), ("partial", partial)) if on)
        raise ValueError(
            f"--out {out}: a {kind} run does not write over the full run's results; "
            f"leave --out out (it writes {RESULTS / f'{name}{suffix}.md'}) or choose another file"
        )
    return Path(out)


def output_file(
    parser: argparse.ArgumentParser, name: str, out: Path | None, *, quick: bool, partial: bool
) -> Path:
    """`results_path` for a script's `main`: a refused `--out` is a usage error (exit status 2)."""
    try:
        return results_path(name, quick, partial, out)
    except ValueError as err:
        parser.error(str(err))


def out_help(name: str) -> str:
    """The `--out` help text that states the rule."""
    return (
        f"markdown file (default: benchmarks/results/{name}.md for a full run; {name}_quick.md / "
        f"{name}_partial.md for a quick run or a subset, which never write over the full run's file)"
    )


def seeds_and_file(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, chosen: str, every: Iterable[str]
) -> tuple[list[int], Path]:
    """For a script with `--quick`, `--seeds N` (default 3, quick 2), `--out` and a comma-separated subset
    `chosen` of `every` (its tasks or parts): the seeds to run and the file to write. Fewer or more seeds
    than the default, or not every task, is a partial run."""
    default = 2 if args.quick else 3
    seeds = list(range(args.seeds or default))
    partial = set(chosen.split(",")) != set(every) or len(seeds) != default
    return seeds, output_file(parser, name, args.out, quick=args.quick, partial=partial)


def write_results(out: Path, text: str) -> None:
    """Write a results file atomically (a benchmark stopped mid-write leaves the previous file whole)."""
    from distill.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that ran benchmark `name`, for the results file's header."""
    return shlex.join(["python", f"benchmarks/{name}.py", *(sys.argv[1:] if argv is None else argv)])
