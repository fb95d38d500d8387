"""Issue 21, the silent failures a new user met: `--resume` after a run stopped while its teacher trained
accepted an edited recipe; nothing was printed off a terminal; tables broke at 80 columns; packaged recipes
set `eval_every` as if it counted steps and pinned threads; a student larger than its teacher passed
unremarked. (The language-model refusals are in `tests/lm/test_lm_refusals.py`.)"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from rich.progress import Progress, TimeRemainingColumn
from torch import nn

from distill import build_data, build_model, fit
from distill.experiment import run_recipe, warn_larger_student
from distill.recipe.load import builtin_recipe_text, builtin_recipes, recipe_from_dict
from distill.runfolder import MANIFEST, manifest_recipe
from distill.tables import rich_table
from distill.tasks.results import TeacherInfo
from distill.train import logs
from distill.train.logs import LineProgress, progress_bar
from test_security import assert_one_line, cli, recipe

# ------------------------------------------------------------------ --resume after a stopped teacher


class StoppedWhileTheTeacherTrained(Exception):
    """Stands for a kill while the teacher trains: the run folder exists, its `recipe.yaml` copy does not."""


def _with_teacher(out: Path, hidden: int = 8) -> dict:
    return recipe(
        str(out),
        teacher={"name": "mlp", "params": {"hidden": [32]}, "train": {"epochs": 1, "cache": False}},
        student={"name": "mlp", "params": {"hidden": [hidden]}},
    )


def _stop_teacher(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    def stopped(*args: object, **kwargs: object) -> None:
        raise StoppedWhileTheTeacherTrained

    with monkeypatch.context() as patch:
        patch.setattr("distill.tasks.teacher_store.fit", stopped)
        with pytest.raises(StoppedWhileTheTeacherTrained):
            run_recipe(
                recipe_from_dict(_with_teacher(out)), progress=False, console=Console(file=io.StringIO())
            )
    assert (out / MANIFEST).exists() and not (out / "recipe.yaml").exists()


def test_resume_after_a_stop_during_teacher_training_refuses_an_edited_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _stop_teacher(monkeypatch, out)
    # The manifest kept the recipe before the teacher started (the `recipe.yaml` copy comes later).
    assert manifest_recipe(out)["student"]["params"] == {"hidden": [8]}

    edited = _with_teacher(out, hidden=12)
    code, err = cli(monkeypatch, capsys, tmp_path / "edited.yaml", edited, "--resume")
    assert_one_line(code, err, "was started from a different recipe")
    assert not (out / "recipe.yaml").exists()

    code, err = cli(monkeypatch, capsys, tmp_path / "same.yaml", _with_teacher(out), "--resume")
    assert code == 0, err
    assert yaml.safe_load((out / "recipe.yaml").read_text())["student"]["params"] == {"hidden": [8]}
    assert "recipe" in json.loads((out / MANIFEST).read_text())


# ------------------------------------------------------------------ progress off a terminal


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_progress_prints_plain_lines_with_an_eta() -> None:
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(every=30, stream=out, clock=clock)
    with bar:
        task = bar.add_task("teacher", total=100, completed=0, status="")
        for step in range(1, 101):
            clock.now = 1.0 * step  # one step a second
            bar.update(task, advance=1, status=f"epoch 1/2 loss {1 / step:.4f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "teacher: step 30/100 (30%), epoch 1/2 loss 0.0333, elapsed 0:00:30, ETA 0:01:10"
    assert [line.split(",")[0] for line in lines] == [
        f"teacher: step {n}/100 ({n}%)" for n in (30, 60, 90, 100)
    ]
    assert lines[-1].endswith("elapsed 0:01:40, done")


def test_a_short_run_off_a_terminal_prints_nothing() -> None:
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(every=30, stream=out, clock=clock)
    task = bar.add_task("KD seed 0", total=10, completed=0, status="")
    for step in range(10):
        clock.now = step
        bar.update(task, advance=1, status="")
    assert out.getvalue() == ""


def test_a_resumed_bar_estimates_from_the_steps_it_ran() -> None:
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(every=10, stream=out, clock=clock)
    task = bar.add_task("teacher", total=100, completed=50, status="")
    for step in range(10):
        clock.now = 2.0 * (step + 1)  # two seconds a step, whatever ran before the resume
        bar.update(task, advance=1, status="")
    assert out.getvalue().splitlines() == [
        "teacher: step 55/100 (55%), elapsed 0:00:10, ETA 0:01:30",
        "teacher: step 60/100 (60%), elapsed 0:00:20, ETA 0:01:20",
    ]


def test_the_bar_on_a_terminal_has_an_eta_and_plain_lines_elsewhere() -> None:
    terminal = progress_bar(True, Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(terminal, Progress)
    assert any(isinstance(column, TimeRemainingColumn) for column in terminal.columns)
    assert isinstance(progress_bar(True, Console(file=io.StringIO())), LineProgress)
    off = progress_bar(False, Console(file=io.StringIO()))
    assert isinstance(off, Progress) and off.disable


def test_training_off_a_terminal_logs_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `distill run ... > log.txt` sees: lines from `fit`, not 97 s of silence."""
    monkeypatch.setattr(logs, "LINE_SECONDS", 0.0)  # a line at every step
    data = build_data("digits", labelled_per_class=4)
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[8])
    fit(model, data.train, epochs=1, batch_size=16, progress=True, tensorboard=False, label="teacher")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("teacher: step")]
    assert lines and re.fullmatch(
        r"teacher: step 1/\d+ \(\d+%\), epoch 1/1 loss [\d.]+, elapsed .*", lines[0]
    )
    assert lines[-1].endswith("done") and all("ETA" in line for line in lines[:-1])


