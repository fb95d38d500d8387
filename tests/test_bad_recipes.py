"""Every broken recipe under tests/data/bad_recipes/ ends in one line naming the problem, exit status 2, no
traceback, and no run folder. Each file's first line says what the message must contain."""

import sys
from pathlib import Path

import pytest
import torch

from distill.cli import main

CASES = sorted((Path(__file__).parent / "data" / "bad_recipes").glob("*.yaml"))


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
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_recipe(
    case: Path, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.stem == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    text = case.read_text().replace("@TMP@", str(workdir))
    expected = text.splitlines()[0].removeprefix("# expect: ")
    recipe = workdir / case.name
    recipe.write_text(text)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(recipe), "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith("error: ")
    assert expected in lines[0], lines[0]
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # nothing written
