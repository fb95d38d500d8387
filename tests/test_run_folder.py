"""`--overwrite` deletes only what distill wrote (the run manifest), never the recipe or its inputs; two runs
never share a folder (lock); method names never share a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock

from distill.errors import UserError
from distill.recipe.load import recipe_from_dict
from distill.runfolder import LOCK, MANIFEST
from test_security import assert_one_line, cli, recipe, snapshot


def plant_user_files(folder: Path) -> dict[str, bytes]:
    """A user's project folder: a git repository, data, notes."""
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "data").mkdir()
    (folder / "data" / "train.csv").write_text("text,label\nhi,0\n")
    (folder / "notes.txt").write_text("my notes")
    return snapshot(folder)


def test_overwrite_removes_only_what_the_run_wrote(tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "project"
    project.mkdir()
    mine = plant_user_files(project)
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(project)))
    assert code == 0, err
    listed = json.loads((project / MANIFEST).read_text())["written"]
    assert {"recipe.yaml", "methods", "report.md", "metrics.json"} <= set(listed)
    assert not {".git", "data", "notes.txt"} & set(listed)

    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(project)))
    assert_one_line(code, err, "holds an earlier run")
    (project / "methods" / "distill" / "seed-0" / "stale.txt").write_text("from the first run")
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(project)), "--overwrite")
    assert code == 0, err
    after = snapshot(project)
    assert {name: after[name] for name in mine} == mine  # every user file, byte for byte
    assert not (project / "methods" / "distill" / "seed-0" / "stale.txt").exists()
    assert (project / "report.md").exists()


def test_overwrite_never_empties_the_folder_holding_the_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "project"
    project.mkdir()
    plant_user_files(project)
    monkeypatch.chdir(project)
    code, err = cli(monkeypatch, capsys, project / "my-recipe.yaml", recipe(""))  # output.dir '' = here
    assert code == 0, err
    before = snapshot(project)
    code, err = cli(monkeypatch, capsys, project / "my-recipe.yaml", recipe(""), "--overwrite")
    assert_one_line(code, err, "which this recipe reads")
    assert snapshot(project) == before


def test_overwrite_never_deletes_a_checkpoint_the_recipe_reads(tmp_path: Path, monkeypatch, capsys) -> None:
    first = tmp_path / "first"
    teacher = {"name": "mlp", "params": {"hidden": [16]}, "train": {"epochs": 1}}
    code, err = cli(monkeypatch, capsys, tmp_path / "a.yaml", recipe(str(first), teacher=teacher))
    assert code == 0, err
    weights = next((first / "teacher").rglob("model.safetensors"))
    reading = {"name": "mlp", "params": {"hidden": [16]}, "checkpoint": str(weights)}
    before = snapshot(first)
    code, err = cli(
        monkeypatch, capsys, tmp_path / "b.yaml", recipe(str(first), teacher=reading), "--overwrite"
    )
    assert_one_line(code, err, "which this recipe reads")
    assert snapshot(first) == before


def test_overwrite_refuses_a_folder_without_manifest(tmp_path: Path, monkeypatch, capsys) -> None:
    """A folder that merely looks like a run (a user's own recipe.yaml) is never emptied."""
    project = tmp_path / "project"
    project.mkdir()
    plant_user_files(project)
    (project / "recipe.yaml").write_text("name: mine\n")
    before = snapshot(project)
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(project)))
    assert_one_line(code, err, "holds an earlier run")
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(project)), "--overwrite")
    assert_one_line(code, err, "no run manifest")
    assert snapshot(project) == before


def test_a_file_the_run_would_overwrite_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "learning_curves.png").write_bytes(b"my own plot")
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(project)))
    assert_one_line(code, err, "already has 'learning_curves.png'")
    assert snapshot(project) == {"learning_curves.png": b"my own plot"}


def test_a_folder_in_use_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(str(out / LOCK), timeout=0):  # another run holds the folder
        code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(out)))
    assert_one_line(code, err, "in use by another distill run")
    assert sorted(p.name for p in out.iterdir()) == [LOCK]


def test_an_output_folder_under_a_file_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "file").write_text("x")
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(tmp_path / "file" / "run")))
    assert_one_line(code, err, "is a file, not a folder")


def test_method_names_sharing_a_folder_are_refused() -> None:
    methods = [
        {"name": "KD", "objectives": [{"name": "hinton_kd"}]},
        {"name": "kd!", "objectives": [{"name": "hinton_kd"}]},
    ]
    with pytest.raises(UserError, match="would share the folder methods/kd"):
        recipe_from_dict(recipe("x", objectives=None, methods=methods))


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    from distill.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
