"""`distill export`, `predict` and `eval` of text classifiers (`text_classification` runs): every format
reloads without distill (the card's own transformers + torch code, run in a subprocess where `import distill`
fails; the ONNX graph with onnxruntime) and gives the student's logits; predict names the labels; eval gives
back the run's macro F1; a damaged checkpoint is refused as for every task."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import distill.cli as cli
from cli_helpers import distill, refused
from distill.cli_export import register
from distill.errors import UserError
from distill.pretrained import pretrained_folder

NO_DISTILL = "import sys\nsys.modules['distill'] = None\n"
TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
TEXTS = ["great film, loved every minute", "dull, slow and far too long", "loved it", "far too long. dull"]


@pytest.fixture(scope="module", autouse=True)
def _commands() -> None:
    register(cli.app)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh tiny encoder over the MiniLM tokenizer, taught by a tiny teacher on a table of reviews; two
    methods, two seeds, 1 epoch."""
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict
    from distill.report import write_report

    try:
        minilm = pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        pytest.skip(f"data missing: {err}")
    folder = tmp_path_factory.mktemp("text")
    rows = [("great film, loved every minute", "pos"), ("dull, slow and far too long", "neg")] * 12
    rows += [("it was fine, I suppose", "meh")] * 6
    (folder / "reviews.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)
    )
    recipe = {
        "name": "tiny-text",
        "data": {
            "name": "text_table",
            "params": {"path": str(folder / "reviews.jsonl"), "max_length": 16},
            "batch_size": 8,
        },
        "teacher": {
            "name": "hf_encoder",
            "params": {"path": minilm, "config": {**TINY, "hidden_size": 48}},
            "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}, "cache": False},
        },
        "student": {"name": "hf_encoder", "params": {"path": minilm, "config": TINY}},
        "methods": [
            {"name": "student alone", "objectives": [{"name": "cross_entropy"}]},
            {"name": "KD", "objectives": [{"name": "cross_entropy"}, {"name": "hinton_kd"}]},
        ],
        "optimizer": {"name": "adamw", "lr": 0.003},
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0, 1],
        "evaluation": {"latency": False},
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    result = run_recipe(recipe_from_dict(recipe), progress=False, console=Console(file=io.StringIO()))
    write_report(result)  # metrics.json: the run is finished
    return result.out_dir


def export(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, run: Path, out: Path, *args: str
) -> str:
    code, text, err = distill(monkeypatch, capsys, "export", run, "--out", out, "--method", "KD", *args)
    assert code == 0, err
    return text


def student_logits(run: Path, texts: list[str], seed: int | None = None) -> torch.Tensor:
    from distill.export_student import choose_student, load_run_student, open_finished_run
    from distill.export_use import text_batch

    finished = open_finished_run(run)
    student = load_run_student(finished, choose_student(finished, "KD", seed))
    with torch.inference_mode():
        return student.model(text_batch(student, texts))


def card_logits(folder: Path, scratch: Path) -> torch.Tensor:
    """The card's code exactly as it stands, in a process without distill, applied to TEXTS."""
    card = (folder / "README.md").read_text()
    code = re.search(r"## Use \(transformers\).*?```python\n(.*?)```", card, re.DOTALL)
    assert code is not None
    out = scratch / f"{folder.name}-logits.safetensors"
    script = (
        NO_DISTILL
        + code.group(1)
        + "from safetensors.torch import save_file\n"
        + f"save_file({{'logits': classify({TEXTS!r}).contiguous()}}, {str(out)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\[\('(neg|pos|meh)', \d\.\d+\)", done.stdout), done.stdout  # the card's own example
    return load_file(str(out))["logits"]


