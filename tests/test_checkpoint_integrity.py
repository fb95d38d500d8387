"""Checkpoints are verified before a run resumes from them (issue 22 item 10).

Every file of a checkpoint has its sha256 in `checksums.json`, written last. A resume checks the one `latest`
names whole (checksums, step, this run's fingerprint and seed, the state's schema); a damaged one is passed
over for the previous good checkpoint with one warning line, and when none is good the run stops in one line
(never a silent restart from step 0). A checkpoint of another run is refused. The run folder's other damage
(a torn last line of `metrics.jsonl`, an empty `recipe.yaml`, a loop of symbolic links) is one line or one
warning, never a traceback.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distill import build_data, build_model, fit
from distill.errors import UserError
from distill.io import sha256_file
from distill.train.checkpoint import (
    CHECKSUMS,
    FILES,
    CheckpointDamaged,
    CheckpointRefused,
    verify_checkpoint,
)
from distill.train.config import FitResult
from distill.train.seeding import seed_everything

SETTINGS: dict[str, Any] = dict(
    epochs=2, batch_size=16, checkpoint_every=2, log_every=1, progress=False, tensorboard=False, device="cpu"
)  # 50 samples: 4 steps per epoch, checkpoints at steps 2, 4, 6, 8 (the last two kept)


@pytest.fixture(scope="module")
def data():
    return build_data("digits", labelled_per_class=5)


def _fit(data, run_dir: Path, *, seed: int = 0, resume: bool = False, stop: int | None = None) -> FitResult:
    seed_everything(1000 + resume)  # a resumed process starts with other weights and RNG
    student = build_model("mlp", num_classes=10, input_shape=data.input_shape, hidden=[8])
    return fit(
        student,
        data.train,
        eval_data=data.test,
        run_dir=run_dir,
        resume=resume,
        seed=seed,
        stop_after_steps=stop,
        **SETTINGS,
    )


@pytest.fixture(scope="module")
def full(data, tmp_path_factory: pytest.TempPathFactory) -> FitResult:
    """The uninterrupted run every resumed one must end like."""
    return _fit(data, tmp_path_factory.mktemp("full"))


@pytest.fixture
def cut(data, tmp_path: Path) -> Path:
    """A run stopped after step 6: checkpoints step-4 and step-6, `latest` naming step-6."""
    result = _fit(data, tmp_path / "cut", stop=6)
    assert not result.completed
    return tmp_path / "cut"


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _reseal(folder: Path) -> None:
    """Recompute the checksums, as a hand edit that knows the format would (forged)."""
    sums = json.loads((folder / CHECKSUMS).read_text())
    sums["files"] = {name: sha256_file(folder / name) for name in sums["files"]}
    (folder / CHECKSUMS).write_text(json.dumps(sums))


def _edit_state(folder: Path, change: Any) -> None:
    state = json.loads((folder / "state.json").read_text())
    change(state)
    (folder / "state.json").write_text(json.dumps(state))


def _warnings(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def _same_end(resumed: FitResult, full: FitResult) -> None:
    assert resumed.completed and resumed.steps == full.steps == 8
    for key in ("accuracy", "loss", "train_loss"):
        assert resumed.final[key] == full.final[key], key


def _one_line(err: pytest.ExceptionInfo[UserError], *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------ checksums


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint(data, cut, full, capsys) -> None:
    """Before: a flipped byte in model.safetensors resumed silently (and ended at another accuracy)."""
    _flip(_step(cut, 6) / "model.safetensors")
    capsys.readouterr()
    resumed = _fit(data, cut, resume=True)
    (warning,) = _warnings(capsys)
    assert "step-00000006: model.safetensors fails its checksum" in warning
    assert "resuming from step-00000004" in warning
    _same_end(resumed, full)  # steps 5-6 ran again: the uninterrupted run's metrics
    # The damaged checkpoint was replaced when step 6 was saved again; what is kept verifies.
    kept = sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000006", "step-00000008"]
    for name in kept:
        verify_checkpoint(cut / "checkpoints" / name, fingerprint="")
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 9))  # each step logged once


@pytest.mark.parametrize("name", FILES)
def test_every_file_of_a_checkpoint_is_checksummed(cut, name: str) -> None:
    _flip(_step(cut, 6) / name)
    with pytest.raises(CheckpointDamaged) as err:
        verify_checkpoint(_step(cut, 6), fingerprint="")
    _one_line(err, name)
    # A flip in a safetensors header (all there is of an empty state dict) is named as such.
    assert "fails its checksum" in str(err.value) or "not a readable safetensors file" in str(err.value)
    verify_checkpoint(_step(cut, 4), fingerprint="")  # the other one is untouched


def test_no_good_checkpoint_is_one_line_never_a_restart(data, cut, capsys) -> None:
    for step in (4, 6):
        _flip(_step(cut, step) / "optimizer.safetensors")
    before = {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as err:
        _fit(data, cut, resume=True)
    _one_line(err, "step-00000006: optimizer.safetensors fails its checksum", "(and 1 older: none is good)")
    assert {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()} == before  # nothing written


def test_a_checkpoint_without_its_checksums_is_damaged(data, cut, full, capsys) -> None:
    (_step(cut, 6) / CHECKSUMS).unlink()
    capsys.readouterr()
    _same_end(_fit(data, cut, resume=True), full)
    (warning,) = _warnings(capsys)
    assert f"has no {CHECKSUMS}" in warning


# ------------------------------------------------------------------------------------ identity


def test_a_hand_edited_step_is_not_believed(data, cut, full, capsys) -> None:
    """Before: `step` edited in state.json was believed (the run went on from there)."""

    def rewind(state):
        state["step"] = 1

    _edit_state(_step(cut, 6), rewind)
    with pytest.raises(CheckpointDamaged, match="state.json fails its checksum"):
        verify_checkpoint(_step(cut, 6), fingerprint="")
    _reseal(_step(cut, 6))  # even with checksums that match: the step is the folder's
    with pytest.raises(CheckpointDamaged, match="malformed 'step'"):
        verify_checkpoint(_step(cut, 6), fingerprint="")
    capsys.readouterr()
    _same_end(_fit(data, cut, resume=True), full)
    assert len(_warnings(capsys)) == 1


def test_another_seeds_weights_are_refused(data, cut, tmp_path: Path, capsys) -> None:
    """Before: seed 0's weights put into seed 1's checkpoints were taken."""
    other = tmp_path / "seed-1"
    _fit(data, other, seed=1, stop=6)
    for step in (4, 6):
        shutil.copy(_step(cut, step) / "model.safetensors", _step(other, step) / "model.safetensors")
    with pytest.raises(UserError) as err:
        _fit(data, other, seed=1, resume=True)
    _one_line(err, "model.safetensors fails its checksum", "no checkpoint to resume from")
    # Seed 0's whole checkpoints (consistent in themselves) in seed 1's run: refused, not passed over.
    shutil.rmtree(other / "checkpoints")
    shutil.copytree(cut / "checkpoints", other / "checkpoints")
    with pytest.raises(CheckpointRefused) as refused:
        _fit(data, other, seed=1, resume=True)
    _one_line(refused, "belongs to another run (seed 0, this run's seed 1)")


def test_the_runs_fingerprint_covers_the_seed(tmp_path: Path, monkeypatch, capsys) -> None:
    """Through the runner: seed 0's checkpoints in seed 1's folder are another run's."""
    recipe = _recipe(tmp_path / "run", seeds=[0, 1])
    code, err = _cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe)
    assert code == 0, err
    (seeds,) = (tmp_path / "run" / "methods").iterdir()  # the one method's folder
    shutil.rmtree(seeds / "seed-1" / "checkpoints")
    shutil.copytree(seeds / "seed-0" / "checkpoints", seeds / "seed-1" / "checkpoints")
    code, err = _cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe, "--resume")
    _assert_one_line(code, err, "belongs to another recipe or model (fingerprint differs)")


