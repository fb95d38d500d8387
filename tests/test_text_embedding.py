"""Sentence embeddings without a head: the `sentence_encoder` model (checked against a float64 mean-pool +
L2-norm reference over transformers' own MiniLM), the evaluation metrics (against scipy / scikit-learn or
by hand), the served teacher embeddings, the task's refusals and runs on a tiny table (fresh tiny encoders
over the real MiniLM tokenizer), and one slow `distill run` with the real all-MiniLM-L6-v2 teacher."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from cli_helpers import distill, refused
from data_helpers import missing_data
from distill.errors import UserError
from distill.models import build_model
from distill.pretrained import pretrained_folder
from distill.tasks.embedding_eval import (
    knn_scores,
    label_metrics,
    ndcg_at_10,
    pair_similarities,
    similarity_spearman,
    spearman,
)

TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
TEACHER = {"num_hidden_layers": 1, "hidden_size": 48, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def minilm() -> str:
    try:
        return pretrained_folder("all-MiniLM-L6-v2")
    except UserError as err:
        missing_data(str(err))


def padded_ids() -> torch.Tensor:
    ids = torch.randint(1000, 20000, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 101
    ids[1, 7:], ids[2, 3:] = 0, 0
    return ids


# ------------------------------------------------------------------------------------------------ model


def test_the_teacher_is_minilm_mean_pooled_and_normalised_as_sentence_transformers_runs_it(
    minilm: str,
) -> None:
    """Reference: transformers' AutoModel on the unpadded texts one by one, mean over tokens in float64,
    divided by the norm (the folder's Pooling + Normalize modules)."""
    from transformers import AutoModel

    pooling = json.loads((Path(minilm) / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = [m["type"] for m in json.loads((Path(minilm) / "modules.json").read_text())]
    assert modules[-1].endswith("Normalize")
    teacher = build_model("sentence_encoder", num_classes=0, input_shape=(12,), path=minilm, normalize=True)
    reference_model = AutoModel.from_pretrained(minilm).eval()
    ids = padded_ids()
    with torch.inference_mode():
        got = teacher.eval()(ids)
        for row in range(len(ids)):
            real = ids[row][ids[row] != 0][None]
            hidden = reference_model(input_ids=real).last_hidden_state.double()
            want = F.normalize(hidden.mean(1), dim=-1)[0]
            assert torch.allclose(got[row].double(), want, atol=1e-5)
    assert got.shape == (3, 384) and torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_a_student_is_projected_to_the_width_asked_for(minilm: str) -> None:
    student = build_model("sentence_encoder", num_classes=384, input_shape=(12,), path=minilm, config=TINY)
    assert student(padded_ids()).shape == (3, 384)
    assert student.feature_layers()[-2:] == ["pooled", "embedding"]
    own = build_model(
        "sentence_encoder", num_classes=384, input_shape=(12,), path=minilm, config=TINY, projection=False
    )
    assert own(padded_ids()).shape == (3, 32)
    kept = build_model(
        "sentence_encoder", num_classes=384, input_shape=(12,), path=minilm, keep_layers=[0, 2, 4]
    )
    assert kept.num_layers == 3 and isinstance(kept.projection, torch.nn.Identity)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"projection": 0}, "projection must be a positive width"),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ({"pooling": "max"}, "pooling must be one of"),
    ],
)
def test_bad_model_parameters_are_refused_in_one_line(minilm: str, params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_model("sentence_encoder", num_classes=8, input_shape=(12,), path=minilm, config=TINY, **params)


def test_padding_does_not_change_an_embedding(minilm: str) -> None:
    torch.manual_seed(0)
    student = build_model(
        "sentence_encoder", num_classes=16, input_shape=(12,), path=minilm, config=TINY
    ).eval()
    ids = padded_ids()
    with torch.inference_mode():
        alone = student(ids[2:3, :3])
        batched = student(ids)[2:3]
    assert torch.allclose(alone, batched, atol=1e-5)


# ---------------------------------------------------------------------------------------------- metrics


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=3, max_size=40, unique=True), st.integers(0, 2**31 - 1))
def test_spearman_matches_scipy(values: list[float], seed: int) -> None:
    from scipy.stats import spearmanr

    a = torch.tensor(values, dtype=torch.float64)
    b = a[torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))] + 0.5 * a
    if len(set(b.tolist())) < len(b):
        return  # scipy averages tied ranks; continuous similarities have none
    assert spearman(a, b) == pytest.approx(float(spearmanr(a.numpy(), b.numpy()).statistic), abs=1e-9)


