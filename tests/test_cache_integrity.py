"""Stored bytes are verified (issue 22 items 9 and 11).

The teacher top-k cache (`distill cache`, `teacher: {cache: DIR}`): a malformed manifest is one line; opening
a cache for a run checks every shard (sha256, shapes against k / samples / rows, plain names inside the
folder) before the run folder exists; a `distill cache` killed at any point (even before its first manifest)
resumes and cleans what it left. The trained-teacher cache (`$DISTILL_CACHE/teachers`): a damaged entry is set
aside with one warning line and the teacher trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distill.cache import CacheWriter, TeacherCache
from distill.cache.targets import topk_rows
from distill.errors import UserError

HEADER = {
    "kind": "lm",
    "teacher": "t",
    "tokenizer": None,
    "data": "d",
    "k": 3,
    "vocab": 7,
    "temperature": 1.0,
    "hidden": [],
}
SAMPLES = 12


def _rows(samples: int = SAMPLES) -> tuple[torch.Tensor, list[int]]:
    """Deterministic rows (the same in a subprocess): 1-4 rows per sample, 7 logits each."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 5, (samples,), generator=generator).tolist()
    return torch.randn(sum(counts), 7, generator=generator), counts


def _fill(writer: CacheWriter, stop: int | None = None) -> CacheWriter:
    logits, counts = _rows(writer.header["samples"])
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    for sample in range(writer.next_sample, stop if stop is not None else len(counts)):
        ids, logprobs, tail = topk_rows(logits[starts[sample] : starts[sample + 1]], 3, 1.0)
        writer.add(ids, logprobs, tail, torch.tensor([counts[sample]]))
    return writer


def _writer(folder: Path, *, overwrite: bool = False) -> CacheWriter:
    return CacheWriter(folder, HEADER | {"samples": SAMPLES}, shard_samples=4, overwrite=overwrite)


def _cache(folder: Path) -> Path:
    _fill(_writer(folder)).finish()
    return folder


def _edit(folder: Path, change: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _one_line(err: pytest.ExceptionInfo[UserError], fragment: str) -> None:
    message = str(err.value)
    assert "\n" not in message and fragment in message, message


# ------------------------------------------------------------------------------------ the manifest


def _drop_shards(m):
    del m["shards"]


def _drop_sha(m):
    del m["shards"][0]["sha256"]


def _shard_not_object(m):
    m["shards"][0] = "shard-00000.safetensors"


def _samples_text(m):
    m["samples"] = "twelve"


def _k_zero(m):
    m["k"] = 0


def _extra_field(m):
    m["shards"][1]["owner"] = "me"


def _gap(m):
    m["shards"][1]["first"] += 1


def _sha_short(m):
    m["shards"][2]["sha256"] = "abc"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_drop_shards, "no 'shards'"),
        (_drop_sha, "shards[0] has no 'sha256'"),
        (_shard_not_object, "shards[0] is not an object"),
        (_samples_text, "'samples' is not a count"),
        (_k_zero, "'k' is not a positive count"),
        (_extra_field, "unknown field 'owner'"),
        (_gap, "shards[1] starts at sample"),
        (_sha_short, "sha256 is not a sha256 digest"),
    ],
)
def test_a_malformed_manifest_is_one_line(tmp_path: Path, change, fragment: str) -> None:
    folder = _cache(tmp_path / "c")
    _edit(folder, change)
    with pytest.raises(UserError) as err:
        TeacherCache(folder)
    _one_line(err, fragment)
    # `distill cache` into it: the same line, nothing written; --overwrite replaces it.
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(UserError) as err:
        _writer(folder)
    _one_line(err, fragment)
    assert sorted(p.name for p in folder.iterdir()) == before
    _fill(_writer(folder, overwrite=True)).finish()
    TeacherCache(folder).verify()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_manifest_that_is_not_a_json_object_is_one_line(tmp_path: Path, text: str) -> None:
    folder = _cache(tmp_path / "c")
    (folder / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as err:
        TeacherCache(folder)
    _one_line(err, "manifest.json")


# ------------------------------------------------------------------------------------ the shards


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors"])
def test_a_shard_path_outside_the_cache_is_refused(tmp_path: Path, name: str) -> None:
    folder = _cache(tmp_path / "c")
    (tmp_path / "outside.safetensors").write_bytes((folder / "shard-00001.safetensors").read_bytes())

    def point_out(m):
        m["shards"][1]["file"] = name

    _edit(folder, point_out)
    with pytest.raises(UserError) as err:
        TeacherCache(folder)
    _one_line(err, "not a file of the cache folder")


def test_a_shard_that_links_out_of_the_cache_is_refused(tmp_path: Path) -> None:
    folder = _cache(tmp_path / "c")
    shard = folder / "shard-00001.safetensors"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(UserError) as err:
        TeacherCache(folder)
    _one_line(err, "not a file of the cache folder")


def test_every_checksum_is_checked_when_the_cache_is_verified(tmp_path: Path) -> None:
    folder = _cache(tmp_path / "c")
    last = folder / "shard-00002.safetensors"
    data = bytearray(last.read_bytes())
    data[-3] ^= 0xFF
    last.write_bytes(bytes(data))
    cache = TeacherCache(folder)  # opening is cheap: names, schema, files present
    with pytest.raises(UserError) as err:
        cache.verify()  # the whole cache, before any sample of the last shard is read
    _one_line(err, "shard-00002.safetensors fails its checksum")
    last.unlink()
    with pytest.raises(UserError) as err:
        TeacherCache(folder)
    _one_line(err, "shard-00002.safetensors is missing")


def _k_up(m):
    m["k"] = 4


def _rows_off(m):
    m["shards"][0]["rows"] += 1


def _samples_up(m):
    m["samples"] += 1


def _samples_shift(m):
    m["shards"][0]["samples"] -= 1
    m["shards"][1]["first"] -= 1
    m["shards"][1]["samples"] += 1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_k_up, "holds 'ids' of shape (6, 3) I32, the manifest says (6, 4)"),
        (_rows_off, "holds 'ids' of shape"),
        (_samples_up, "its shards hold 12 samples, it says 13"),
        (_samples_shift, "offsets that do not split"),
    ],
)
def test_shard_shapes_are_checked_against_k_samples_and_rows(tmp_path: Path, change, fragment) -> None:
    folder = _cache(tmp_path / "c")
    rows = json.loads((folder / "manifest.json").read_text())["shards"][0]["rows"]
    fragment = fragment.replace("(6,", f"({rows},")
    _edit(folder, change)
    with pytest.raises(UserError) as err:
        TeacherCache(folder).verify()
    _one_line(err, fragment)


