"""Nothing a run reads can run code, and nothing it writes lands outside its output folder.

A pickle whose loading would create a marker file is put where a checkpoint, a teacher's weights, a teacher
cache or a language model's weights are expected: each is refused (one line, exit status 2 through the CLI)
and the marker never appears. Recipe paths: names cannot climb out of the run folder, a relative
`output.dir` is resolved once, and a symbolic link inside the run folder that leads out of it is refused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distill.cli import main
from distill.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "distill"


class Payload:
    """Unpickling this touches `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def write_payload(path: Path, marker: Path, kind: str) -> Path:
    """A raw pickle, or the zip that `torch.save` writes (a pickle inside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    else:
        torch.save({"weight": Payload(marker)}, path)
    return path


KINDS = ("pickle", "torch.save")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def test_the_payload_does_run_code(tmp_path: Path) -> None:
    """The check below would be empty if unpickling the payload did nothing."""
    probe = tmp_path / "probe"
    pickle.loads(write_payload(tmp_path / "p.pkl", probe, "pickle").read_bytes())
    assert probe.exists()


def recipe(out: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "security",
        "data": {"name": "digits", "params": {"labelled_per_class": 5}, "batch_size": 16},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "objectives": [{"name": "cross_entropy"}],
        "trainer": {"epochs": 1, "threads": 1, "device": "cpu"},
        "evaluation": {"latency": False},
        "seeds": [0],
        "output": {"dir": out, "tensorboard": False},
    }
    data.update(changes)
    return data


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: Path, data: dict, *flags: str
) -> tuple[int, str]:
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(path), "--no-progress", *flags])
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ pickles refused


@pytest.fixture
def finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "run"
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(out)))
    assert code == 0, err
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_pickle_is_refused_on_resume(
    finished_run: Path, marker: Path, kind: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    checkpoint = next((finished_run / "methods").rglob("checkpoints/step-*"))
    write_payload(checkpoint / "model.safetensors", marker, kind)
    before = snapshot(finished_run)
    code, err = cli(
        monkeypatch, capsys, finished_run.parent / "r.yaml", recipe(str(finished_run)), "--resume"
    )
    assert_one_line(code, err, "is not a readable safetensors file")
    assert not marker.exists()
    assert snapshot(finished_run) == before  # the earlier run is as it was


def test_checkpoint_pointer_cannot_leave_the_run(finished_run: Path, monkeypatch, capsys) -> None:
    pointer = next((finished_run / "methods").rglob("checkpoints/latest"))
    outside = finished_run.parent / "elsewhere"
    (outside / "checkpoints").mkdir(parents=True)
    pointer.write_text("../../../../../elsewhere\n")
    code, err = cli(
        monkeypatch, capsys, finished_run.parent / "r.yaml", recipe(str(finished_run)), "--resume"
    )
    assert_one_line(code, err, "not a checkpoint of this run")


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_checkpoint_pickle_is_refused(
    tmp_path: Path, marker: Path, kind: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    weights = write_payload(tmp_path / "teacher.pt", marker, kind)
    data = recipe(
        str(tmp_path / "run"),
        teacher={"name": "mlp", "params": {"hidden": [16]}, "checkpoint": str(weights)},
        objectives=[{"name": "hinton_kd"}],
    )
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", data)
    assert_one_line(code, err, "is not a safetensors file")
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_cached_teacher_pickle_is_refused(tmp_path: Path, marker: Path, kind: str) -> None:
    from distill import build_model
    from distill.tasks.teacher_store import load_weights, read_teacher_cache

    folder = tmp_path / "teachers" / "key"
    weights = write_payload(folder / "model.safetensors", marker, kind)
    manifest = {"sha256": "0" * 64, "metrics": {}, "train_seconds": 0.0, "history": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert read_teacher_cache(folder) is None  # the checksum fails: a cache miss, the teacher is retrained
    # Even with a manifest forged to match, the file is refused without being unpickled.
    manifest["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    hit = read_teacher_cache(folder)
    assert hit is not None
    model = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[16])
    with pytest.raises(UserError, match="is not a safetensors file"):
        load_weights(model, hit[0], "teacher")
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_topk_cache_shard_pickle_is_refused(tmp_path: Path, marker: Path, kind: str) -> None:
    from distill.cache import CacheWriter, TeacherCache
    from distill.cache.targets import topk_rows

    header = {"kind": "classification", "teacher": "t", "tokenizer": None, "data": "d", "samples": 4}
    header |= {"k": 2, "vocab": 5, "temperature": 1.0, "hidden": []}
    writer = CacheWriter(tmp_path / "cache", header, shard_samples=4, overwrite=False)
    ids, logprobs, tail = topk_rows(torch.randn(4, 5), 2, 1.0)
    writer.add(ids, logprobs, tail, torch.ones(4, dtype=torch.long))
    writer.finish()
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = tmp_path / "cache" / manifest["shards"][0]["file"]
    write_payload(shard, marker, kind)
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()  # forged to match
    manifest_path.write_text(json.dumps(manifest))
    # Refused by the safetensors reader before anything is unpickled (a one-line UserError is the cache
    # module's to give; any refusal keeps the code from running).
    with pytest.raises(Exception, match="safetensors|header|checksum"):
        TeacherCache(tmp_path / "cache").targets(torch.arange(4))
    assert not marker.exists()


def test_language_model_weights_pickle_is_refused(tmp_path: Path, marker: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "lm"))
    from lm_helpers import STUDENT

    from distill.models.causal_lm import build_causal_lm

    folder = tmp_path / "model"
    build_causal_lm(config=STUDENT, vocab_size=40).config.save_pretrained(str(folder))
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds more than tensors"):
        build_causal_lm(path=str(folder))
    assert not marker.exists()


def test_every_torch_load_is_weights_only_and_nothing_unpickles() -> None:
    """Checkpoints, caches and models are safetensors / JSON; a `torch.load` must say weights_only=True."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.load", text), path
        for call in re.finditer(r"\bnp\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call.group(1), f"{path}: {call.group(0)}"


# ------------------------------------------------------------------------------------ paths


def test_a_recipe_name_cannot_climb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe("run", name="../../escape"))
    assert_one_line(code, err, "name")
    assert not (tmp_path / "run").exists()


def test_names_and_relative_dirs_write_inside_the_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    methods = [{"name": "../../../../escape", "objectives": [{"name": "cross_entropy"}]}]
    data = recipe("../out", objectives=None, methods=methods)
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", data)
    assert code == 0, err
    out = tmp_path / "a" / "out"
    assert (out / "methods" / "escape" / "seed-0" / "final.json").exists()
    written = {p for p in tmp_path.rglob("*") if p.name != "r.yaml"}
    assert all(p == out or out in p.parents or p in {tmp_path / "a", work} for p in written), sorted(written)


def test_a_link_out_of_the_run_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / "methods").symlink_to(elsewhere, target_is_directory=True)  # an earlier run's folder, tampered
    (out / ".distill-run.json").write_text('{"format": 1, "written": ["methods"]}')
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(out)), "--resume")
    assert_one_line(code, err, "links outside it")
    assert snapshot(elsewhere) == {"precious.txt": b"keep me"}
    # --overwrite removes the link, never what it points to.
    code, err = cli(monkeypatch, capsys, tmp_path / "r.yaml", recipe(str(out)), "--overwrite")
    assert code == 0, err
    assert not (out / "methods").is_symlink() and (out / "methods").is_dir()
    assert snapshot(elsewhere) == {"precious.txt": b"keep me"}
