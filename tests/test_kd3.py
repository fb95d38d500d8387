"""KD^3 (S35): the `kd3` source's selection (`distill.sources.kd3`), its alignment objective
(`distill.objectives.kd3`), the shifted transfer set (`distill.data.shift`) and a run through `run_recipe`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from distill.data import build_data
from distill.errors import UserError
from distill.objectives import Progress, StepOutputs
from distill.objectives.base import build_objective
from distill.objectives.kd3 import (
    classifier_alignment,
    combined_prediction,
    student_share,
    teacher_classifier,
    weighted_feature_alignment,
)
from distill.sources.kd3 import KD3Batches, KD3Settings, kd3_select
from distill.tasks.base import task_named
from distill.tasks.kd3 import check_kd3_method, kd3_settings

# ------------------------------------------------------------------------------------------ the selection


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


TEACHER = [[0.90, 0.05, 0.05], [0.60, 0.30, 0.10], [0.40, 0.35, 0.25]]
STUDENT = [[0.20, 0.70, 0.10], [0.10, 0.80, 0.10], [0.40, 0.35, 0.25]]


def test_selection_keeps_rows_by_the_combined_prediction_computed_by_hand() -> None:
    # s = 0.5: r = [0.55, 0.375, 0.075], [0.35, 0.55, 0.10], [0.40, 0.35, 0.25]
    selection = kd3_select(_logits(TEACHER), _logits(STUDENT), 0.5, 0.5)
    assert selection.keep.tolist() == [True, True, False]
    assert selection.labels.tolist() == [0, 1, 0]
    assert torch.allclose(selection.confidence, torch.tensor([0.55, 0.55, 0.40]), atol=1e-6)
    # tau 0.6 drops the rows where teacher and student disagree (the mixture spreads its mass)
    assert kd3_select(_logits(TEACHER), _logits(STUDENT), 0.5, 0.6).keep.tolist() == [False, False, False]
    # s = 0 (the start of training): the teacher alone, r = its prediction
    alone = kd3_select(_logits(TEACHER), _logits(STUDENT), 0.0, 0.5)
    assert alone.keep.tolist() == [True, True, False] and alone.labels.tolist() == [0, 0, 0]


def test_the_student_share_grows_with_training() -> None:
    assert student_share(0.0) == 0.0
    assert student_share(0.5) == pytest.approx(0.25)
    assert student_share(1.0) == pytest.approx(0.5)
    assert student_share(2.0, 0.8) == pytest.approx(0.8)  # clipped at the end of training
    r = combined_prediction(_logits(TEACHER), _logits(STUDENT), 0.25)
    expected = 0.75 * torch.tensor(TEACHER) + 0.25 * torch.tensor(STUDENT)
    assert r.dtype == torch.float32 and torch.allclose(r, expected.float(), atol=1e-6)


class _Fixed(nn.Module):
    """A model whose logits are its inputs, permuted: what the selection reads is set by the test."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        self.order = order
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.order] + 0 * self.weight


