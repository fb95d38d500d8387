"""`distill bench text`: the suites, and the quick suite end to end (one seed) with its results file."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import missing_data, require_data
from distill.bench.text import TEXT_SUITES, run_text_bench, text_suite_recipes
from distill.errors import UserError
from distill.pretrained import pretrained_folder


def test_every_suite_recipe_is_valid_and_names_its_methods() -> None:
    for suite in TEXT_SUITES:
        for recipe in text_suite_recipes(suite):
            names = [m.name for m in recipe.method_list()]
            assert names[:2] == ["student alone", "KD"], recipe.name  # the two baselines of every table
    standard = text_suite_recipes("standard")
    methods = {m.name for m in standard[0].method_list()}
    assert {"LELP", "Talking Models + KD", "embedding MSE + KD"} <= methods
    assert [m.name for m in standard[0].method_list()] == [m.name for m in standard[1].method_list()]


def test_an_unknown_suite_seed_count_or_recipe_is_one_line() -> None:
    with pytest.raises(UserError, match="did you mean 'quick'"):
        text_suite_recipes("quik")
    with pytest.raises(UserError, match="has no recipe 'bench_text_sms'"):
        text_suite_recipes("standard", only=["bench_text_sms"])
    only = text_suite_recipes("standard", only=["bench_text_fortunes"])
    assert [r.name for r in only] == ["bench-text-fortunes"]
    with pytest.raises(UserError, match="at least 1"):
        text_suite_recipes("quick", seeds=0)


@pytest.mark.slow
def test_the_quick_suite_runs_and_answers_the_goals(tmp_path: Path) -> None:
    require_data("textcls/SMSSpamCollection.tsv")
    try:
        pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        missing_data(str(err))
    bench = run_text_bench("quick", out=tmp_path / "bench", seeds=1)
    text = (tmp_path / "bench" / "results.md").read_text()
    assert "F1 % (macro)" in text and "vs KD" in text
    assert "- Speed: the student is" in text and "- S17 (LELP >= KD" in text
    assert (tmp_path / "bench" / "results.json").is_file()
    assert (tmp_path / "bench" / "bench-text-quick" / "report.md").is_file()
    assert bench.results[0].teacher is not None
    with pytest.raises(UserError, match="holds an earlier benchmark"):
        run_text_bench("quick", out=tmp_path / "bench", seeds=1)