def test_a_forged_shard_with_a_matching_checksum_is_still_shape_checked(tmp_path: Path) -> None:
    from distill.io import save_tensors, sha256_file

    folder = _cache(tmp_path / "c")
    shard = folder / "shard-00000.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    tensors["ids"] = tensors["ids"][:, :2].contiguous()
    save_tensors(shard, tensors)

    def reseal(m):
        m["shards"][0]["sha256"] = sha256_file(shard)

    _edit(folder, reseal)
    with pytest.raises(UserError) as err:
        TeacherCache(folder).verify()
    _one_line(err, "holds 'ids' of shape")


def test_a_damaged_cache_is_refused_before_the_run_folder_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`distill run` with `teacher: {cache: DIR}` whose last shard is damaged: one line, exit 2, and no run
    folder (the whole cache is verified when the task prepares, before the runner makes the folder)."""
    from distill import build_data
    from distill.cli import main
    from distill.tasks.teacher_cache import dataset_fingerprint

    data = build_data("digits", labelled_per_class=5)
    samples = len(data.train)
    header = HEADER | {"kind": "classification", "data": dataset_fingerprint(data.train), "vocab": 10}
    writer = CacheWriter(tmp_path / "cache", header | {"samples": samples}, shard_samples=16, overwrite=False)
    logits = torch.randn(samples, 10, generator=torch.Generator().manual_seed(0))
    writer.add(*topk_rows(logits, 3, 1.0), torch.ones(samples, dtype=torch.long))
    writer.finish()
    last = sorted((tmp_path / "cache").glob("shard-*"))[-1]
    last.write_bytes(last.read_bytes()[:-1] + b"\x07")
    recipe = {
        "name": "cached",
        "data": {"name": "digits", "params": {"labelled_per_class": 5}, "batch_size": 16},
        "teacher": {"cache": str(tmp_path / "cache")},
        "student": {"name": "mlp", "params": {"hidden": [8]}},
        "objectives": [{"name": "forward_kl"}],
        "trainer": {"epochs": 1, "threads": 1, "device": "cpu"},
        "evaluation": {"latency": False},
        "seeds": [0],
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(tmp_path / "r.yaml"), "--no-progress"])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{last.name} fails its checksum" in lines[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ a killed writer

KILLED = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_cache_integrity as t
target, replaced = sys.argv[2], os.replace

def replace(src, dst):
    if Path(dst).name == target:
        os.kill(os.getpid(), signal.SIGKILL)  # killed with the temporary written, before its rename
    replaced(src, dst)

os.replace = replace
t._fill(t._writer(Path(sys.argv[1]))).finish()
"""


def _killed_writer(folder: Path, at: str) -> None:
    """A `distill cache` writer in another process, SIGKILLed just before it renames `at` into place."""
    code = KILLED.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code, str(folder), at], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


def _sums(folder: Path) -> list[str]:
    return [s.sha256 for s in TeacherCache(folder).verify().shards]


@pytest.mark.parametrize("at", ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"])
def test_a_killed_writer_resumes_and_leaves_no_temporaries(tmp_path: Path, at: str) -> None:
    """Killed while writing its first manifest, its first shard (before any manifest lists a shard), or a
    later one: the next writer resumes into the same folder, removes the temporaries, and the cache equals
    one written in one go."""
    one_go = _sums(_cache(tmp_path / "once"))
    folder = tmp_path / "killed"
    _killed_writer(folder, at)
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert left, sorted(p.name for p in folder.iterdir())  # the kill did leave a temporary behind
    writer = _writer(folder)
    assert writer.next_sample == (4 if at == "shard-00001.safetensors" else 0)
    _fill(writer).finish()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert _sums(folder) == one_go
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]