def test_similarity_spearman_is_one_for_a_rotation_and_scale_of_the_teacher() -> None:
    teacher = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert similarity_spearman(3.0 * teacher @ rotation, teacher) == pytest.approx(1.0)
    assert pair_similarities(teacher).shape == (50 * 49 // 2,)
    noise = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    assert abs(similarity_spearman(noise, teacher)) < 0.2


def test_knn_votes_by_count_and_breaks_ties_by_similarity() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.8]])
    predicted = knn_scores(train, labels, test, classes=2, k=4).argmax(-1)
    assert predicted.tolist() == [0, 1, 0]  # the third: a 2-2 vote, label 0's neighbours are nearer
    assert knn_scores(train, labels, test, classes=2, k=1).argmax(-1).tolist() == [0, 1, 0]


def test_label_metrics_are_perfect_on_separable_embeddings_and_match_scikit_learn_f1() -> None:
    from sklearn.metrics import f1_score

    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    train_labels, test_labels = torch.arange(60) % 3, torch.arange(30) % 3
    train = centres[train_labels] + 0.3 * torch.randn(60, 8, generator=generator)
    test = centres[test_labels] + 0.3 * torch.randn(30, 8, generator=generator)
    metrics = label_metrics(train, train_labels, test, test_labels, 3)
    assert metrics == {"knn_accuracy": 1.0, "knn_f1": 1.0, "probe_accuracy": 1.0, "probe_f1": 1.0}
    shuffled = test_labels[torch.randperm(30, generator=generator)]
    noisy = label_metrics(train, train_labels, test, shuffled, 3)
    predicted = knn_scores(train, train_labels, test, 3).argmax(-1)
    expected = f1_score(shuffled.numpy(), predicted.numpy(), average="macro", zero_division=0)
    assert noisy["knn_f1"] == pytest.approx(expected)


def test_ndcg_at_10_by_hand() -> None:
    docs = torch.eye(12)
    queries = torch.stack([docs[0], docs[1] + 0.1 * docs[5], 0.5 * docs[3] + docs[4]])
    positive = torch.tensor([0, 5, 3])  # ranks 1, 2 and 2
    expected = (1.0 + 1 / math.log2(3) + 1 / math.log2(3)) / 3
    assert ndcg_at_10(queries, docs, positive) == pytest.approx(expected)
    far = torch.stack([docs[i] for i in range(11)]).sum(0, keepdim=True) - 0.5 * docs[11]
    assert ndcg_at_10(far, docs, torch.tensor([11])) == 0.0


# ------------------------------------------------------------------------------------------------- task


def write_reviews(folder: Path) -> Path:
    rows = [
        ("great film, loved every minute", "pos"),
        ("a warm, funny and clever story", "pos"),
        ("dull, slow and far too long", "neg"),
        ("the plot made no sense at all", "neg"),
    ] * 12
    path = folder / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def embedding_recipe(path: Path, minilm: str, teacher: dict | None = None, **changes: object) -> dict:
    def distil(metric: str) -> dict:
        params = {"metric": metric, "student_layer": "embedding", "teacher_layer": "embedding"}
        return {"name": "embedding_distill", "params": params}

    recipe = {
        "name": "tiny-embedding",
        "task": "text_embedding",
        "data": {"name": "text_table", "params": {"path": str(path), "max_length": 16}, "batch_size": 8},
        "teacher": teacher
        or {"name": "sentence_encoder", "params": {"path": minilm, "config": TEACHER, "normalize": True}},
        "student": {"name": "sentence_encoder", "params": {"path": minilm, "config": TINY}},
        "methods": [
            {"name": "mse", "objectives": [distil("mse")]},
            {"name": "cosine", "objectives": [distil("cosine")]},
        ],
        "optimizer": {"name": "adamw", "lr": 0.003},
        "trainer": {"epochs": 2, "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": True},
    }
    recipe.update(changes)
    return recipe


