"""`benchmarks/lm_gap.py` (S24 TAID at growing teacher-student gaps): the teacher sizes span at least 30x,
the verdict rule on made-up numbers, the results-file rule, and the quick run end to end (table and plot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench_helpers import load_benchmark
from data_helpers import require_data

lm_gap = load_benchmark("lm_gap")


def _parameters(shape: dict, vocab: int = 1024) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(shape)
    kind = settings.pop("model_type")
    config = AutoConfig.for_model(kind, vocab_size=vocab, **settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_four_teachers_spanning_30x_all_larger_than_the_student() -> None:
    recipes = [lm_gap.recipe(t, quick=False, seeds=[0], baseline=False) for t in lm_gap.TEACHERS]
    sizes = [_parameters(r["teacher"]["params"]["config"]) for r in recipes]
    student = _parameters(recipes[0]["student"]["params"]["config"])
    assert len(sizes) >= 4 and sizes == sorted(sizes)
    assert sizes[-1] / sizes[0] >= 30
    assert sizes[0] > student


def _gap(name: str, taid: list[float], kl: list[float]) -> dict:
    methods = {"TAID": {"ce": taid}, "forward KL": {"ce": kl}}
    return {"teacher": name, "methods": methods}


def test_the_verdict_rule() -> None:
    small = _gap("T1", [4.0, 4.02], [4.0, 4.02])
    assert lm_gap.verdict([small, _gap("T4", [4.0, 4.01], [4.3, 4.31])])[0] == "reproduced"
    assert lm_gap.verdict([small, _gap("T4", [4.3, 4.31], [4.0, 4.01])])[0] == "not reproduced"
    mark, why = lm_gap.verdict([small, _gap("T4", [4.0, 4.1], [4.05, 4.15])])
    assert mark == "within noise" and "T1" in why  # forward KL did best at the smallest gap
    assert lm_gap.verdict([_gap("T1", [4.0], [4.5])])[0] == "within noise"  # one seed: no spread to judge by


def test_a_quick_run_refuses_the_full_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        lm_gap.main(["--quick", "--out", str(lm_gap.ROOT / "benchmarks" / "results" / "lm_gap.md")])
    assert stop.value.code == 2
    assert "does not write over the full run's results" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quick_run_writes_a_table_and_a_plot(tmp_path: Path) -> None:
    require_data("text/tinyshakespeare.txt")
    out = tmp_path / "lm_gap.md"
    assert lm_gap.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert (tmp_path / "lm_gap.png").stat().st_size > 10_000
    rows = [line for line in text.splitlines() if line.startswith("| T")]
    assert len(rows) == 2 * len(lm_gap.TEACHERS)  # the CE table and the KL table
    assert any(mark in text for mark in ("**reproduced**", "**not reproduced**", "**within noise**"))
    # the numbers behind the plot are kept, and the plot can be redrawn from them alone
    (tmp_path / "lm_gap.png").unlink()
    assert lm_gap.main(["--plot-from", str(tmp_path / "lm_gap.json")]) == 0
    assert (tmp_path / "lm_gap.png").stat().st_size > 10_000