def test_a_folder_from_before_the_first_manifest_resumes(tmp_path: Path) -> None:
    """What a writer of an earlier version left when killed before its first manifest: a finished shard, a
    temporary, no manifest. It is a cache in progress, not a foreign folder: resumed and cleaned."""
    one_go = _sums(_cache(tmp_path / "once"))
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "shard-00000.safetensors").write_bytes(
        (tmp_path / "once" / "shard-00000.safetensors").read_bytes()
    )
    (folder / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"\0" * 4096)
    _fill(_writer(folder)).finish()
    assert _sums(folder) == one_go
    assert not list(folder.glob("*.tmp"))
    # A folder with anything else in it is still refused.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="holds no teacher cache"):
        _writer(tmp_path / "mine")


def test_unlisted_and_damaged_shards_are_written_again(tmp_path: Path) -> None:
    one_go = _sums(_cache(tmp_path / "once"))
    folder = tmp_path / "c"
    _fill(_writer(folder), stop=9).close()  # two shards listed, one sample pending: "killed"
    (folder / "shard-00005.safetensors").write_bytes(b"a shard no manifest lists")
    second = folder / "shard-00001.safetensors"
    second.write_bytes(second.read_bytes()[:-1] + b"\x01")  # damaged: it is written again
    writer = _writer(folder)
    assert writer.next_sample == 4 and not (folder / "shard-00005.safetensors").exists()
    _fill(writer).finish()
    assert _sums(folder) == one_go


def test_two_writers_never_share_a_folder(tmp_path: Path) -> None:
    first = _writer(tmp_path / "c")
    with pytest.raises(UserError) as err:
        _writer(tmp_path / "c")
    _one_line(err, "another `distill cache` is writing into")
    first.close()
    _fill(_writer(tmp_path / "c")).finish()


# ------------------------------------------------------------------------------------ trained teachers


def _teacher_recipe(out: Path) -> dict[str, Any]:
    return {
        "name": "teacher-cache",
        "data": {"name": "digits", "params": {"labelled_per_class": 5}, "batch_size": 16},
        "teacher": {"name": "mlp", "params": {"hidden": [8]}, "train": {"epochs": 1}},
        "student": {"name": "mlp", "params": {"hidden": [4]}},
        "objectives": [{"name": "hinton_kd"}],
        "trainer": {"epochs": 1, "threads": 1, "device": "cpu"},
        "evaluation": {"latency": False},
        "seeds": [0],
        "output": {"dir": str(out), "tensorboard": False},
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_sha(entry: Path) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["sha256"]
    (entry / "manifest.json").write_text(json.dumps(manifest))


DAMAGES = {
    "manifest not JSON": (lambda e: (e / "manifest.json").write_text("{torn"), "not JSON"),
    "no sha256": (_no_sha, "without the weights' sha256"),
    "weights changed": (lambda e: _flip(e / "model.safetensors"), "fails its checksum"),
    "weights missing": (lambda e: (e / "model.safetensors").unlink(), "has no model.safetensors"),
}


def test_a_damaged_trained_teacher_is_set_aside_and_trained_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.experiment import run_recipe
    from distill.recipe import recipe_from_dict

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    first = run_recipe(recipe_from_dict(_teacher_recipe(tmp_path / "run-0")), progress=False)
    assert first.teacher is not None and first.teacher.source == "trained"
    (entry,) = (tmp_path / "cache" / "teachers").iterdir()
    weights = hashlib.sha256((entry / "model.safetensors").read_bytes()).hexdigest()
    capsys.readouterr()
    for number, (name, (damage, reason)) in enumerate(DAMAGES.items(), start=1):
        damage(entry)
        result = run_recipe(recipe_from_dict(_teacher_recipe(tmp_path / f"run-{number}")), progress=False)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1, (name, warnings)
        assert (
            reason in warnings[0]
            and "set aside as" in warnings[0]
            and "training the teacher again" in warnings[0]
        )
        assert result.teacher is not None and result.teacher.source == "trained", name
        aside = sorted(p for p in entry.parent.iterdir() if ".damaged-" in p.name)
        assert len(aside) == number, name
        # Retrained the same way: the same weights, stored again, and the next run takes them from the cache.
        assert hashlib.sha256((entry / "model.safetensors").read_bytes()).hexdigest() == weights
    again = run_recipe(recipe_from_dict(_teacher_recipe(tmp_path / "run-last")), progress=False)
    assert again.teacher is not None and again.teacher.source == "cache"
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_read_teacher_cache_never_raises_on_a_damaged_entry(tmp_path: Path) -> None:
    from distill.tasks.teacher_store import read_teacher_cache

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"weights")
    for manifest in ("{torn", "[]", json.dumps({"metrics": {}}), json.dumps({"sha256": 5})):
        (entry / "manifest.json").write_text(manifest)
        assert read_teacher_cache(entry) is None
    assert read_teacher_cache(tmp_path / "absent") is None
    assert os.listdir(entry)  # reading sets nothing aside: the run does (`fit_or_load_teacher`)
