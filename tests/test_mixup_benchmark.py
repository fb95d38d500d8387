"""`benchmarks/mixup.py --quick` (S37's temperature study on digits) runs and states its finding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_quick_mixup_benchmark_writes_its_table(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("mixup_bench", BENCHMARKS / "mixup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "mixup.md"
    assert module.main(["--quick", "--out", str(out), "--run-dir", str(tmp_path / "runs")]) == 0
    text = out.read_text()
    for row in ("| student alone |", "| KD T 1 + mixup |", "| KD T 8 |"):
        assert row in text
    assert "**Finding (S37: with mixup a lower temperature is better): " in text