def test_the_batch_transform_masks_dropped_rows_and_pseudo_labels_kept_ones() -> None:
    teacher_rows = _logits(TEACHER + [[0.1, 0.1, 0.8]])
    # the student's logits are the teacher's columns in another order
    transform = KD3Batches(
        KD3Settings(), _Fixed([0, 1, 2]), 6, outlier=torch.tensor([0, 0, 0, 1, 1, 0]).bool()
    )
    batch = {
        "inputs": teacher_rows,
        "labels": torch.tensor([2, 2, 2, 2]),
        "index": torch.tensor([0, 2, 4, 3]),
        "mask": torch.tensor([True, True, True, False]),
    }
    out = transform(batch, _Fixed([2, 1, 0]), Progress(100, 100, 1.0))  # s = 0.5 at the end
    # rows: r0 = 0.5 q + 0.5 q[::-1] = [0.475, 0.05, 0.475] -> 0.475 < 0.5 dropped
    #       r1 = [0.35, 0.30, 0.35] dropped; r2 = [0.325, 0.35, 0.325] dropped; r3 masked before
    assert out["mask"].tolist() == [False, False, False, False]
    transform = KD3Batches(
        KD3Settings(), _Fixed([0, 1, 2]), 6, outlier=torch.tensor([0, 0, 0, 1, 1, 0]).bool()
    )
    out = transform(batch, _Fixed([0, 1, 2]), Progress(100, 100, 1.0))  # teacher and student agree
    assert out["mask"].tolist() == [True, True, False, False]
    assert out["labels"].tolist() == [0, 0, 2, 2]  # kept rows take argmax r; the others keep theirs
    assert out["index"] is batch["index"]
    report = transform.report()
    assert report["kd3_kept_rate"] == pytest.approx(2 / 3)  # of the 3 rows the mask let in
    assert report["kd3_used"] == pytest.approx(2 / 6)
    # ids 0 and 2 are real rows (both kept), id 4 an outlier (dropped), id 3 was masked before
    assert report["kd3_real_kept_rate"] == 1.0 and report["kd3_outlier_kept_rate"] == 0.0
    keep_labels = KD3Batches(KD3Settings(pseudo_labels=False), _Fixed([0, 1, 2]), 6)
    assert keep_labels(batch, _Fixed([0, 1, 2]), Progress(0, 100, 0.0))["labels"].tolist() == [2, 2, 2, 2]


def test_the_batch_transform_refuses_batches_without_sample_ids() -> None:
    transform = KD3Batches(KD3Settings(), _Fixed([0, 1, 2]), 3)
    with pytest.raises(UserError, match="sample ids"):
        transform((_logits(TEACHER), torch.tensor([0, 1, 2])), _Fixed([0, 1, 2]), Progress(0, 1, 0.0))


# ------------------------------------------------------------------------------------------ the alignment


def _reference_feature(projected, teacher, weights, mask) -> float:
    p, t, w = (np.asarray(a, dtype=np.float64) for a in (projected, teacher, weights))
    m = np.ones(len(p), dtype=bool) if mask is None else np.asarray(mask)
    per_row = ((p - t) ** 2).mean(1)
    return float((w * per_row * m).sum() / max(1, m.sum()))


def _reference_classifier(projected, teacher_logits, weight, bias, weights, mask, temperature) -> float:
    p, z, w_, b, w = (
        np.asarray(a, dtype=np.float64) for a in (projected, teacher_logits, weight, bias, weights)
    )
    m = np.ones(len(p), dtype=bool) if mask is None else np.asarray(mask)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    target = log_softmax(z / temperature)
    student = log_softmax((p @ w_.T + b) / temperature)
    kl = (np.exp(target) * (target - student)).sum(1)
    return float((w * kl * m).sum() / max(1, m.sum()) * temperature**2)


@pytest.mark.parametrize("masked", [False, True])
def test_alignment_terms_match_float64_reference_maths(masked: bool) -> None:
    g = torch.Generator().manual_seed(0)
    projected, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    weights = torch.rand(6, generator=g)
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    value = weighted_feature_alignment(projected, teacher, weights, mask=mask)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(_reference_feature(projected, teacher, weights, mask), rel=1e-5)
    logits, weight, bias = (
        torch.randn(6, 4, generator=g),
        torch.randn(4, 5, generator=g),
        torch.randn(4, generator=g),
    )
    for t in (1.0, 4.0):
        value = classifier_alignment(
            projected.half(), logits, weight, bias, weights, mask=mask, temperature=t
        )
        expected = _reference_classifier(projected.half().float(), logits, weight, bias, weights, mask, t)
        assert value.dtype == torch.float32 and value.item() == pytest.approx(expected, rel=1e-4)


