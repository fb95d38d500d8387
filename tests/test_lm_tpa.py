"""`benchmarks/lm_tpa.py` (S34 Align-TI's TPA against vanilla KD): the verdict rule on made-up numbers, the
validation split is carved from the training part only, the results-file rule
and the quick run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench_helpers import load_benchmark
from data_helpers import require_data

lm_tpa = load_benchmark("lm_tpa")


def test_the_verdict_rule() -> None:
    assert lm_tpa.verdict([4.0, 4.01], [4.3, 4.31])[0] == "reproduced"
    mark, why = lm_tpa.verdict([4.3, 4.31], [4.0, 4.01])
    assert mark == "not reproduced" and "worse" in why
    assert lm_tpa.verdict([4.0, 4.1], [4.05, 4.15])[0] == "within noise"
    assert lm_tpa.verdict([4.0], [4.5])[0] == "within noise"  # one seed: no spread to judge by


def test_validation_is_carved_from_the_training_part(tmp_path: Path) -> None:
    source = tmp_path / "all.txt"
    source.write_text("a" * 900 + "b" * 100)  # the real run's test split is the last 10 %: the b's
    carved = lm_tpa.carve_validation(source, tmp_path).read_text()
    assert carved == "a" * 900


def test_the_recipe_adds_tpa_to_forward_kl() -> None:
    spec = lm_tpa.recipe(Path("x.txt"), quick=False, seeds=[0, 1, 2], weights=(0.5, 2.0), tag="t")
    names = [m["name"] for m in spec["methods"]]
    assert names[:2] == [lm_tpa.BASELINE, lm_tpa.KD] and len(names) == 4
    assert spec["methods"][2]["objectives"] == [{"name": "forward_kl"}, {"name": "tpa", "weight": 0.5}]
    assert spec["trainer"]["threads"] == 1


def test_a_quick_run_refuses_the_full_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        lm_tpa.main(["--quick", "--out", str(lm_tpa.ROOT / "benchmarks" / "results" / "lm_tpa.md")])
    assert stop.value.code == 2
    assert "does not write over the full run's results" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_run_writes_a_table_and_a_plot(tmp_path: Path) -> None:
    require_data("text/tinyshakespeare.txt")
    out = tmp_path / "lm_tpa.md"
    assert lm_tpa.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert (tmp_path / "lm_tpa.png").stat().st_size > 5_000
    for name in (lm_tpa.BASELINE, lm_tpa.KD, lm_tpa.TPA):
        assert f"| {name} |" in text
    assert any(mark in text for mark in ("**reproduced**", "**not reproduced**", "**within noise**"))
