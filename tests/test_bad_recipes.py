"""Every broken recipe under tests/data/bad_recipes/ ends in one line naming the problem, exit status 2, no
traceback, and nothing written or changed. Each file's first line says what the message must contain; an
optional `# setup: NAME` line prepares an earlier run in @TMP@/earlier (see `SETUPS`) and `# flags: ...`
adds command-line flags."""

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.cli import main

CASES = sorted((Path(__file__).parent / "data" / "bad_recipes").glob("*.yaml"))
SETUPS = ("earlier-run", "foreign-checkpoint", "other-recipe")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two different BPE tokenizers and a tiny jsonl data set, made once."""
    sys.path.insert(0, str(Path(__file__).parent / "lm"))
    from lm_helpers import addition_rows, bpe, write_jsonl

    folder = tmp_path_factory.mktemp("lm")
    rows = addition_rows(40)
    write_jsonl(folder / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(folder / "tok"))
    words = [{"text": "the quick brown fox jumps over the lazy dog, then the fox sleeps"}] * 20
    bpe(words, vocab_size=300).save_pretrained(str(folder / "tok-other"))
    return folder


def earlier_run(folder: Path, recipe_file: Path, setup: str) -> None:
    """An earlier run's folder as `distill run` leaves it: its recipe (as the runner writes it) and more."""
    from distill.recipe import load_recipe

    recipe = load_recipe(recipe_file).model_dump(mode="json")
    if setup == "other-recipe":
        recipe["trainer"]["epochs"] += 1
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (folder / "metrics.json").write_text("{}\n")
    if setup == "foreign-checkpoint":
        checkpoints = folder / "methods" / "distill" / "seed-0" / "checkpoints"
        (checkpoints / "step-00000001").mkdir(parents=True)
        (checkpoints / "step-00000001" / "state.json").write_text('{"format": 1, "fingerprint": "other"}')
        (checkpoints / "latest").write_text("step-00000001\n")


def snapshot(folder: Path) -> dict[Path, bytes | None]:
    """Every file's bytes, but distill's bookkeeping of a run folder it resumes (its manifest and lock, which
    an earlier run from before manifests gains when resumed)."""
    bookkeeping = {".distill-run.json", ".distill-run.lock"}
    return {
        p.relative_to(folder): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
        if p.name not in bookkeeping
    }


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from distill import build_model
    from distill.io import save_tensors

    save_tensors(
        tmp_path / "teacher7.safetensors",
        build_model("small_cnn", num_classes=7, input_shape=(1, 8, 8), channels=[8, 16]).state_dict(),
    )
    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    # MNIST-format files with 3 images of a 13th class: labels beyond what the 10-class data set declares
    mnist = tmp_path / "mnist-bad-labels"
    mnist.mkdir()
    labels = np.array([c for c in range(10) for _ in range(3)] + [12] * 3)
    write_idx(
        mnist / "t10k-images-idx3-ubyte", np.random.default_rng(0).integers(0, 255, (len(labels), 8, 8))
    )
    write_idx(mnist / "t10k-labels-idx1-ubyte", labels)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_recipe(
    case: Path,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if case.stem == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    text = case.read_text().replace("@TMP@", str(workdir))
    directives = dict(
        line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# ") and ": " in line
    )
    expected = directives["expect"]
    recipe = workdir / case.name
    recipe.write_text(text)
    if f"{workdir}/lm/" in text:
        shutil.copytree(request.getfixturevalue("lm_files"), workdir / "lm")
    if "setup" in directives:
        assert directives["setup"] in SETUPS, directives["setup"]
        earlier_run(workdir / "earlier", recipe, directives["setup"])
    before = snapshot(workdir)
    flags = directives.get("flags", "").split()
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(recipe), "--no-progress", *flags])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("error: ")
    assert expected in lines[0], lines[0]
    assert snapshot(workdir) == before  # nothing written, no earlier file changed
