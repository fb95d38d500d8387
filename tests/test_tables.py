"""`distill.tables`: mean ± std cells, markdown / terminal tables, and the gain-vs-noise verdict."""

from __future__ import annotations

import math

import pytest

from distill import tables
from distill.tables import BETTER, WITHIN_NOISE, WORSE, noise_verdict


def test_noise_verdict() -> None:
    assert noise_verdict(2.47, 1.72) == BETTER == "better"
    # a loss beyond the spread: "worse" (the old `gain > spread?` column said "yes")
    assert noise_verdict(-1.88, 1.72) == WORSE == "worse"
    assert noise_verdict(0.99, 1.10) == WITHIN_NOISE == "within noise"
    assert noise_verdict(-0.32, 1.75) == WITHIN_NOISE
    assert noise_verdict(0.46, 0.46) == WITHIN_NOISE  # equal to the spread is not beyond it
    assert noise_verdict(float("nan"), 1.0) == "-"


def test_gain_and_spread_is_the_mean_difference_and_the_sum_of_the_stds() -> None:
    base, better = [0.80, 0.82, 0.84], [0.90, 0.91, 0.92]
    gain, spread = tables.gain_and_spread(better, base, 100)
    assert gain == pytest.approx(9.0)
    assert spread == pytest.approx(100 * (0.02 + 0.01))
    assert noise_verdict(gain, spread) == BETTER
    loss, same_spread = tables.gain_and_spread(base, better, 100)
    assert loss == pytest.approx(-9.0) and same_spread == pytest.approx(spread)
    assert noise_verdict(loss, same_spread) == WORSE
    assert noise_verdict(*tables.gain_and_spread([0.81, 0.83], [0.80, 0.84], 100)) == WITHIN_NOISE


def test_mean_std_and_pm() -> None:
    assert tables.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert tables.mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in tables.mean_std([]))
    assert tables.pm([0.5, 0.7], 100) == "60.00 ± 14.14"
    assert tables.pm([1.23456], digits=3) == "1.235 ± 0.000"
    assert tables.pm([]) == "-" and tables.pm([], empty="n/a") == "n/a"


def test_markdown_table_escapes_pipes() -> None:
    text = tables.markdown_table(["method", "a"], [["x|y", "1"], ["z", "2"]])
    assert text == "| method | a |\n|---|---|\n| x\\|y | 1 |\n| z | 2 |\n"


def test_rich_table_aligns_the_method_column_left() -> None:
    table = tables.rich_table("t", ["method", "acc"], [["KD", "90.0"]])
    assert [c.justify for c in table.columns] == ["left", "right"]
    assert table.row_count == 1 and table.title == "t"


def test_objective_text() -> None:
    kd = {"name": "hinton_kd", "weight": 0.9, "params": {"temperature": 4.0}, "warmup_epochs": 5}
    assert tables.objective_text(kd) == "0.9 x hinton_kd(temperature=4.0), weight warm-up 5 epochs"
    ce = {"name": "cross_entropy", "weight": 1.0, "params": None}
    assert tables.objective_text(ce) == "1 x cross_entropy"


def test_claim_verdict_names_a_paper_claim_by_the_noise_rule() -> None:
    assert tables.claim_verdict(1.0, 0.5) == "reproduced"
    assert tables.claim_verdict(-1.0, 0.5) == "not reproduced"
    assert tables.claim_verdict(0.4, 0.5) == "within noise"
    assert tables.claim_verdict(math.nan, 0.5) == "-"
    assert tables.std_of([1.0, 3.0]) == tables.mean_std([1.0, 3.0])[1]
