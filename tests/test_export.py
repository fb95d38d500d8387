"""`distill export`, `distill predict`, `distill eval`: an exported student loads with its ecosystem's loader
alone (a subprocess in which `import distill` fails) and gives the run's logits; every refusal is one line
and exit status 2; eval of a run's checkpoints gives back the metrics the run recorded."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file

import distill.cli as cli
from cli_helpers import distill, refused
from distill.cli_export import register
from distill.recipe.load import builtin_recipe_text, recipe_from_dict

# First lines of every loader script: any `import distill` in it (or in what it imports) fails.
NO_DISTILL = "import sys\nsys.modules['distill'] = None\n"
ONNX_MISSING = importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None
LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module", autouse=True)
def _commands() -> None:
    register(cli.app)  # what cli.py does for the real command (idempotent)


def _train(recipe: dict) -> Path:
    from distill.experiment import run_recipe
    from distill.report import write_report

    result = run_recipe(recipe_from_dict(recipe), progress=False, console=Console(file=io.StringIO()))
    write_report(result)
    return result.out_dir


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart cut to 1 epoch: an MLP student, two methods, two seeds."""
    recipe = yaml.safe_load(builtin_recipe_text("quickstart"))
    recipe["methods"] = recipe["methods"][:2]  # student alone, Hinton KD
    recipe["trainer"].update(epochs=1, threads=1)
    recipe["teacher"]["train"]["epochs"] = 1
    recipe["seeds"] = [0, 1]
    recipe["evaluation"] = {"latency": False}
    recipe["output"] = {"dir": str(tmp_path_factory.mktemp("zoo") / "run"), "tensorboard": False}
    return _train(recipe)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama student of a tiny Llama teacher on additions, 1 epoch; the run trains the tokenizer."""
    from distill.data.arithmetic import addition_record

    folder = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    rows = [addition_record(rng, 2) for _ in range(48)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {
        "path": str(folder / "train.jsonl"),
        "tokenizer": {"bpe": {"vocab_size": 280}},
        "max_length": 48,
    }
    teacher = {**LLAMA, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    recipe = {
        "name": "lm-export",
        "data": {"name": "jsonl", "params": params, "batch_size": 8, "eval_batch_size": 16},
        "teacher": {"name": "hf", "params": {"config": teacher}, "train": {"epochs": 1}},
        "student": {"name": "hf", "params": {"config": LLAMA}},
        "methods": [{"name": "forward KL", "objectives": [{"name": "forward_kl"}]}],
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": False},
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    return _train(recipe)


def exported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> str:
    code, out, err = distill(monkeypatch, capsys, "export", *args)
    assert code == 0, err
    return out


def run_without_distill(script: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", NO_DISTILL + script], cwd=cwd, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_student(run: Path, method: str | None = None, seed: int | None = None):
    from distill.export_student import choose_student, load_run_student, open_finished_run

    finished = open_finished_run(run)
    return load_run_student(finished, choose_student(finished, method, seed))


def test_zoo_classifier_loads_with_torch_alone(zoo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from PIL import Image

    from distill.export_use import classify, load_students

    out = tmp_path / "export"
    line = exported(monkeypatch, capsys, zoo_run, "--out", out, "--method", "Hinton KD")
    metrics = json.loads((zoo_run / "metrics.json").read_text())
    seeds = {s["seed"]: s["final"]["accuracy"] for s in metrics["methods"][1]["seeds"]}
    best = max(seeds, key=lambda s: (seeds[s], -s))
    assert f"'Hinton KD' seed {best} (the best final accuracy of 2 seeds)" in line
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "model.json",
        "README.md",
        "recipe.yaml",
        "distill_export.json",
    }
    spec = json.loads((out / "model.json").read_text())
    assert spec["architecture"] == "mlp" and spec["params"] == {"hidden": [32], "dropout": 0.0}
    assert spec["num_classes"] == 10 and spec["input_shape"] == [1, 8, 8]
    assert spec["class_names"] == list("0123456789") and spec["preprocessing"]["std"] == [0.5]
    card = (out / "README.md").read_text()
    assert "mean ± std over 2 seeds" in card and "distill run recipe.yaml" in card and "small_cnn" in card
    assert yaml.safe_load((out / "recipe.yaml").read_text())["output"]["dir"] is None

    student = run_student(zoo_run, "Hinton KD", best)
    batch = torch.stack([student.data.test[i][0] for i in range(64)])
    with torch.inference_mode():
        want = student.model(batch)
    save_file({"x": batch}, str(tmp_path / "batch.safetensors"))
    image = tmp_path / "digit.png"
    Image.fromarray((127.5 * (batch[0, 0] + 1)).round().to(torch.uint8).numpy(), "L").save(image)
    # The card's own code, as a user would copy it: the model in plain torch, then an image file.
    code = re.search(r"### Without distill.*?```python\n(.*?)```.*?```python\n(.*?)```", card, re.DOTALL)
    assert code is not None
    printed = run_without_distill(
        code.group(1)
        + f"x = load_file({str(tmp_path / 'batch.safetensors')!r})['x']\n"
        + "with torch.inference_mode():\n    logits = model(x)\n"
        + "from safetensors.torch import save_file\n"
        + f"save_file({{'logits': logits.contiguous()}}, {str(tmp_path / 'logits.safetensors')!r})\n"
        + code.group(2).replace('"image.png"', repr(str(image))),
        cwd=out,
    )
    (loaded,) = load_students(out, None, None)
    assert printed.strip() == str([(name, round(p, 3)) for name, p in classify(loaded, [str(image)], 3)[0]])
    torch.testing.assert_close(
        load_file(str(tmp_path / "logits.safetensors"))["logits"], want, atol=1e-6, rtol=0
    )


ZOO_CASES = {"mlp": {"hidden": [12, 8], "dropout": 0.1}, "small_cnn": {"channels": [4, 6, 8], "dropout": 0.2}}


def test_the_cards_plain_torch_code_rebuilds_the_zoo_models(tmp_path: Path) -> None:
    """The card's torch-only code for each zoo architecture it covers, against the zoo's own model (random
    weights, batch-norm statistics included): the zoo's layout cannot drift from the card unnoticed."""
    from distill.export import write_safetensors
    from distill.export_card import PLAIN_TORCH, rebuild_code
    from distill.export_student import Student
    from distill.models import build_model

    assert set(ZOO_CASES) == set(PLAIN_TORCH)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script, want = "import os\n", {}
    for architecture, params in ZOO_CASES.items():
        model = build_model(architecture, num_classes=5, input_shape=(3, 8, 8), **params).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
        spec = {"architecture": architecture, "params": params, "num_classes": 5, "input_shape": [3, 8, 8]}
        (tmp_path / architecture).mkdir()
        write_safetensors(Student(model, "classification", None, spec=spec), tmp_path / architecture)
        code, plain = rebuild_code(spec)
        assert plain
        with torch.inference_mode():
            want[architecture] = model(x)
        script += (
            f"os.chdir({str(tmp_path / architecture)!r})\nspace = {{}}\nexec({code!r}, space)\n"
            "with space['torch'].inference_mode():\n"
            "    logits = space['model'](space['load_file']('../x.safetensors')['x'])\n"
            "from safetensors.torch import save_file\nsave_file({'logits': logits}, 'logits.safetensors')\n"
        )
    run_without_distill(script, cwd=tmp_path)
    for architecture, logits in want.items():
        got = load_file(str(tmp_path / architecture / "logits.safetensors"))["logits"]
        torch.testing.assert_close(got, logits, atol=1e-6, rtol=0)