def test_an_older_checkpoint_is_refused_naming_its_version(data, cut) -> None:
    for step in (4, 6):
        (_step(cut, step) / CHECKSUMS).unlink()

        def older(state):
            state["format"] = 1

        _edit_state(_step(cut, step), older)
    with pytest.raises(CheckpointRefused) as err:
        _fit(data, cut, resume=True)
    _one_line(err, "older version of distill (format 1", "--overwrite")


# ------------------------------------------------------------------------------------ malformed state


def _no_scheduler(state):
    del state["scheduler"]


def _bad_rng(state):
    state["rng"] = {"numpy": [], "python": []}


def _bad_history(state):
    state["history"] = "none"


def _bad_optimizer(state):
    state["optimizer"]["param_groups"] = [{"params": [0]}]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_no_scheduler, "state.json has no 'scheduler'"),
        (_bad_rng, "malformed 'rng'"),
        (_bad_history, "malformed 'history'"),
        (_bad_optimizer, "does not fit this run's model or state"),
    ],
)
def test_a_malformed_state_is_a_damaged_checkpoint(data, cut, full, capsys, change, fragment: str) -> None:
    """Before: a missing `scheduler` key was a KeyError traceback."""
    _edit_state(_step(cut, 6), change)
    _reseal(_step(cut, 6))  # checksums that match: the schema itself is checked
    capsys.readouterr()
    _same_end(_fit(data, cut, resume=True), full)
    (warning,) = _warnings(capsys)
    assert fragment in warning and "resuming from step-00000004" in warning