def _objective_outputs(student_feature, teacher_feature, teacher_logits, student_logits, mask=None):
    return StepOutputs(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        mask=mask,
        student_features={"s": student_feature},
        teacher_features={"t": teacher_feature},
        progress=Progress(50, 100, 1.0),
    )


def test_the_objective_weighs_rows_by_the_combined_prediction_and_trains_only_its_projector() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    objective = build_objective("kd3_align", {"student_share": 0.5})
    objective.resolve_paths(nn.Linear(2, 3), teacher)
    objective.bind_layers(["s"], ["t"])
    objective.build([torch.Size([2, 2])], [torch.Size([2, 4])], 10)
    assert teacher_classifier(teacher) is teacher[2]
    assert not any(p is teacher[2].weight for p in objective.parameters())  # the teacher's layer is no part
    student_feature = torch.randn(5, 2, requires_grad=True)
    teacher_feature, teacher_logits, student_logits = torch.randn(5, 4), torch.randn(5, 3), torch.randn(5, 3)
    mask = torch.tensor([True, True, False, True, True])
    value = objective(
        _objective_outputs(student_feature, teacher_feature, teacher_logits, student_logits, mask)
    )
    share = 0.25  # student_share x the fraction of training done (0.5)
    weights = combined_prediction(teacher_logits, student_logits, share).amax(-1)
    projected = objective.projector(student_feature).detach()
    layer = teacher[2]
    expected = _reference_feature(projected, teacher_feature, weights, mask) + _reference_classifier(
        projected, teacher_logits, layer.weight.detach(), layer.bias.detach(), weights, mask, 1.0
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert student_feature.grad is not None and objective.projector.weight.grad is not None
    assert layer.weight.grad is None  # the teacher's classifier stays frozen
    # a step without teacher logits: the teacher's classifier reads the teacher features given
    with torch.no_grad():
        own = layer(teacher_feature)
    given = objective(_objective_outputs(student_feature, teacher_feature, own, student_logits, mask))
    derived = objective(_objective_outputs(student_feature, teacher_feature, None, student_logits, mask))
    assert derived.item() == pytest.approx(given.item(), rel=1e-6)
    assert not build_objective("kd3_align").needs_teacher_logits
    assert build_objective("kd3_align", {"classifier_weight": 0}).needs_teacher_logits


def test_objective_refusals_are_one_line() -> None:
    with pytest.raises(UserError, match="both 0"):
        build_objective("kd3_align", {"feature_weight": 0, "classifier_weight": 0})
    with pytest.raises(UserError, match="student_share"):
        build_objective("kd3_align", {"student_share": 1.5})
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        build_objective("kd3_align", {"temperture": 2.0})
    objective = build_objective("kd3_align")
    with pytest.raises(UserError, match="classifier_weight: 0"):
        objective.resolve_paths(nn.Linear(2, 3), None)  # a teacher cache: no classifier to read
    build_objective("kd3_align", {"classifier_weight": 0}).resolve_paths(nn.Linear(2, 3), None)
    objective.resolve_paths(nn.Linear(2, 3), nn.Linear(4, 3))
    with pytest.raises(UserError, match="feature vectors"):
        objective.build([torch.Size([2, 3, 4, 4])], [torch.Size([2, 4])], 10)
    with pytest.raises(UserError, match="reads 4 features but teacher_layer gives 6"):
        objective.build([torch.Size([2, 3])], [torch.Size([2, 6])], 10)


def test_source_settings_refusals_are_one_line() -> None:
    assert kd3_settings({}) == KD3Settings(threshold=0.5, student_share=0.5, pseudo_labels=True)
    with pytest.raises(UserError, match="threshold must lie in"):
        kd3_settings({"threshold": 1.5})
    with pytest.raises(UserError, match="did you mean 'threshold'"):
        kd3_settings({"treshold": 0.5})
    with pytest.raises(UserError, match="pseudo_labels"):
        kd3_settings({"pseudo_labels": "yes"})


# ------------------------------------------------------------------------------------------ the shift


def test_the_shift_splits_the_base_in_two_and_is_seeded() -> None:
    plain = build_data("shifted", imbalance=1.0, corruptions=[], outliers=0.0)
    base = build_data("digits")
    x, y = base.train.tensors
    teacher_x, transfer_x = plain.teacher_train.tensors[0], plain.train.tensors[0]
    assert len(teacher_x) + len(transfer_x) == len(x)  # every image on one side, none on both
    rows = {tuple(r.flatten().tolist()) for r in x}
    assert all(tuple(r.flatten().tolist()) in rows for r in torch.cat([teacher_x, transfer_x]))
    assert torch.equal(plain.test.tensors[0], base.test.tensors[0])  # the clean test split
    a, b = build_data("shifted"), build_data("shifted")
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.tensors[0], build_data("shifted", shift_seed=1).train.tensors[0])


