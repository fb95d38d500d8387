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


# ------------------------------------------------------------------------------------- in-process helpers


def call(*args: str) -> tuple[int, str, str]:
    """`distill ARGS` through the console script's entry point in this process: (status, stdout, stderr)."""
    import contextlib
    import io

    from distill.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as stop:
            code = stop.code
    return int(code or 0), out.getvalue(), err.getvalue()


def assert_error_line(result: tuple[int, str, str], fragment: str) -> None:
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- distill list


def listed_names(kind: str, *options: str) -> dict[str, list[str]]:
    """`distill list KIND`: group heading -> the names under it."""
    code, out, err = call("list", kind, *options)
    assert code == 0, err
    groups: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            heading = line.removesuffix(":")
            groups[heading] = []
        elif line.strip():
            groups[heading].append(line.split()[0])
    return groups


def registries() -> dict[str, list[str]]:
    from distill.data import DATASETS
    from distill.models import MODELS
    from distill.objectives import OBJECTIVES
    from distill.recipe.load import builtin_recipes
    from distill.tasks import TASKS

    return {
        "datasets": DATASETS.names(),
        "models": MODELS.names(),
        "objectives": OBJECTIVES.names(),
        "recipes": builtin_recipes(),
        "tasks": TASKS.names(),
    }


@pytest.mark.parametrize("kind", ["datasets", "models", "objectives", "recipes", "tasks"])
def test_list_covers_every_registered_name(kind: str) -> None:
    from distill.tasks import TASKS

    groups = listed_names(kind)
    assert set(groups) <= {*TASKS.names(), "any task"}
    listed = {name for names in groups.values() for name in names}
    assert listed == set(registries()[kind])


def test_list_groups_by_task() -> None:
    datasets = listed_names("datasets")
    assert "digits" in datasets["classification"] and "tinyshakespeare" in datasets["causal_lm"]
    assert "facts" in datasets["causal_lm"]  # no task claims it by name: a packaged LM recipe uses it
    models = listed_names("models", "--task", "causal_lm")
    assert "hf" in models["causal_lm"] and "mlp" not in {n for names in models.values() for n in names}
    recipes = listed_names("recipes", "--task", "classification")
    assert "quickstart" in recipes["classification"] and "lm_shakespeare" not in recipes["classification"]
    objectives = listed_names("objectives")
    assert "dkd" in objectives["classification"] and "opsd" in objectives["causal_lm"]


def test_list_refuses_unknown_kind_and_task() -> None:
    assert_error_line(
        call("list", "modles"), "unknown kind 'modles'; did you mean 'models'? (one of: datasets"
    )
    assert_error_line(call("list", "models", "--task", "lm"), "unknown task 'lm' (one of: causal_lm")


def test_methods_by_task() -> None:
    code, out, _ = call("methods", "--task", "classification")
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert code == 0 and "dkd" in names and "opsd" not in names


# --------------------------------------------------------------------------- run: --set, --seeds, --methods


def test_load_checked_applies_set_seeds_and_methods() -> None:
    from distill.cli import load_checked

    recipe = load_checked(
        None, ["trainer.epochs=2", "data.params.labelled_per_class=5"], "4, 1", "dkd,Student-Alone"
    )
    assert recipe.trainer.epochs == 2 and recipe.data.params["labelled_per_class"] == 5
    assert recipe.seeds == [4, 1]
    assert [m.name for m in recipe.method_list()] == ["student alone", "DKD"]  # in the recipe's order
    whole = load_checked(Path("lm_grid_student_rkl"), methods="student prefix, reverse KL")
    assert [m.name for m in whole.method_list()] == ["student prefix, reverse KL"]  # a name with a comma


