"""Table formatting shared by the reports and the benchmarks: mean ± std cells, markdown and terminal tables,
and the verdict of a gain against the seed-to-seed noise.

Pure formatting: the standard library only (`rich` is imported when a terminal table is built). Terminal
tables fit the terminal they are printed on (`fitted_table`): narrower layouts first, then fewer columns.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions
    from rich.table import Table

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"  # the verdicts of `noise_verdict`
# Terminal tables too wide for the terminal leave these out first, in this order (the report keeps them).
SECONDARY_COLUMNS = ("train tok/s", "trainable params", "params", "seeds", "train s")
UNBOUNDED = 10_000  # a width no table reaches: to measure a table's natural width


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2, empty: str = "-") -> str:
    """`mean ± std` of `values` times `scale`, or `empty` when there are none."""
    if not values:
        return empty
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def std_of(values: Sequence[float]) -> float:
    """The standard deviation `mean_std` reports (error bars, spreads)."""
    return mean_std(values)[1]


def gain_and_spread(
    values: Sequence[float], base: Sequence[float], scale: float = 1.0
) -> tuple[float, float]:
    """(difference of the means, sum of the standard deviations) of `values` against `base`, times `scale`."""
    mean, std = mean_std(values)
    base_mean, base_std = mean_std(base)
    return scale * (mean - base_mean), scale * (std + base_std)


def noise_verdict(gain: float, spread: float) -> str:
    """'better' when the gain is beyond the spread, 'worse' when the loss is, 'within noise' otherwise
    ('-' when either is unknown: NaN, from a side with no values)."""
    if math.isnan(gain) or math.isnan(spread):
        return "-"
    if gain > spread:
        return BETTER
    if gain < -spread:
        return WORSE
    return WITHIN_NOISE


CLAIMS = {BETTER: "reproduced", WORSE: "not reproduced", WITHIN_NOISE: "within noise"}


def claim_verdict(gain: float, spread: float) -> str:
    """A paper's claim that its method gains, judged by `noise_verdict`: 'reproduced' (a gain beyond the
    spread), 'not reproduced' (a loss beyond it) or 'within noise' ('-' when either is unknown)."""
    return CLAIMS.get(noise_verdict(gain, spread), "-")


def objective_text(objective: dict[str, Any]) -> str:
    """One weighted term of a method, e.g. `0.9 x hinton_kd(temperature=4.0), weight warm-up 5 epochs`."""
    params = ", ".join(f"{k}={v}" for k, v in (objective.get("params") or {}).items())
    text = f"{objective['weight']:g} x {objective['name']}" + (f"({params})" if params else "")
    if objective.get("warmup_epochs"):
        text += f", weight warm-up {objective['warmup_epochs']:g} epochs"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (`|` inside a cell is escaped), ending in a newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A terminal table: the method column left-aligned, numbers right-aligned, fitted to the terminal when
    printed (`fitted_table`)."""
    return _fitting_table_class()(title, list(headers), [list(row) for row in rows])


@functools.cache
def _fitting_table_class() -> type[Table]:
    """`rich.table.Table` that lays itself out for the width it is printed at (rich is imported here,
    only when a terminal table is built)."""
    from rich.table import Table

    class FittingTable(Table):
        def __init__(self, title: str, headers: list[str], rows: list[list[str]]) -> None:
            super().__init__(title=title)
            _fill(self, headers, rows)

        def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
            # Read back at print time: rows or a caption a caller added after `rich_table` count too.
            headers = [str(column.header) for column in self.columns]
            rows = [[str(cell) for cell in row] for row in zip(*(c.cells for c in self.columns), strict=True)]
            table = fitted_table(self.title, headers, rows, console, options.max_width)
            if table is None:
                yield from super().__rich_console__(console, options)
                return
            if self.caption:
                table.caption = f"{self.caption}; {table.caption}" if table.caption else self.caption
            yield table

    return FittingTable


def _fill(
    table: Table, headers: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[int] = ()
) -> None:
    for index, header in enumerate(headers):
        table.add_column(
            header,
            justify="left" if header == "method" else "right",
            overflow="fold",  # a value too wide for any column is folded, never cut with an ellipsis
            width=widths[index] if widths else None,
        )
    for row in rows:
        table.add_row(*row)


def fitted_table(
    title: Any, headers: list[str], rows: list[list[str]], console: Console, width: int
) -> Table | None:
    """The table laid out for `width` columns; None when it fits as it is. Too wide, it goes narrow (no
    column lines, `mean ± std` over two lines, headers wrapped at spaces, each column as wide as its widest
    word); still too wide, it leaves out `SECONDARY_COLUMNS` one by one, naming them in a caption. Past
    that, rich folds the cells to fit."""
    if _natural_width(_plain_table(title, headers, rows), console) <= width:
        return None
    kept = list(headers)
    for name in [None, *(h for h in SECONDARY_COLUMNS if h in headers)]:
        if name is not None:
            kept.remove(name)
        cells = [[_stacked(row[headers.index(h)]) for h in kept] for row in rows]
        table = _plain_table(title, kept, cells, narrow=True, widths=_narrow_widths(kept, cells))
        if _natural_width(table, console) <= width:
            break
    else:  # nothing more to leave out: rich sizes the columns, folding what does not fit
        table = _plain_table(title, kept, cells, narrow=True)
    dropped = [h for h in headers if h not in kept]
    if dropped:
        table.caption = f"left out to fit {width} columns: {', '.join(dropped)}"
    return table


def _plain_table(
    title: Any,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    narrow: bool = False,
    widths: Sequence[int] = (),
) -> Table:
    from rich import box
    from rich.table import Table

    table = (
        Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        if narrow
        else Table(title=title)
    )
    _fill(table, headers, rows, widths)
    return table


def _natural_width(table: Table, console: Console) -> int:
    """The width `table` takes when nothing constrains it."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(UNBOUNDED), table).maximum


def _stacked(cell: str) -> str:
    """`mean ± std` over two lines (the mean above), so that a narrow column never splits a number."""
    mean, sep, std = cell.partition(" ± ")
    return f"{mean}\n± {std}" if sep else cell


def _narrow_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """Each column as wide as its widest cell line or header word (headers wrap at spaces)."""
    from rich.cells import cell_len

    return [
        max(
            [
                *(cell_len(word) for word in header.split()),
                *(cell_len(line) for row in rows for line in row[index].splitlines()),
                1,
            ]
        )
        for index, header in enumerate(headers)
    ]