@pytest.mark.slow
def test_hf_and_safetensors_exports_load_with_transformers_alone(
    text_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    line = export(monkeypatch, capsys, text_run, tmp_path / "hf")
    assert "as hf to" in line and "the best final macro F1 of 2 seeds" in line
    hf = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "head.safetensors", "head.json"} <= {
        p.name for p in hf.iterdir()
    }
    config = json.loads((hf / "config.json").read_text())
    assert config["id2label"] == {"0": "meh", "1": "neg", "2": "pos"}
    assert config["label2id"] == {"meh": 0, "neg": 1, "pos": 2}
    head = json.loads((hf / "head.json").read_text())
    assert head["label_names"] == ["meh", "neg", "pos"] and head["pooling"] == "mean"
    assert head["pad_id"] == 0 and head["max_length"] == 16
    card = (hf / "README.md").read_text()
    assert "test macro F1 %" in card and card.index("test macro F1 %") < card.index("test accuracy %")
    seed = int(re.search(r"seed (\d)", line).group(1))  # type: ignore[union-attr]
    want = student_logits(text_run, TEXTS, seed)
    torch.testing.assert_close(card_logits(hf, tmp_path), want, atol=1e-5, rtol=0)

    export(monkeypatch, capsys, text_run, tmp_path / "st", "--format", "safetensors", "--seed", str(seed))
    spec = json.loads((tmp_path / "st" / "model.json").read_text())
    assert spec["encoder_config"]["model_type"] == "bert" and spec["weights"] == "model.safetensors"
    assert not (tmp_path / "st" / "config.json").exists()  # no folder that AutoModel would half-load
    torch.testing.assert_close(card_logits(tmp_path / "st", tmp_path), want, atol=1e-5, rtol=0)

    # distill's own loader of both exports gives the same logits as the run's checkpoint
    from distill.export_use import load_students, text_batch

    for name in ("hf", "st"):
        (loaded,) = load_students(tmp_path / name, None, None)
        with torch.inference_mode():
            got = loaded.student.model(text_batch(loaded.student, TEXTS))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_onnx_export_takes_input_ids(text_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    export(monkeypatch, capsys, text_run, tmp_path / "onnx", "--format", "onnx", "--seed", "1")
    folder = tmp_path / "onnx"
    spec = json.loads((folder / "model.json").read_text())
    assert spec["label_names"] == ["meh", "neg", "pos"] and spec["weights"] == "model.onnx"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(TEXTS, padding=True, return_tensors="np")["input_ids"].astype("int64")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    got = torch.from_numpy(session.run(["logits"], {"input_ids": ids})[0])
    torch.testing.assert_close(got, student_logits(text_run, TEXTS, 1), atol=1e-5, rtol=0)
    assert "holds an ONNX graph" in refused(monkeypatch, capsys, "predict", folder, "loved it")


@pytest.mark.slow
def test_predict_names_the_labels(text_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    export(monkeypatch, capsys, text_run, tmp_path / "hf", "--seed", "0")
    code, from_export, err = distill(
        monkeypatch, capsys, "predict", tmp_path / "hf", *TEXTS[:2], "--top-k", "2"
    )
    assert code == 0, err
    lines = from_export.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{TEXTS[0]}: ")
    assert all(re.fullmatch(r".+: (meh|neg|pos) \d\.\d{3}, (meh|neg|pos) \d\.\d{3}", x) for x in lines), lines
    args = ("predict", text_run, *TEXTS[:2], "--top-k", "2", "--method", "KD", "--seed", "0")
    assert distill(monkeypatch, capsys, *args)[1] == from_export  # the run's checkpoint, the same answers
    assert "an empty text" in refused(monkeypatch, capsys, "predict", tmp_path / "hf", " ")


@pytest.mark.slow
def test_eval_gives_back_the_runs_macro_f1(text_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from distill.export_use import evaluate, evaluation_data, load_students

    metrics = json.loads((text_run / "metrics.json").read_text())
    recorded = {(m["name"], s["seed"]): s["final"] for m in metrics["methods"] for s in m["seeds"]}
    students = load_students(text_run, None, None, every=True)
    assert len(students) == 4
    data = evaluation_data(students[0], None)
    for loaded in students:
        seed = int(loaded.label.rsplit(" ", 1)[1])
        got, want = evaluate(loaded, data, 7), recorded[(loaded.method, seed)]
        assert got["f1"] == pytest.approx(want["f1"], abs=1e-9)
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    code, table, err = distill(monkeypatch, capsys, "eval", text_run, "--method", "KD")
    assert code == 0 and "macro F1 %" in table and "acc %" in table, err

    export(monkeypatch, capsys, text_run, tmp_path / "st", "--format", "safetensors", "--seed", "1")
    (loaded,) = load_students(tmp_path / "st", None, None)
    got = evaluate(loaded, evaluation_data(loaded, None), 16)
    assert got["f1"] == pytest.approx(recorded[("KD", 1)]["f1"], abs=1e-9)

    # another table, with a subset of the labels in another order: matched by name, tokenised as the run's
    table = tmp_path / "more.jsonl"
    table.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [(TEXTS[1], "neg")] * 3))
    (loaded,) = load_students(tmp_path / "st", None, None)
    got = evaluate(loaded, evaluation_data(loaded, str(table)), 16)
    with torch.inference_mode():
        predicted = student_logits(text_run, [TEXTS[1]], 1).argmax(-1).item()
    assert got["accuracy"] == (1.0 if predicted == 1 else 0.0)
    code, out, err = distill(monkeypatch, capsys, "eval", tmp_path / "st", "--data", table)
    assert code == 0 and "macro F1 %" in out, err
    table.write_text(json.dumps({"text": "x", "label": "angry"}) + "\n")
    assert "label 'angry' is not one of the student's labels" in refused(
        monkeypatch, capsys, "eval", tmp_path / "st", "--data", table
    )
    assert "neither a registered data set nor" in refused(
        monkeypatch, capsys, "eval", tmp_path / "st", "--data", tmp_path / "none.csv"
    )


@pytest.mark.slow
def test_damaged_or_missing_checkpoints_are_refused(
    text_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    damaged = Path(shutil.copytree(text_run, tmp_path / "damaged"))
    seed_dir = damaged / "methods" / "kd" / "seed-0"
    step = (seed_dir / "checkpoints" / "latest").read_text().strip()
    weights = seed_dir / "checkpoints" / step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    args = ("export", damaged, "--out", tmp_path / "o", "--method", "KD", "--seed", "0")
    assert "model.safetensors fails its checksum" in refused(monkeypatch, capsys, *args)
    assert "fails its checksum" in refused(
        monkeypatch, capsys, "predict", damaged, "a", "--method", "KD", "--seed", "0"
    )
    shutil.rmtree(seed_dir / "checkpoints")
    assert "no checkpoint to export" in refused(monkeypatch, capsys, *args)
    assert "choose one with --method" in refused(
        monkeypatch, capsys, "export", text_run, "--out", tmp_path / "o"
    )
    assert not (tmp_path / "o").exists()


def test_the_cards_code_matches_both_poolings(tmp_path: Path) -> None:
    """The card's code for `hf` and `safetensors`, against untrained students of each pooling (no run), all in
    one process without distill."""
    from distill.data.tokenizers import load_tokenizer
    from distill.export import write_hf, write_safetensors
    from distill.export_card import text_code
    from distill.export_student import TEXT, Student
    from distill.export_use import text_batch
    from distill.models import build_model

    try:
        minilm = pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        pytest.skip(f"data missing: {err}")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(minilm)
    script, want = NO_DISTILL + "from safetensors.torch import save_file\n", {}
    for pooling in ("cls", "mean"):
        model = build_model(
            "hf_encoder", num_classes=3, input_shape=(12,), path=minilm, config=TINY, pooling=pooling
        ).eval()
        spec = {"label_names": ["a", "b", "c"], "num_classes": 3, "pooling": pooling, "pad_id": 0}
        student = Student(model, TEXT, None, tokenizer=tokenizer, spec={**spec, "max_length": 12})
        with torch.inference_mode():
            logits = model(text_batch(student, TEXTS))
        for fmt, write in (("hf", write_hf), ("safetensors", write_safetensors)):
            folder = tmp_path / f"{pooling}-{fmt}"
            folder.mkdir()
            write(student, folder)
            want[folder] = logits
            script += (
                f"space = {{}}\nexec({text_code(fmt, str(folder), 'loved it')!r}, space)\n"
                f"save_file({{'x': space['classify']({TEXTS!r})}}, {str(folder / 'out.safetensors')!r})\n"
            )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    for folder, logits in want.items():
        torch.testing.assert_close(load_file(str(folder / "out.safetensors"))["x"], logits, atol=1e-5, rtol=0)
