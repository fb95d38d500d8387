"""Text classification with encoders: the data sets, the `hf_encoder` model, the task's checks and report,
and one end-to-end run on a tiny table (fresh tiny encoders over the real MiniLM tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score

from data_helpers import missing_data, require_data
from distill.data import build_data
from distill.data.text_classification import FORTUNES_DIR, stratified_split
from distill.errors import UserError
from distill.metrics import macro_f1
from distill.models import build_model
from distill.pretrained import pretrained_folder
from distill.train.sampler import EpochSampler

TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def minilm() -> str:
    try:
        return pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        missing_data(str(err))


def test_macro_f1_matches_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 3, 5):
        logits = torch.randn(200, classes, generator=generator)
        labels = torch.randint(0, classes, (200,), generator=generator)
        expected = f1_score(labels.numpy(), logits.argmax(-1).numpy(), average="macro", zero_division=0)
        assert macro_f1(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_of_the_majority_class_is_low() -> None:
    labels = torch.tensor([0] * 87 + [1] * 13)
    logits = torch.tensor([[1.0, 0.0]]).expand(100, 2)  # always "ham"
    assert macro_f1(logits, labels) == pytest.approx((2 * 87 / (2 * 87 + 13)) / 2)


def test_stratified_split_keeps_every_label_in_both_splits() -> None:
    labels = ["a"] * 90 + ["b"] * 10
    train, test = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(100))
    assert [labels[i] for i in test].count("b") == 2
    assert stratified_split(labels, 0.2, seed=0) == (train, test)


def test_sms_spam_splits_are_stratified_and_right_padded(minilm: str) -> None:
    require_data("textcls/SMSSpamCollection.tsv")
    data = build_data("sms_spam", max_length=32)
    assert (len(data.train), len(data.test)) == (4460, 1114)
    assert data.label_names == ("ham", "spam") and data.num_classes == 2
    ids, labels = data.train.tensors
    assert ids.shape[1] == 32 and ids.dtype == torch.long
    mask = ids != data.pad_id
    assert torch.equal(mask, mask.cummin(1).values)  # right padding: no real token after a pad
    assert torch.equal(data.train.lengths, mask.sum(1))
    spam_share = labels.float().mean().item()
    assert spam_share == pytest.approx(data.test.tensors[1].float().mean().item(), abs=0.01)


def test_fortunes_topics_reads_the_debian_package(minilm: str) -> None:
    if not (FORTUNES_DIR / "computers").is_file():
        missing_data(f"{FORTUNES_DIR} not found; apt-get install fortunes")
    data = build_data("fortunes_topics", max_length=32)
    assert data.label_names == ("computers", "politics", "science", "songs-poems", "work")
    assert len(data.train) + len(data.test) > 3000


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_text_table_reads_every_format(tmp_path: Path, minilm: str, fmt: str) -> None:
    rows = [("great film, loved it", "pos"), ("dull and far too long", "neg")] * 10
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"review": t, "mood": y}) + "\n" for t, y in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"review{sep}mood\n" + "".join(f'"{t}"{sep}{y}\n' for t, y in rows))
    data = build_data("text_table", path=str(path), text_column="review", label_column="mood", max_length=16)
    assert data.label_names == ("neg", "pos")
    assert len(data.train) == 16 and len(data.test) == 4


def test_text_table_names_the_row_without_a_label(tmp_path: Path, minilm: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match="row 2 has no 'label'"):
        build_data("text_table", path=str(path))


def test_one_label_is_refused(tmp_path: Path, minilm: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(UserError, match="one label"):
        build_data("text_table", path=str(path))


def test_unknown_pretrained_model_is_one_line() -> None:
    with pytest.raises(UserError, match="neither a local folder nor a packaged model"):
        pretrained_folder("no-such-encoder")


def test_pretrained_folder_resolves_folders_packages_and_allowed_hub_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match="has no config.json"):
        pretrained_folder(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert pretrained_folder(str(tmp_path)) == str(tmp_path)
    monkeypatch.delenv("DISTILL_DOWNLOAD", raising=False)
    with pytest.raises(UserError, match="set DISTILL_DOWNLOAD=1"):
        pretrained_folder("someone/some-encoder")
    monkeypatch.setenv("DISTILL_DOWNLOAD", "1")
    assert pretrained_folder("someone/some-encoder") == "someone/some-encoder"  # transformers downloads it


def test_encoder_logits_ignore_padding(minilm: str) -> None:
    torch.manual_seed(0)
    model = build_model("hf_encoder", num_classes=3, input_shape=(16,), path=minilm, config=TINY).eval()
    ids = torch.tensor([[101, 2307, 2143, 102, 0, 0], [101, 2307, 102, 0, 0, 0]])
    longer = torch.cat([ids, torch.zeros(2, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(model(ids), model(longer), atol=1e-6)
        alone = model(ids[1:, :3])
    assert torch.allclose(model(ids)[1:], alone, atol=1e-5)


def test_keep_layers_takes_the_teachers_blocks(minilm: str) -> None:
    full = build_model("hf_encoder", num_classes=2, input_shape=(8,), path=minilm)
    pruned = build_model("hf_encoder", num_classes=2, input_shape=(8,), path=minilm, keep_layers=[0, 2, 4])
    assert pruned.num_layers == 3
    kept = pruned.encoder.encoder.layer[1].output.dense.weight
    assert torch.equal(kept, full.encoder.encoder.layer[2].output.dense.weight)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"config": {"hidden_size": 30, "num_attention_heads": 4}}, "multiple of num_attention_heads"),
        ({"config": {"num_hidden_layers": 0}}, "positive whole number"),
        ({"keep_layers": [0, 9]}, "keep_layers must be"),
        ({"keep_layers": [0], "config": TINY}, "not both"),
        ({"pooling": "max"}, "pooling must be one of"),
    ],
)
def test_bad_encoder_params_are_one_line(minilm: str, params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_model("hf_encoder", num_classes=2, input_shape=(8,), path=minilm, **params)


def test_length_grouping_keeps_a_permutation_and_groups_lengths() -> None:
    lengths = torch.randint(1, 64, (1000,), generator=torch.Generator().manual_seed(1))
    sampler = EpochSampler(1000, seed=3, lengths=lengths, batch_size=10)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    assert order == list(EpochSampler(1000, seed=3, lengths=lengths, batch_size=10))  # (seed, epoch) only
    spread = [lengths[order[i : i + 10]].max() - lengths[order[i : i + 10]].min() for i in range(0, 1000, 10)]
    assert sum(spread) / len(spread) < 5  # random batches of 10 spread ~50 tokens
    sampler.set_epoch(0, start=500)
    assert list(sampler) == order[500:]  # a resumed epoch continues the same order


def text_recipe(path: Path, minilm: str, **changes: object) -> dict:
    recipe = {
        "name": "tiny-text",
        "data": {"name": "text_table", "params": {"path": str(path), "max_length": 16}, "batch_size": 8},
        "teacher": {
            "name": "hf_encoder",
            "params": {"path": minilm, "config": {**TINY, "hidden_size": 48}},
            "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.003}, "cache": False},
        },
        "student": {"name": "hf_encoder", "params": {"path": minilm, "config": TINY}},
        "methods": [
            {"name": "student alone", "objectives": [{"name": "cross_entropy"}]},
            {
                "name": "KD",
                "objectives": [
                    {"name": "cross_entropy", "weight": 0.5},
                    {"name": "hinton_kd", "weight": 0.5, "params": {"temperature": 2.0}},
                ],
            },
        ],
        "optimizer": {"name": "adamw", "lr": 0.003},
        "trainer": {"epochs": 2},
        "seeds": [0],
        "evaluation": {"latency": True},
    }
    recipe.update(changes)
    return recipe


def write_reviews(folder: Path) -> Path:
    rows = [("great film, loved every minute", "pos"), ("dull, slow and far too long", "neg")] * 24
    path = folder / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


@pytest.mark.slow
def test_a_text_recipe_runs_end_to_end_with_f1_and_two_latencies(tmp_path: Path, minilm: str) -> None:
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict
    from distill.report import write_report
    from distill.tasks import task_for

    recipe = recipe_from_dict(text_recipe(write_reviews(tmp_path), minilm), "tiny-text")
    assert task_for(recipe).name == "text_classification"
    result = run_recipe(recipe, out=tmp_path / "run", progress=False)
    report = write_report(result).read_text()
    assert "F1 % (macro)" in report
    assert "batch of 1 on the CPU" in report and "batch of 10 on the CPU" in report
    final = result.methods[1].runs[0].result.final
    assert 0.0 <= final["f1"] <= 1.0 and "agreement" in final


def test_a_student_with_another_vocabulary_is_refused_before_the_teacher_trains(
    tmp_path: Path, minilm: str
) -> None:
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    recipe = text_recipe(write_reviews(tmp_path), minilm)
    recipe["student"]["params"]["config"] = {**TINY, "vocab_size": 500}
    with pytest.raises(UserError, match="vocabulary mismatch: the student embeds 500 tokens"):
        run_recipe(recipe_from_dict(recipe, "tiny-text"), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "teacher").exists()


@pytest.mark.slow
def test_a_text_teacher_cache_and_resume_work_unchanged(tmp_path: Path, minilm: str) -> None:
    """`distill cache` stores the text teacher's logits; a run reads them (no teacher model at all), and
    `--resume` of the finished run ends with the same metrics."""
    from distill.build_cache import make_cache
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    data = text_recipe(write_reviews(tmp_path), minilm)
    make_cache(recipe_from_dict(data, "tiny-text"), tmp_path / "cache", k=None, progress=False)
    cached = dict(data, teacher={"cache": str(tmp_path / "cache")})
    cached["methods"] = data["methods"][1:]  # KD
    first = run_recipe(recipe_from_dict(cached, "tiny-text"), out=tmp_path / "run", progress=False)
    assert first.teacher is not None and first.teacher.source == "offline"
    again = run_recipe(
        recipe_from_dict(cached, "tiny-text"), out=tmp_path / "run", resume=True, progress=False
    )
    assert again.methods[0].runs[0].result.final == first.methods[0].runs[0].result.final