# ------------------------------------------------------------------ tables at 80 columns

LM_HEADERS = [
    "method", "trainable params", "val ppl", "val CE (nats)", "token acc %", "KL(T‖S)", "agree %",
    "exact match %", "train tok/s", "train s",
]  # fmt: skip
LM_ROWS = [
    ["teacher", "1,234,567", "12.34", "2.513", "45.67", "-", "-", "12.00", "-", "97.3"],
    ["reverse_kl_tsd", "123,456", "15.23 ± 0.12", "2.723 ± 0.010", "40.12 ± 0.50", "0.123 ± 0.004",
     "80.12 ± 1.00", "10.00 ± 2.00", "123,456", "45.6"],
]  # fmt: skip
CLASSIFIER_HEADERS = [
    "method", "params", "acc % (last)", "acc % (best ep.)", "agree %", "KL(T‖S)", "ECE %", "train s"
]  # fmt: skip
CLASSIFIER_ROWS = [
    ["teacher", "1,234,567", "92.34", "93.00", "-", "-", "2.50", "97.3"],
    ["Hinton KD (T=4)", "123,456", "90.23 ± 0.12", "91.23 ± 0.10", "95.12 ± 0.50", "0.123 ± 0.004",
     "2.12 ± 1.00", "45.6"],
]  # fmt: skip


def _printed(table: object, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text().splitlines()


@pytest.mark.parametrize(
    ("headers", "rows", "left_out"),
    [
        (LM_HEADERS, LM_ROWS, ["trainable params", "train tok/s"]),
        (CLASSIFIER_HEADERS, CLASSIFIER_ROWS, ["params"]),
    ],
)
def test_tables_fit_80_columns_without_cutting_a_number(headers, rows, left_out) -> None:
    lines = _printed(rich_table("lm-arithmetic: 3 seeds", headers, rows), 80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert "…" not in text
    for row in rows:  # every kept number whole: the mean on one line, its spread on the next
        for header, cell in zip(headers, row, strict=True):
            if header not in left_out:
                mean, _, std = cell.partition(" ± ")
                assert re.search(rf"(^|\s){re.escape(mean)}(\s|$)", text, re.M), (cell, text)
                assert not std or f"± {std}" in text
    assert f"left out to fit 80 columns: {', '.join(left_out)}" in " ".join(text.split())


def test_a_wide_terminal_keeps_the_full_table() -> None:
    lines = _printed(rich_table("t", LM_HEADERS, LM_ROWS), 200)
    assert any(all(h in line for h in LM_HEADERS) for line in lines)
    assert any("15.23 ± 0.12" in line for line in lines) and "left out" not in "\n".join(lines)


@pytest.mark.parametrize("width", [40, 60, 100])
def test_no_table_line_passes_the_terminal_width(width: int) -> None:
    for headers, rows in ((LM_HEADERS, LM_ROWS), (CLASSIFIER_HEADERS, CLASSIFIER_ROWS)):
        assert max(len(line) for line in _printed(rich_table("t", headers, rows), width)) <= width


# ------------------------------------------------------------------ recipes and the larger student


def test_packaged_recipes_evaluate_in_epochs_and_pin_threads_only_with_a_reason() -> None:
    for name in builtin_recipes():
        text = builtin_recipe_text(name)
        document = yaml.safe_load(text)
        trainer = document.get("trainer") or {}
        # eval_every counts epochs: a value past the run's epochs (the old `eval_every: 100`) says steps
        assert trainer.get("eval_every", 1) <= trainer.get("epochs", 1), name
        if "threads" in trainer:
            assert re.search(r"#.*thread", text), f"{name}: threads pinned without a comment saying why"


def test_a_student_larger_than_its_teacher_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    teacher = TeacherInfo("trained", parameters=50, metrics={}, train_seconds=0.0, history=[])
    warn_larger_student(nn.Linear(10, 10), teacher)  # 110 parameters
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: the student has more parameters (110) than the teacher (50); "
        "are student and teacher swapped?"
    ]
    warn_larger_student(nn.Linear(4, 4), teacher)  # 20: smaller, as distillation means
    warn_larger_student(nn.Linear(10, 10), None)  # no teacher
    assert capsys.readouterr().err == ""


def test_a_run_with_a_larger_student_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = recipe(
        str(tmp_path / "run"),
        teacher={"name": "mlp", "params": {"hidden": [4]}, "train": {"epochs": 1}},
        student={"name": "mlp", "params": {"hidden": [64]}},
        seeds=[0, 1],
    )
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", data)
    assert code == 0, err
    assert err.count("warning: the student has more parameters") == 1
