"""Issue 21, language models: what loaded or trained silently is refused in one line (exit 2). A BERT folder
as a causal LM (random head), weights missing from a checkpoint, a `text,label` table joined into one text,
a classifier's name as the student."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from lm_helpers import STUDENT, TEACHER, addition_rows, bpe, write_jsonl
from safetensors.torch import load_file, save_file

from distill.cli import main
from distill.data.language import file_data
from distill.errors import UserError
from distill.models.causal_lm import build_causal_lm

TINY_BERT = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
)


def _recipe(folder: Path, **changes: object) -> dict:
    recipe = {
        "name": "lm-refusals",
        "data": {
            "name": "jsonl",
            "params": {
                "path": str(folder / "train.jsonl"),
                "tokenizer": str(folder / "tok"),
                "max_length": 48,
            },
            "batch_size": 8,
        },
        "teacher": {"name": "hf", "params": {"config": TEACHER}, "train": {"epochs": 1}},
        "student": {"name": "hf", "params": {"config": STUDENT}},
        "objectives": [{"name": "forward_kl"}],
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "output": {"dir": str(folder / "run"), "tensorboard": False},
    }
    recipe.update(changes)
    return recipe


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rows = addition_rows(32)
    write_jsonl(tmp_path / "train.jsonl", rows)
    bpe(rows).save_pretrained(str(tmp_path / "tok"))
    return tmp_path


def _refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recipe: dict, path: Path
) -> str:
    """`distill run` of `recipe`: exit 2 with one line on stderr, which is returned."""
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # what the fixtures printed (transformers' save_pretrained bars)
    monkeypatch.setattr(sys, "argv", ["distill", "run", str(path), "--no-progress"])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _validated(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: Path) -> str:
    """`distill validate` of the recipe at `path`: exit 2, and its one line."""
    monkeypatch.setattr(sys, "argv", ["distill", "validate", str(path)])
    with pytest.raises(SystemExit) as stop:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------ checkpoints that are not causal LMs


def _bert_folder(path: Path, head: bool) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    config = BertConfig(**TINY_BERT)
    (BertForMaskedLM(config) if head else BertModel(config)).save_pretrained(str(path))
    return path


@pytest.mark.parametrize(("head", "kind"), [(True, "BertForMaskedLM"), (False, "BertModel")])
def test_a_bert_folder_as_the_teacher_is_refused(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], head: bool, kind: str
) -> None:
    """It used to load as BertLMHeadModel with a random head, train and exit 0 (teacher perplexity 11,446)."""
    bert = _bert_folder(folder / "bert", head)
    recipe = _recipe(folder, teacher={"name": "hf", "params": {"path": str(bert)}})
    line = _refused(monkeypatch, capsys, recipe, folder / "r.yaml")
    assert line.startswith("error: teacher: cannot load a causal LM from") and str(bert) in line
    assert f"it holds a {kind}, which is not a causal language model" in line
    assert not (folder / "run").exists()
    assert _validated(monkeypatch, capsys, folder / "r.yaml") == line  # `distill validate` sees it too


def test_a_bert_folder_as_the_student_is_refused(tmp_path: Path) -> None:
    bert = _bert_folder(tmp_path / "bert", head=True)
    with pytest.raises(UserError, match="BertForMaskedLM, which is not a causal language model"):
        build_causal_lm(path=bert)


def test_a_folder_of_a_model_type_without_a_causal_lm_is_refused(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="model_type 'vit' has no causal language model"):
        build_causal_lm(path=tmp_path)


def _saved_llama(path: Path, **config: object) -> Path:
    build_causal_lm(config={**STUDENT, **config}, vocab_size=40).save_pretrained(str(path))
    return path


def test_a_checkpoint_missing_weights_is_refused_naming_them(tmp_path: Path) -> None:
    folder = _saved_llama(tmp_path / "llama")
    weights = load_file(folder / "model.safetensors")
    gone = sorted(k for k in weights if k.startswith("model.layers.0.mlp."))
    save_file({k: v for k, v in weights.items() if k not in gone}, folder / "model.safetensors")
    with pytest.raises(UserError) as refused:
        build_causal_lm(path=folder)
    message = str(refused.value)
    assert f"its weights lack {len(gone)} tensor(s) the model needs ({', '.join(gone)})" in message
    assert "\n" not in message


def test_tied_output_weights_are_not_missing(tmp_path: Path) -> None:
    folder = _saved_llama(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # stored once, with the embedding
    model = build_causal_lm(path=folder)
    assert model.lm_head.weight is model.get_input_embeddings().weight


# ------------------------------------------------------------------ data and model names


def test_a_text_and_label_table_is_refused_unless_the_text_column_is_named(tmp_path: Path) -> None:
    """It used to drop the labels and join the rows into one text."""
    rows = ["the film was a delight from start to end", "a dull and tedious evening at the cinema"] * 20
    table = tmp_path / "reviews.csv"
    table.write_text("text,label\n" + "".join(f"{text},{i % 2}\n" for i, text in enumerate(rows)))
    tokenizer = bpe([{"text": text} for text in rows], vocab_size=300)
    with pytest.raises(UserError) as refused:
        file_data("csv", path=str(table), tokenizer=tokenizer, max_length=16)
    assert str(refused.value) == (
        f"data: {table} has columns besides 'text' (label), which a language model ignores; "
        "to train on the text alone, set data.params.fields: {text: text}"
    )
    data = file_data("csv", path=str(table), tokenizer=tokenizer, max_length=16, fields={"text": "text"})
    assert data.layout == "text" and len(data.train) > 0


def test_a_text_only_table_still_loads(tmp_path: Path) -> None:
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}] * 30
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    data = file_data("jsonl", path=str(path), tokenizer=bpe(rows, vocab_size=300), max_length=16)
    assert data.layout == "text"


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize(
    ("name", "params"), [("mlp", {}), ("mlp", {"hidden": [8]}), ("small_cnn", {"channels": [4]})]
)
def test_a_classifier_name_on_a_language_model_task_is_refused(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    role: str,
    name: str,
    params: dict,
) -> None:
    """It used to be built as `hf` (from whatever params it had), or refused for a missing config."""
    recipe = _recipe(folder, **{role: {"name": name, "params": params}})
    line = _refused(monkeypatch, capsys, recipe, folder / "r.yaml")
    assert line == (
        f"error: {role}: '{name}' is not a language model; a language-model recipe's {role} is hf or "
        "causal_lm (a Hugging Face causal LM from params.config or params.path)"
    )
    assert not (folder / "run").exists()
    assert _validated(monkeypatch, capsys, folder / "r.yaml") == line


def test_a_bad_row_is_named_by_its_place_in_the_file_not_after_the_shuffle() -> None:
    """Issue 22 item 14: the held-out split shuffles the rows; the error names the file's row."""
    from distill.data.text import build_lm_data

    rows = addition_rows(20)
    del rows[6]["completion"]  # the file's row 7
    with pytest.raises(UserError, match=r"row 7 has no 'completion' field"):
        build_lm_data(rows, None, tokenizer=bpe(), test_fraction=0.3, seed=3, where="train.jsonl")