def test_set_values_are_read_as_recipe_yaml() -> None:
    from distill.recipe.overrides import parse_set

    assert parse_set(["trainer.fused_loss=on", "seeds=[0, 1]", "trainer.max_grad_norm="]) == {
        "trainer": {"fused_loss": "on", "max_grad_norm": None},  # YAML 1.2: `on` is a string
        "seeds": [0, 1],
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "trainer.epoch=3"], "quickstart: trainer.epoch: unknown key; did you mean 'epochs'?"),
        (["--set", "trainr.epochs=3"], "quickstart: trainr: unknown key; did you mean 'trainer'?"),
        (["--set", "trainer=3"], "quickstart: trainer: expected a mapping"),
        (
            ["--set", "trainer.epochs=2", "--set", "trainer.epochs.x=1"],
            "given both as a value and as a section",
        ),
        (["--seeds", "0,-1"], "--seeds: expected whole numbers from 0 to"),
        (["--seeds", "99999999999"], "--seeds: expected whole numbers"),
        (["--methods", "KD,dkd"], "--methods: unknown method 'KD'"),
        (["--methods", "hinton"], "(one of: student alone, Hinton KD, DKD)"),
    ],
)
def test_run_options_refuse_in_one_line(args: list[str], fragment: str) -> None:
    assert_error_line(call("validate", "quickstart", *args), fragment)
    assert_error_line(call("run", "quickstart", "--no-progress", *args), fragment)


def test_validate_with_options() -> None:
    code, out, err = call(
        "validate", "quickstart", "--seeds", "0,1", "--methods", "dkd", "--set", "trainer.epochs=1"
    )
    assert code == 0, err
    assert "valid, task classification (1 method(s) x 2 seed(s))" in out


# ----------------------------------------------------------------------------- validate: data files exist


def lm_recipe(tmp_path: Path, data: dict) -> Path:
    student = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    student.update(num_attention_heads=2, num_key_value_heads=2)
    recipe = {
        "name": "lm",
        "data": data,
        "student": {"name": "hf", "params": {"config": student}},
        "objectives": [{"name": "cross_entropy"}],
        "output": {"dir": str(tmp_path / "run")},
    }
    return write(tmp_path / "lm.yaml", recipe)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"name": "csv", "params": {"path": "absent.csv"}}, "data.params.path: file not found: absent.csv"),
        ({"name": "jsonl", "params": {"path": "."}}, "data.params.path: is not a file: ."),
        (
            {"name": "jsonl", "params": {"path": "{tmp}/train.jsonl", "test_path": "{tmp}/test.jsonl"}},
            "data.params.test_path: file not found:",
        ),
        ({"name": "tinyshakespeare", "params": {"path": "none.txt"}}, "data.params.path: file not found"),
    ],
)
def test_validate_refuses_missing_data_files(tmp_path: Path, data: dict, fragment: str) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    data["params"] = {k: v.replace("{tmp}", str(tmp_path)) for k, v in data["params"].items()}
    recipe = lm_recipe(tmp_path, data)
    assert_error_line(call("validate", str(recipe)), f"{recipe}: {fragment}")


def test_validate_refuses_missing_image_folder(tmp_path: Path) -> None:
    absent = tmp_path / "no-such-folder"
    setting = f"data.params={{root: {absent}}}"
    args = ("validate", "quickstart", "--set", "data.name=image_folder", "--set", setting)
    assert_error_line(call(*args), f"quickstart: data.params.root: folder not found: {absent}")
    downloads = tiny_recipe(
        tmp_path, data={"name": "cifar100", "params": {"root": str(absent), "download": True}}
    )
    code, out, err = call("validate", str(write(tmp_path / "r.yaml", downloads)))
    assert code == 0 and "valid" in out, err  # the loader makes the folder it downloads into
    assert not absent.exists()  # and validate loads nothing
    absent.mkdir()
    code, out, err = call(*args)
    assert code == 0 and "valid" in out, err


def test_validate_passes_present_data_files(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text\nhello there\n")
    recipe = lm_recipe(tmp_path, {"name": "csv", "params": {"path": str(tmp_path / "train.csv")}})
    code, out, err = call("validate", str(recipe))
    assert code == 0 and "valid, task causal_lm" in out, err


@pytest.mark.slow
def test_run_with_set_seeds_and_methods(tmp_path: Path) -> None:
    import json

    recipe = write(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    code, out, err = call(
        "run", str(recipe), "--no-progress", "--seeds", "5", "--methods", "dkd", "--set", "trainer.epochs=1"
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [(m["name"], [s["seed"] for s in m["seeds"]]) for m in metrics["methods"]] == [("DKD", [5])]
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["trainer"]["epochs"] == 1 and saved["seeds"] == [5]