def run(recipe: dict, out: Path, **options: object):  # noqa: ANN201
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    return run_recipe(recipe_from_dict(recipe, "tiny-embedding"), out=out, progress=False, **options)


def test_the_packaged_recipe_is_a_text_embedding_recipe() -> None:
    from distill.recipe.load import load_recipe
    from distill.tasks import task_for

    recipe = load_recipe("text_embedding")
    assert task_for(recipe).name == "text_embedding" and recipe.data.name == "sms_spam"


def test_a_tiny_embedding_run_trains_both_metrics_and_reports(tmp_path: Path, minilm: str) -> None:
    from distill.report import write_report

    result = run(embedding_recipe(write_reviews(tmp_path), minilm), tmp_path / "run")
    teacher = result.teacher
    assert teacher is not None and teacher.metrics["teacher_cosine"] == pytest.approx(1.0)
    for method in result.methods:
        final = method.runs[0].result.final
        assert -1.0 <= final["teacher_cosine"] <= 1.0 and -1.0 <= final["spearman"] <= 1.0
        assert 0.0 <= final["knn_f1"] <= 1.0 and final["accuracy"] == final["knn_accuracy"]
    report = write_report(result).read_text()
    assert "cos to teacher" in report and "probe F1 %" in report and "(batch 64)" in report
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["width"] == 48


def test_distillation_moves_the_student_towards_the_teacher(tmp_path: Path, minilm: str) -> None:
    from distill.tasks.text_embedding import TextEmbeddingTask

    recipe = embedding_recipe(write_reviews(tmp_path), minilm, trainer={"epochs": 6, "threads": 1})
    recipe["methods"] = recipe["methods"][1:]
    result = run(recipe, tmp_path / "run")
    history = [row for row in result.methods[0].runs[0].result.history if "teacher_cosine" in row]
    from distill.recipe.load import recipe_from_dict
    from distill.runfolder import RunFolder

    task = TextEmbeddingTask()
    parsed = recipe_from_dict(recipe, "tiny-embedding")
    from rich.console import Console

    setup = task.prepare(parsed, RunFolder(tmp_path / "probe"), progress=False, console=Console(quiet=True))
    torch.manual_seed(0)
    at_init = setup.fit_settings["evaluator"](task.build_student(parsed, setup))
    assert history[-1]["teacher_cosine"] > at_init["teacher_cosine"] + 0.1


def test_the_served_embeddings_are_the_live_teachers(minilm: str) -> None:
    from distill.tasks.embedding_eval import embed
    from distill.tasks.text_embedding import EmbeddingTeacher
    from distill.teachers import TeacherRequest

    torch.manual_seed(0)
    teacher = build_model("sentence_encoder", num_classes=0, input_shape=(12,), path=minilm, config=TEACHER)
    ids = padded_ids()
    table = embed(teacher, ids, pad_id=0)
    served = EmbeddingTeacher(teacher, table)
    served.attach("cpu", nullcontext, ["embedding"])
    assert served.served
    index = torch.tensor([2, 0])
    rows = served.outputs(TeacherRequest(ids[index], index=index)).features["embedding"]
    live = EmbeddingTeacher(teacher, table)
    live.attach("cpu", nullcontext, ["embedding", "pooled"])
    assert not live.served
    features = live.outputs(TeacherRequest(ids[index], index=index)).features
    assert torch.allclose(rows, features["embedding"], atol=1e-5) and "pooled" in features
    live.detach()


