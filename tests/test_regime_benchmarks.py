"""The quick modes of the teacher- and data-regime benchmarks (S05 LLKD, S06 DHO, S08 TGeo-KD, S25
MST-Distill) run end to end and write their table (CI runs them; full runs: `python benchmarks/X.py`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from data_helpers import require_data

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# (script, the data it needs, a row its table must hold)
QUICK = [
    ("dho", None, "DHO"),
    ("llkd", None, "LLKD"),
    ("mst_distill", None, "MST-Distill"),
    ("tgeo", "fashion_mnist", "TGeo-KD"),
]


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(("name", "data", "row"), QUICK)
def test_quick_mode_writes_its_table(name: str, data: str | None, row: str, tmp_path: Path) -> None:
    if data == "fashion_mnist" and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        require_data("images/fashion_mnist")  # skips (CI: fails) with the reason when it is nowhere
    out = tmp_path / f"{name}.md"
    assert _load(name).main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("#") and "|---|" in text and row in text
