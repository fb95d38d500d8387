"""The quick modes of the teacher- and data-regime benchmarks (S05 LLKD, S06 DHO, S08 TGeo-KD, S25
MST-Distill, S35 KD^3, S37 mixup) run end to end and write their table, and those that state a finding state
it (CI runs them; full runs: `python benchmarks/X.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench_helpers import load_benchmark
from data_helpers import require_data

SLOW = pytest.mark.slow

# (script, the data it needs, rows its table must hold, the finding line it must state)
QUICK = [
    pytest.param("dho", None, ("DHO",), None, marks=SLOW),
    pytest.param("llkd", None, ("LLKD",), None, marks=SLOW),
    pytest.param("mst_distill", None, ("MST-Distill",), None, marks=SLOW),
    pytest.param("tgeo", "fashion_mnist", ("TGeo-KD",), None, marks=SLOW),
    pytest.param(
        "kd3",
        None,
        (
            "| student alone |",
            "| KD (whole transfer set) |",
            "| KD^3 (selection) |",
            "| KD^3 (selection + alignment) |",
        ),
        "**Finding (S35: KD^3 beats plain KD on a shifted transfer set): ",
    ),
    pytest.param(
        "mixup",
        None,
        ("| student alone |", "| KD T 1 + mixup |", "| KD T 8 |"),
        "**Finding (S37: with mixup a lower temperature is better): ",
    ),
]


@pytest.mark.parametrize(("name", "data", "rows", "finding"), QUICK)
def test_quick_mode_writes_its_table(
    name: str, data: str | None, rows: tuple[str, ...], finding: str | None, tmp_path: Path
) -> None:
    if data == "fashion_mnist" and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        require_data("images/fashion_mnist")  # skips (CI: fails) with the reason when it is nowhere
    out = tmp_path / f"{name}.md"
    arguments = ["--quick", "--out", str(out)]
    if finding is not None:  # the one-recipe benchmarks keep their run folders where they are told
        arguments += ["--run-dir", str(tmp_path / "runs")]
    assert load_benchmark(name).main(arguments) == 0
    text = out.read_text()
    assert text.startswith("#") and "|---|" in text
    for row in rows:
        assert row in text
    if finding is not None:
        assert finding in text
