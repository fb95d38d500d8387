"""Language-model recipes through the command line: an end-to-end distillation, and user mistakes that
end in one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe, write_jsonl

from distill.cli import main


def _recipe(tmp_path: Path, tokenizer_dir: Path, **changes) -> dict:
    recipe = {
        "name": "lm-tiny",
        "data": {
            "name": "jsonl",
            "params": {
                "path": str(tmp_path / "train.jsonl"),
                "tokenizer": str(tokenizer_dir),
                "max_length": 48,
            },
            "batch_size": 8,
            "eval_batch_size": 16,
        },
        "teacher": {"name": "hf", "params": {"config": TEACHER}, "train": {"epochs": 2}},
        "student": {"name": "hf", "params": {"config": STUDENT}},
        "methods": [
            {"name": "forward KL", "objectives": [{"name": "forward_kl"}]},
            {
                "name": "seq-KD + KL",
                "objectives": [
                    {"name": "cross_entropy", "weight": 0.5},
                    {"name": "forward_kl", "weight": 0.5},
                ],
                "source": {
                    "name": "teacher_generations",
                    "params": {"do_sample": False, "max_new_tokens": 20},
                },
            },
        ],
        "optimizer": {"lr": 0.005},
        "trainer": {"epochs": 2, "threads": 1},
        "seeds": [0],
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    recipe.update(changes)
    return recipe


@pytest.fixture
def files(tmp_path: Path) -> Path:
    rows = addition_rows(96)
    write_jsonl(tmp_path / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(tmp_path / "tok"))
    return tmp_path


@pytest.mark.slow
def test_recipe_distils_a_tiny_llama_end_to_end(files: Path) -> None:
    tokenizer = bpe(addition_rows(96))
    recipe = _recipe(files, files / "tok")
    # The teacher's embedding has 8 padding rows and sits in bf16; the student is float32.
    recipe["teacher"]["params"] = {
        "config": {**TEACHER, "vocab_size": len(tokenizer) + 8},
        "dtype": "bfloat16",
    }
    path = files / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("padding rows") == 1
    run = files / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "lm" and [m["name"] for m in metrics["methods"]] == [
        "forward KL",
        "seq-KD + KL",
    ]
    for method in metrics["methods"]:
        final = method["seeds"][0]["final"]
        assert {"perplexity", "teacher_kl", "agreement", "exact_match", "tokens_per_second"} <= set(final)
    assert len(list((run / "generations").glob("*.jsonl"))) == 1
    report = (run / "report.md").read_text()
    assert "val ppl" in report and "## Samples" in report and "exact match %" in report


def _run_cli(monkeypatch, capsys, recipe: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(path), "--no-progress"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_different_tokenizers_exit_2_naming_both(files: Path, monkeypatch, capsys) -> None:
    words = [{"text": "the quick brown fox jumps over the lazy dog, then the fox sleeps"}] * 20
    bpe(words, vocab_size=300).save_pretrained(str(files / "other"))
    recipe = _recipe(files, files / "tok")
    recipe["teacher"]["params"]["tokenizer"] = str(files / "other")
    line = _run_cli(monkeypatch, capsys, recipe, files / "r.yaml")
    assert "teacher tokenizer" in line and str(files / "other") in line and str(files / "tok") in line
    assert not (files / "run").exists()  # nothing trained, nothing written


def test_missing_completion_field_exit_2(files: Path, monkeypatch, capsys) -> None:
    write_jsonl(files / "train.jsonl", [{"prompt": r["prompt"]} for r in addition_rows(10)])
    line = _run_cli(monkeypatch, capsys, _recipe(files, files / "tok"), files / "r.yaml")
    assert "row 1 has no 'completion' field" in line and "train.jsonl" in line


def test_empty_data_file_exit_2(files: Path, monkeypatch, capsys) -> None:
    (files / "train.jsonl").write_text("")
    line = _run_cli(monkeypatch, capsys, _recipe(files, files / "tok"), files / "r.yaml")
    assert line == f"error: data: {files / 'train.jsonl'} is empty"


def test_teacher_generations_need_a_language_model_recipe(files: Path, monkeypatch, capsys) -> None:
    from distill.recipe.load import builtin_recipe_text

    recipe = yaml.safe_load(builtin_recipe_text("quickstart"))
    recipe["source"] = {"name": "teacher_generations"}
    recipe["output"] = {"dir": str(files / "run")}
    assert "needs a language-model recipe" in _run_cli(monkeypatch, capsys, recipe, files / "q.yaml")


def test_a_rewritten_data_file_trains_a_new_teacher(files: Path) -> None:
    """The trained-teacher cache is keyed by the data's content, not only by the recipe's text."""
    from rich.console import Console

    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    def run(out: str) -> str:
        data = _recipe(
            files, files / "tok", methods=[{"name": "ce", "objectives": [{"name": "cross_entropy"}]}]
        )
        data["trainer"]["epochs"] = 1
        data["teacher"]["train"]["epochs"] = 1
        data["output"]["dir"] = str(files / out)
        result = run_recipe(recipe_from_dict(data), progress=False, console=Console(quiet=True))
        assert result.teacher is not None
        return result.teacher.source

    assert run("first") == "trained"
    assert run("same") == "cache"
    write_jsonl(files / "train.jsonl", addition_rows(96, seed=7))  # same file name, other rows
    assert run("rewritten") == "trained"


def test_resumed_finished_run_reports_each_students_own_samples(files: Path) -> None:
    """`--resume` of a run whose students were done: the report's samples are still theirs (they used to
    come out empty, or be the generations of a teacher trained in the resumed session)."""
    from rich.console import Console

    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    methods = [
        {"name": "ce", "objectives": [{"name": "cross_entropy"}]},
        {"name": "kl", "objectives": [{"name": "forward_kl"}]},
    ]
    data = _recipe(files, files / "tok", methods=methods)
    data["trainer"]["epochs"] = 1
    data["teacher"]["train"] = {"epochs": 1, "cache": False}  # the resumed session trains it again
    recipe = recipe_from_dict(data)
    first = run_recipe(recipe, progress=False, console=Console(quiet=True))
    resumed = run_recipe(recipe, resume=True, progress=False, console=Console(quiet=True))
    for name in ("ce", "kl"):
        assert first.extra["samples"][name], name
        assert resumed.extra["samples"][name] == first.extra["samples"][name], name