def test_tinybert_hidden_reads_the_live_teacher_blocks(tmp_path: Path, minilm: str) -> None:
    recipe = embedding_recipe(write_reviews(tmp_path), minilm, trainer={"epochs": 1, "threads": 1})
    recipe["methods"] = [
        {
            "name": "hidden + embedding",
            "objectives": [
                {"name": "tinybert_hidden", "weight": 1.0},
                {"name": "embedding_distill", "params": {"student_layer": "embedding", "teacher_layer": -1}},
            ],
        }
    ]
    result = run(recipe, tmp_path / "run")
    assert "teacher_cosine" in result.methods[0].runs[0].result.final


def test_a_student_of_another_width_is_refused_before_the_run_folder(tmp_path: Path, minilm: str) -> None:
    recipe = embedding_recipe(write_reviews(tmp_path), minilm)
    recipe["student"]["params"]["projection"] = False
    with pytest.raises(UserError, match="the student embeds into 32 dimensions, the teacher into 48"):
        run(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_a_recipe_without_texts_or_teacher_is_refused(tmp_path: Path, minilm: str) -> None:
    recipe = embedding_recipe(write_reviews(tmp_path), minilm, data={"name": "digits"})
    with pytest.raises(UserError, match="task 'text_embedding' reads texts"):
        run(recipe, tmp_path / "run")
    no_teacher = embedding_recipe(write_reviews(tmp_path), minilm)
    del no_teacher["teacher"]
    with pytest.raises(UserError, match="needs a teacher"):
        run(no_teacher, tmp_path / "run2")


@pytest.mark.slow
def test_cache_resume_and_export_refusal(
    tmp_path: Path, minilm: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`distill cache --hidden embedding` stores the teacher's embeddings; a run reads them (no teacher
    model: label metrics only), `--resume` of the finished run ends with the same metrics, and `distill
    export` refuses the run in one line."""
    from distill.build_cache import make_cache
    from distill.recipe.load import recipe_from_dict

    data = embedding_recipe(write_reviews(tmp_path), minilm)
    make_cache(
        recipe_from_dict(data, "tiny-embedding"),
        tmp_path / "cache",
        k=1,
        hidden=("embedding",),
        progress=False,
    )
    cached = dict(data, teacher={"cache": str(tmp_path / "cache")})
    first = run(cached, tmp_path / "run")
    assert first.teacher is not None and first.teacher.source == "offline"
    final = first.methods[0].runs[0].result.final
    assert "knn_f1" in final and "teacher_cosine" not in final
    again = run(cached, tmp_path / "run", resume=True)
    assert again.methods[0].runs[0].result.final == final
    from distill.report import write_report

    write_report(again)  # metrics.json: a finished run
    capsys.readouterr()  # the runs' console lines
    line = refused(monkeypatch, capsys, "export", tmp_path / "run", "--out", tmp_path / "export")
    assert "text_embedding" in line


@pytest.mark.slow
def test_distill_run_with_the_real_minilm_teacher(
    tmp_path: Path, minilm: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    recipe = embedding_recipe(
        write_reviews(tmp_path),
        minilm,
        teacher={"name": "sentence_encoder", "params": {"path": "all-MiniLM-L6-v2", "normalize": True}},
    )
    recipe["methods"] = recipe["methods"][:1]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = distill(monkeypatch, capsys, "run", path, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["width"] == 384 and metrics["teacher"]["parameters"] > 22_000_000
    assert "cos to teacher" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_the_quick_benchmark_writes_its_table(tmp_path: Path, minilm: str) -> None:
    from bench_helpers import load_benchmark
    from data_helpers import require_data

    require_data("textcls/SMSSpamCollection.tsv")
    out = tmp_path / "text_embedding.md"
    load_benchmark("text_embedding").main(["--quick", "--out", str(out)])
    text = out.read_text()
    for row in ("| teacher (all-MiniLM-L6-v2) |", "| 2x128 cosine distil |", "| blocks [0, 2, 4] at init |"):
        assert row in text
    assert "Claims" in text and "batch 64" in text
