"""Table formatting shared by the reports and the benchmarks: mean ± std cells, markdown and terminal tables,
and the verdict of a gain against the seed-to-seed noise.

Pure formatting: the standard library only (`rich` is imported when a terminal table is built).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"  # the verdicts of `noise_verdict`


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
    """A terminal table: the method column left-aligned, numbers right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="left" if header == "method" else "right")
    for row in rows:
        table.add_row(*row)
    return table
