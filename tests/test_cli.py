"""The command line on bad input: one line on stderr, exit status 2, no traceback, nothing lost."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.recipe.load import builtin_recipe_text


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def tiny_recipe(tmp_path: Path, **changes) -> dict:
    data = yaml.safe_load(builtin_recipe_text("quickstart"))
    data["trainer"].update(epochs=2, threads=1)
    data["teacher"]["train"]["epochs"] = 1
    data["seeds"] = [0]
    data["output"] = {"dir": str(tmp_path / "run"), "tensorboard": False}
    data.update(changes)
    return data


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0]


BAD = {
    "malformed.yaml": ("name: [unclosed\n", "malformed.yaml line 2 column 1: expected"),
    "not_a_mapping.yaml": ("- just\n- a list\n", "a recipe is a mapping"),
    "unknown_key.yaml": (None, "trainer.epoch: unknown key; did you mean 'epochs'?"),
    "empty_data.yaml": (None, "fewer than labelled_per_class"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_recipes_exit_2_with_one_line(tmp_path: Path, name: str) -> None:
    text, fragment = BAD[name]
    if text is None:
        data = tiny_recipe(tmp_path)
        if name == "unknown_key.yaml":
            data["trainer"]["epoch"] = 3
        else:
            data["data"]["params"]["labelled_per_class"] = 10_000
        text = yaml.safe_dump(data)
    assert_user_error(run_cli("run", str(write(tmp_path / name, text))), fragment)


def test_missing_recipe_file(tmp_path: Path) -> None:
    assert_user_error(run_cli("validate", str(tmp_path / "absent.yaml")), "recipe file not found")


def test_class_count_mismatch(tmp_path: Path) -> None:
    from distill import build_model
    from distill.io import save_tensors

    weights = tmp_path / "teacher.safetensors"
    save_tensors(weights, build_model("small_cnn", num_classes=7, input_shape=(1, 8, 8)).state_dict())
    data = tiny_recipe(tmp_path)
    data["teacher"]["checkpoint"] = str(weights)
    assert_user_error(run_cli("run", str(write(tmp_path / "r.yaml", data))), "does not fit the teacher model")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = run_cli("--debug", "validate", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_validate_and_methods() -> None:
    result = run_cli("validate", "src/distill/recipes/quickstart.yaml", cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "valid, task classification (3 method(s) x 3 seed(s))" in result.stdout
    listing = run_cli("methods").stdout.splitlines()
    names = [line.split()[0] for line in listing if line.strip()]
    for expected in ("cross_entropy", "hinton_kd", "dkd"):
        assert expected in names
    assert any("Distilling the Knowledge in a Neural Network" in line for line in listing)


@pytest.mark.slow
def test_run_then_refuse_to_overwrite_then_resume(tmp_path: Path) -> None:
    recipe = write(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    first = run_cli("run", str(recipe), "--no-progress")
    assert first.returncode == 0, first.stderr
    out = tmp_path / "run"
    for name in ("report.md", "metrics.json", "learning_curves.png", "recipe.yaml"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "| Hinton KD |" in report and "± " in report
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    again = run_cli("run", str(recipe), "--no-progress")
    assert_user_error(again, "holds an earlier run")
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    other = tiny_recipe(tmp_path)
    other["trainer"]["epochs"] = 3
    refused = run_cli("run", str(write(tmp_path / "other.yaml", other)), "--resume", "--no-progress")
    assert_user_error(refused, "different recipe")

    resumed = run_cli("run", str(recipe), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
