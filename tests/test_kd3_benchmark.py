"""`benchmarks/kd3.py --quick` (S35: KD^3 against plain KD on a shifted transfer set) runs and states its
finding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_kd3_benchmark_writes_its_table(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("kd3_bench", BENCHMARKS / "kd3.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "kd3.md"
    assert module.main(["--quick", "--out", str(out), "--run-dir", str(tmp_path / "runs")]) == 0
    text = out.read_text()
    for row in (
        "| student alone |",
        "| KD (whole transfer set) |",
        "| KD^3 (selection) |",
        "| KD^3 (selection + alignment) |",
    ):
        assert row in text
    assert "**Finding (S35: KD^3 beats plain KD on a shifted transfer set): " in text