# ------------------------------------------------------------------------------------ the pointer


def test_latest_naming_a_missing_step_falls_back_then_refuses(data, cut, full, capsys) -> None:
    """Before: `latest` naming a missing step restarted the run from step 0, silently."""
    (cut / "checkpoints" / "latest").write_text("step-00000099\n")
    capsys.readouterr()
    _same_end(_fit(data, cut, resume=True), full)
    (warning,) = _warnings(capsys)
    assert "step-00000099 is missing; resuming from step-00000006" in warning
    for step in (6, 8):
        shutil.rmtree(_step(cut, step))
    (cut / "checkpoints" / "latest").write_text("step-00000008\n")
    with pytest.raises(UserError) as err:
        _fit(data, cut, resume=True)
    _one_line(err, "step-00000008 is missing", "no checkpoint to resume from")


def test_what_a_killed_save_left_is_removed(data, cut, full) -> None:
    stale = cut / "checkpoints" / ".step-00000007.partial"
    stale.mkdir()
    (stale / ".model.safetensors.x1y2.tmp").write_bytes(b"\0" * 1024)
    (cut / "checkpoints" / ".latest.a1b2.tmp").write_text("step-00000007\n")
    _same_end(_fit(data, cut, resume=True), full)
    assert not stale.exists() and not list((cut / "checkpoints").glob(".latest.*.tmp"))


# ------------------------------------------------------------------------------------ the log


def test_a_torn_last_line_of_the_log_is_dropped_with_a_warning(data, cut, full, capsys) -> None:
    """Before: a torn last line of metrics.jsonl was a JSONDecodeError traceback on resume."""
    log = cut / "metrics.jsonl"
    log.write_text(log.read_text() + '{"kind": "train", "st')
    capsys.readouterr()
    _same_end(_fit(data, cut, resume=True), full)
    (warning,) = _warnings(capsys)
    assert "metrics.jsonl: dropped 1 unreadable line" in warning
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [r["step"] for r in full.history]


# ------------------------------------------------------------------------------------ the run folder


def _recipe(out: Path, **changes: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "name": "integrity",
        "data": {"name": "digits", "params": {"labelled_per_class": 5}, "batch_size": 16},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "objectives": [{"name": "cross_entropy"}],
        "trainer": {"epochs": 1, "threads": 1, "device": "cpu"},
        "evaluation": {"latency": False},
        "seeds": [0],
        "output": {"dir": str(out), "tensorboard": False},
    }
    return recipe | changes


def _cli(monkeypatch, capsys, path: Path, recipe: dict, *flags: str) -> tuple[int, str]:
    from distill.cli import main

    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(path), "--no-progress", *flags])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


def _assert_one_line(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_run_folder_damage_is_one_line_on_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    """Before: a loop of symbolic links in the run folder was a RuntimeError traceback."""
    run, recipe_file = tmp_path / "run", tmp_path / "r.yaml"
    code, err = _cli(monkeypatch, capsys, recipe_file, _recipe(run))
    assert code == 0, err
    checkpoint = next(run.rglob("checkpoints/step-*"))
    # The only checkpoint damaged: one line, and the folder as it was.
    _flip(checkpoint / "model.safetensors")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".distill")}
    code, err = _cli(monkeypatch, capsys, recipe_file, _recipe(run), "--resume")
    _assert_one_line(code, err, "model.safetensors fails its checksum")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".distill")}
    assert after == before
    # A loop of links.
    (run / "loop-a").symlink_to(run / "loop-b")
    (run / "loop-b").symlink_to(run / "loop-a")
    code, err = _cli(monkeypatch, capsys, recipe_file, _recipe(run), "--resume")
    _assert_one_line(code, err, "is a symbolic link loop")
    (run / "loop-a").unlink()
    (run / "loop-b").unlink()
    # An empty copy of the recipe.
    (run / "recipe.yaml").write_text("")
    code, err = _cli(monkeypatch, capsys, recipe_file, _recipe(run), "--resume")
    _assert_one_line(code, err, "recipe.yaml is empty")
