"""`benchmarks/lm.py --quick` (the CI mode) runs both tasks and writes both tables with every row."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench_helpers import load_benchmark
from data_helpers import require_data

ROOT = Path(__file__).resolve().parents[2]
ROWS = (
    "teacher",
    "student alone (CE)",
    "forward KL",
    "reverse KL",
    "JSD(0.5)",
    "TAID",
    "AdaKD (forward KL)",
    "sequence-level KD",
)


def _benchmark():
    return load_benchmark("lm")


def test_packaged_recipes_are_the_default_runs():
    bench = _benchmark()
    for task in bench.TASKS:
        full, quick = bench.task_recipe(task, False, [0, 1, 2]), bench.task_recipe(task, True, [0])
        assert [m.name for m in full.method_list()] == list(ROWS[1:])
        assert [m.name for m in quick.method_list()] == list(ROWS[1:])
        assert quick.trainer.epochs >= 1 and quick.name.endswith("-quick")
        assert quick.student.params["config"]["hidden_size"] < full.student.params["config"]["hidden_size"]


@pytest.mark.slow
def test_quick_benchmark_writes_both_tables(tmp_path):
    require_data("text/tinyshakespeare.txt")  # the shakespeare task's text
    out = tmp_path / "lm.md"
    assert _benchmark().main(["--quick", "--seeds", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for task in ("## shakespeare", "## arithmetic"):
        section = text.split(task)[1].split("## ")[0]
        for row in ROWS:
            assert f"| {row} |" in section, (task, row)
    assert "exact match %" in text.split("## arithmetic")[1]