def test_hf_causal_lm_loads_with_transformers_alone(
    lm_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "export"
    assert "as hf to" in exported(monkeypatch, capsys, lm_run, "--out", out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()
    result = tmp_path / "result.safetensors"
    run_without_distill(
        "import torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = torch.tensor([tokenizer('12+34=')['input_ids'], tokenizer('99+1= 1+9')['input_ids'][:6]])\n"
        "with torch.inference_mode():\n    logits = model(input_ids=ids).logits\n"
        f"save_file({{'ids': ids, 'logits': logits.contiguous()}}, {str(result)!r})\n",
        cwd=tmp_path,
    )
    saved = load_file(str(result))
    student = run_student(lm_run)
    assert saved["ids"][0].tolist() == student.tokenizer("12+34=")["input_ids"]
    with torch.inference_mode():
        want = student.model(input_ids=saved["ids"]).logits
    torch.testing.assert_close(saved["logits"], want, atol=1e-6, rtol=0)


def test_export_refusals_are_one_line(zoo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = {
        (zoo_run, "--out", full, "--method", "Hinton KD"): "is not empty",
        (zoo_run, "--out", tmp_path / "file", "--method", "Hinton KD"): "is not a folder",
        (zoo_run, "--out", out): "has 2 methods; choose one with --method: 'student alone', 'Hinton KD'",
        (zoo_run, "--out", out, "--method", "dkd"): "is not a method of",
        (zoo_run, "--out", out, "--method", "hinton-kd", "--seed", "7"): "--seed 7 is not a seed",
        (
            zoo_run,
            "--out",
            out,
            "--method",
            "Hinton KD",
            "--format",
            "hf",
        ): "use --format safetensors or onnx",
        (zoo_run, "--out", out, "--format", "tflite"): "is not one of hf, safetensors, onnx",
        (tmp_path / "empty", "--out", out): "holds no distill run",
        (tmp_path / "absent", "--out", out): "not found",
    }
    for args, fragment in cases.items():
        assert fragment in refused(monkeypatch, capsys, "export", *args), args
    assert (full / "mine.txt").read_text() == "keep" and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_unfinished_or_damaged_runs_are_refused(zoo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(zoo_run, tmp_path / name))

    unfinished = copy("unfinished")
    (unfinished / "metrics.json").unlink()
    line = refused(
        monkeypatch, capsys, "export", unfinished, "--out", tmp_path / "o", "--method", "Hinton KD"
    )
    assert "unfinished run (no metrics.json)" in line

    damaged = copy("damaged")
    seed_dir = damaged / "methods" / "hinton-kd" / "seed-0"
    step = (seed_dir / "checkpoints" / "latest").read_text().strip()
    weights = seed_dir / "checkpoints" / step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    args = ("export", damaged, "--out", tmp_path / "o", "--method", "Hinton KD", "--seed", "0")
    assert "model.safetensors fails its checksum" in refused(monkeypatch, capsys, *args)

    stopped = copy("stopped")
    (stopped / "methods" / "hinton-kd" / "seed-1" / "final.json").unlink()
    args = ("export", stopped, "--out", tmp_path / "o", "--method", "Hinton KD", "--seed", "1")
    assert "did not finish training" in refused(monkeypatch, capsys, *args)
    assert not (tmp_path / "o").exists()


def test_an_interrupted_export_leaves_nothing(zoo_run: Path, tmp_path: Path, monkeypatch) -> None:
    import distill.export as export

    def fail(*args: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_card", fail)
    with pytest.raises(KeyboardInterrupt):
        export.export_student(zoo_run, tmp_path / "out", method="student alone")
    assert list(tmp_path.iterdir()) == []


def test_predict_images_and_prompts(zoo_run: Path, lm_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for index in range(3):
        path = tmp_path / f"digit{index}.png"
        Image.fromarray((digits.images[index] * 255 / 16).round().astype("uint8"), "L").save(path)
        images.append(path)
    export = tmp_path / "zoo"
    exported(monkeypatch, capsys, zoo_run, "--out", export, "--method", "Hinton KD", "--seed", "1")
    code, from_export, err = distill(monkeypatch, capsys, "predict", export, *images, "--top-k", "2")
    assert code == 0, err
    lines = from_export.strip().splitlines()
    assert len(lines) == 3 and all(re.fullmatch(r".+: \d \d\.\d{3}, \d \d\.\d{3}", x) for x in lines)
    args = ("predict", zoo_run, *images, "--top-k", "2", "--method", "hinton-kd", "--seed", "1")
    assert distill(monkeypatch, capsys, *args)[1] == from_export  # the run's checkpoint, the same answers

    lm_export = tmp_path / "lm"
    exported(monkeypatch, capsys, lm_run, "--out", lm_export)
    code, text, err = distill(monkeypatch, capsys, "predict", lm_export, "12+34=", "--max-new-tokens", "4")
    assert code == 0 and text.startswith("12+34= -> "), err
    assert distill(monkeypatch, capsys, "predict", lm_run, "12+34=", "--max-new-tokens", "4")[1] == text

    assert "is not an image file (no such file)" in refused(monkeypatch, capsys, "predict", export, "12+34=")
    assert "is an image file; this student is a language model" in refused(
        monkeypatch, capsys, "predict", lm_export, images[0]
    )
    assert "--top-k must be at least 1" in refused(
        monkeypatch, capsys, "predict", export, images[0], "--top-k", "0"
    )
    assert "are for run folders" in refused(monkeypatch, capsys, "predict", export, images[0], "--seed", "0")


def test_eval_gives_back_the_recorded_metrics(
    zoo_run: Path, lm_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from distill.export_use import evaluate, evaluation_data, load_students

    metrics = json.loads((zoo_run / "metrics.json").read_text())
    recorded = {(m["name"], s["seed"]): s["final"] for m in metrics["methods"] for s in m["seeds"]}
    students = load_students(zoo_run, None, None, every=True)
    assert len(students) == 4
    data = evaluation_data(students[0], None)
    for loaded in students:
        seed = int(loaded.label.rsplit(" ", 1)[1])
        got, want = evaluate(loaded, data, 540), recorded[(loaded.method, seed)]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    code, table, err = distill(monkeypatch, capsys, "eval", zoo_run)
    assert code == 0 and "student alone" in table and "Hinton KD" in table and "acc %" in table, err

    lm_export = tmp_path / "lm"
    exported(monkeypatch, capsys, lm_run, "--out", lm_export)
    final = json.loads((lm_run / "metrics.json").read_text())["methods"][0]["seeds"][0]["final"]
    (loaded,) = load_students(lm_export, None, None)
    got = evaluate(loaded, evaluation_data(loaded, None), 16)
    assert got["perplexity"] == pytest.approx(final["perplexity"], rel=1e-5)
    code, table, err = distill(
        monkeypatch, capsys, "eval", lm_export, "--data", lm_run.parent / "train.jsonl"
    )
    assert code == 0 and "ppl" in table, err

    assert "neither a registered data set" in refused(
        monkeypatch, capsys, "eval", lm_export, "--data", "nope"
    )
    weights = lm_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    assert "model.safetensors fails its checksum" in refused(monkeypatch, capsys, "eval", lm_export)


@pytest.mark.skipif(ONNX_MISSING, reason="onnx / onnxruntime not installed (pip install onnx onnxruntime)")
def test_onnx_exports_give_the_same_logits(
    zoo_run: Path, lm_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import onnxruntime

    exported(
        monkeypatch, capsys, zoo_run, "--out", tmp_path / "zoo", "--method", "Hinton KD", "--format", "onnx"
    )
    exported(monkeypatch, capsys, lm_run, "--out", tmp_path / "lm", "--format", "onnx")
    student = run_student(zoo_run, "Hinton KD")
    x = torch.stack([student.data.test[i][0] for i in range(16)])
    session = onnxruntime.InferenceSession(str(tmp_path / "zoo" / "model.onnx"))
    with torch.inference_mode():
        want = student.model(x)
    torch.testing.assert_close(
        torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0]), want, atol=1e-5, rtol=0
    )
    lm = run_student(lm_run)
    ids = torch.tensor([lm.tokenizer("12+34=")["input_ids"]])
    session = onnxruntime.InferenceSession(str(tmp_path / "lm" / "model.onnx"))
    feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    with torch.inference_mode():
        want = lm.model(input_ids=ids).logits
    torch.testing.assert_close(torch.from_numpy(session.run(["logits"], feeds)[0]), want, atol=1e-5, rtol=0)


@pytest.mark.skipif(not ONNX_MISSING, reason="onnx is installed: the ONNX export itself is tested")
def test_onnx_without_the_package_is_one_line(zoo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    args = ("export", zoo_run, "--out", tmp_path / "o", "--method", "Hinton KD", "--format", "onnx")
    assert "--format onnx needs the onnx package" in refused(monkeypatch, capsys, *args)