def test_the_transfer_set_follows_the_long_tailed_profile_and_holds_its_outliers() -> None:
    data = build_data("shifted", imbalance=10.0, outliers=0.2)
    plain = build_data("shifted", imbalance=1.0, corruptions=[], outliers=0.0)
    available = np.bincount(plain.train.labels.numpy(), minlength=10)
    expected = np.maximum(1, np.rint(available * 10.0 ** (-np.arange(10) / 9))).astype(int)
    total = len(data.train)
    assert total == expected.sum()
    outlier = data.train.outlier
    assert int(outlier.sum()) == round(0.2 * total)
    # the real rows' class counts: the profile less the rows outliers replaced
    real = np.bincount(data.train.labels[~outlier].numpy(), minlength=10)
    assert (real <= expected).all() and real[0] > 5 * real[-1]
    assert data.train.corruption.tolist() and set(data.train.corruption.tolist()) <= {0, 1, 2}
    assert "imbalance 10" in data.description and "the test split clean" in data.description


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_corruption_statistics_match_cifar10c_constants(severity: int) -> None:
    from distill.data.shift import SEVERITIES, blur, corrupt

    g = torch.Generator().manual_seed(0)
    flat = torch.full((50, 1, 16, 16), 0.5)
    noisy = corrupt(flat, "gaussian_noise", severity, g)
    assert (noisy - flat).std().item() == pytest.approx(SEVERITIES["gaussian_noise"][severity - 1], rel=0.05)
    images = torch.rand(20, 1, 8, 8, generator=g)
    low = corrupt(images, "contrast", severity, g)
    ratio = (low - low.mean((-2, -1), keepdim=True)).std() / (
        images - images.mean((-2, -1), keepdim=True)
    ).std()
    assert ratio.item() == pytest.approx(SEVERITIES["contrast"][severity - 1], rel=1e-5)
    blurred = corrupt(images, "gaussian_blur", severity, g)
    assert blurred.std() < images.std()  # smoother
    assert torch.allclose(blur(flat, 1.0), flat)  # a constant image stays constant


def test_a_contrast_shift_scales_each_image_around_its_mean_in_pixel_space() -> None:
    plain = build_data("shifted", imbalance=1.0, corruptions=[], outliers=0.0)
    low = build_data("shifted", imbalance=1.0, corruptions=["contrast"], severity=2, outliers=0.0)
    pixels = lambda x: (x + 1) / 2  # noqa: E731  digits: [-1, 1] -> [0, 1] (the teacher part's range)
    a, b = pixels(plain.train.tensors[0]), pixels(low.train.tensors[0])
    deviation = lambda x: x - x.mean((-2, -1), keepdim=True)  # noqa: E731
    assert torch.allclose(deviation(b), 0.5 * deviation(a), atol=1e-5)
    shifted_test = build_data("shifted", corruptions=["contrast"], severity=2, shift_test=True)
    assert not torch.equal(shifted_test.test.tensors[0], plain.test.tensors[0])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"corruptions": ["fog"]}, "unknown corruption 'fog'"),
        ({"severity": 6}, "severity must be 1..5"),
        ({"imbalance": 0.5}, "imbalance must be"),
        ({"teacher_fraction": 1.0}, "teacher_fraction must lie in"),
        ({"outliers": 1.0}, "outliers must lie in"),
        ({"base_params": {"labelled_per_class": 5}}, "base_params.labelled_per_class is refused"),
        ({"base": "shifted"}, "cannot shift itself"),
    ],
)
def test_shift_refusals_are_one_line(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_data("shifted", **params)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ end to end


def _recipe(tmp_path: Path, methods: list[dict], teacher: dict | None = None):
    from distill.recipe.load import recipe_from_dict

    data = {
        "name": "kd3-test",
        "data": {"name": "shifted", "params": {"severity": 2}, "batch_size": 32, "eval_batch_size": 540},
        "teacher": teacher or {"name": "mlp", "params": {"hidden": [64]}, "train": {"epochs": 5}},
        "student": {"name": "mlp", "params": {"hidden": [16]}},
        "methods": methods,
        "trainer": {"epochs": 2, "device": "cpu", "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": False},
        "output": {"dir": str(tmp_path / "runs"), "tensorboard": False},
    }
    return recipe_from_dict(data, "kd3 test")


def test_run_recipe_trains_kd3_on_shifted_digits(tmp_path: Path) -> None:
    from distill.experiment import run_recipe

    kd = {"name": "hinton_kd", "weight": 1.0}
    methods = [
        {"name": "kd", "objectives": [kd]},
        {
            "name": "kd3",
            "objectives": [kd, {"name": "kd3_align", "weight": 1.0}],
            "source": {"name": "kd3", "params": {"threshold": 0.2}},  # a 5-epoch teacher is unsure
        },
    ]
    result = run_recipe(_recipe(tmp_path, methods), progress=False, console=Console(stderr=True))
    kd3 = next(m for m in result.methods if m.name == "kd3").runs[0].result.final
    assert math.isfinite(kd3["accuracy"]) and 0.0 < kd3["accuracy"] <= 1.0
    assert 0.0 < kd3["kd3_kept_rate"] <= 1.0 and 0.0 < kd3["kd3_used"] <= 1.0
    assert {"kd3_real_kept_rate", "kd3_outlier_kept_rate"} <= set(kd3)
    plain = next(m for m in result.methods if m.name == "kd").runs[0].result.final
    assert "kd3_kept_rate" not in plain


def test_recipe_refusals_are_one_line(tmp_path: Path) -> None:
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    kd = {"name": "hinton_kd", "weight": 1.0}
    with pytest.raises(UserError, match="threshold must lie in") as err:
        _recipe(
            tmp_path,
            [{"name": "m", "objectives": [kd], "source": {"name": "kd3", "params": {"threshold": 2}}}],
        )
    assert "\n" not in str(err.value).strip()
    no_teacher = _recipe(
        tmp_path, [{"name": "m", "objectives": [{"name": "cross_entropy"}], "source": {"name": "kd3"}}]
    )
    no_teacher = recipe_from_dict(no_teacher.model_dump(mode="json") | {"teacher": None}, "kd3 test")
    with pytest.raises(UserError, match="add a teacher"):
        run_recipe(no_teacher, progress=False, console=Console(stderr=True))
    assert not (tmp_path / "runs").exists()  # refused before any folder is made
    recipe = _recipe(tmp_path, [{"name": "m", "objectives": [kd], "source": {"name": "kd3"}}])
    cached = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"cache": "/some/cache"})})
    with pytest.raises(UserError, match="use a live teacher, not a cache"):
        check_kd3_method(cached, cached.method_list()[0], "method 'm': source 'kd3'")
    with pytest.raises(UserError, match="task 'graph' cannot serve it"):
        task_named("graph").check(recipe)
