"""Detection distillation (S27, CLoCKDistill): the shapes data drawn from a seed, the losses against float64
references written here (and against transformers' DETR box utilities), the small DETR's pieces, and the
quick benchmark (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bench_helpers import load_benchmark
from distill.data.detection import CLASSES, ShapesConfig, detection_splits, make_detection_set
from distill.errors import UserError
from distill.losses.detection import (
    box_corners,
    location_weights,
    matching_cost,
    memory_distillation_loss,
    paired_giou,
    paired_query_kd,
)

# ------------------------------------------------------------------------------------ data


def test_shapes_are_deterministic_from_the_seed_and_well_formed() -> None:
    first, again, other = (make_detection_set(20, s) for s in (3, 3, 4))
    assert torch.equal(first.images, again.images)
    assert all(torch.equal(a, b) for a, b in zip(first.boxes, again.boxes, strict=True))
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (20, 3, 64, 64)
    assert float(first.images.min()) >= 0.0 and float(first.images.max()) <= 1.0
    for labels, boxes in zip(first.labels, first.boxes, strict=True):
        assert 1 <= len(labels) <= 4 and boxes.shape == (len(labels), 4)
        assert int(labels.min()) >= 0 and int(labels.max()) < len(CLASSES)
        corners = box_corners(boxes)
        assert float(corners.min()) >= 0.0 and float(corners.max()) <= 1.0


def test_splits_differ_and_bad_settings_are_refused() -> None:
    splits = detection_splits(0, 8, 4, 4)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [8, 4, 4]
    assert not torch.equal(splits["validation"].images, splits["test"].images)
    with pytest.raises(UserError, match="min_side"):
        make_detection_set(2, 0, ShapesConfig(min_side=30, max_side=20))
    with pytest.raises(UserError, match="at least one image"):
        make_detection_set(0, 0)


# ------------------------------------------------------------------------------------ float64 references


def _corners(box: list[float]) -> list[float]:
    cx, cy, w, h = box
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _giou(a: list[float], b: list[float]) -> float:
    ax0, ay0, ax1, ay1 = _corners(a)
    bx0, by0, bx1, by1 = _corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    row = [v / temperature for v in row]
    finite = [v for v in row if v != -math.inf]
    top = max(finite)
    norm = top + math.log(sum(math.exp(v - top) for v in finite))
    return [v - norm if v != -math.inf else -math.inf for v in row]


def _kd_reference(s_logits, t_logits, s_boxes, t_boxes, weights, temperature, l1, g) -> float:
    total = 0.0
    for k in range(len(s_logits)):
        log_p, log_q = _log_softmax(t_logits[k], temperature), _log_softmax(s_logits[k], temperature)
        kl = sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True) if a != -math.inf)
        box = l1 * sum(abs(x - y) for x, y in zip(s_boxes[k], t_boxes[k], strict=True))
        box += g * (1 - _giou(s_boxes[k], t_boxes[k]))
        total += temperature**2 * kl + weights[k] * box
    return total / len(s_logits)


def _boxes(n: int, generator: torch.Generator) -> Tensor:
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
    return torch.cat((centre, size), -1)


def test_giou_matches_a_float64_reference_and_transformers() -> None:
    from transformers.loss.loss_for_object_detection import generalized_box_iou

    g = torch.Generator().manual_seed(0)
    a, b = _boxes(9, g), _boxes(9, g)
    ours = paired_giou(a, b)
    reference = [_giou(x.tolist(), y.tolist()) for x, y in zip(a.double(), b.double(), strict=True)]
    assert ours.tolist() == pytest.approx(reference, abs=1e-5)
    public = generalized_box_iou(box_corners(a), box_corners(b)).diagonal()
    torch.testing.assert_close(ours, public, atol=1e-5, rtol=1e-5)


def test_paired_query_kd_matches_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(6, 4, generator=g), 2 * torch.randn(6, 4, generator=g)
    s_boxes, t_boxes = _boxes(6, g), _boxes(6, g)
    weights = torch.rand(6, generator=g)
    for temperature in (1.0, 2.5):
        ours = paired_query_kd(s_logits, t_logits, s_boxes, t_boxes, weights, temperature, 5.0, 2.0)
        reference = _kd_reference(
            s_logits.double().tolist(),
            t_logits.double().tolist(),
            s_boxes.double().tolist(),
            t_boxes.double().tolist(),
            weights.double().tolist(),
            temperature,
            5.0,
            2.0,
        )
        assert float(ours) == pytest.approx(reference, rel=1e-5)
        assert ours.dtype == torch.float32
    # the KL term is torch's own kl_div (a public implementation) when boxes agree
    same = paired_query_kd(s_logits, t_logits, t_boxes, t_boxes)
    public = (
        torch.nn.functional.kl_div(
            s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
    )
    torch.testing.assert_close(same, public, atol=1e-5, rtol=1e-5)


def test_paired_query_kd_low_precision_empty_and_minus_inf() -> None:
    g = torch.Generator().manual_seed(2)
    s_logits, t_logits = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    s_boxes, t_boxes = _boxes(5, g), _boxes(5, g)
    full = paired_query_kd(s_logits, t_logits, s_boxes, t_boxes)
    half = paired_query_kd(s_logits.bfloat16(), t_logits.bfloat16(), s_boxes.bfloat16(), t_boxes.bfloat16())
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(full), rel=0.05)
    empty = paired_query_kd(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    assert float(empty) == 0.0
    s_logits[:, 1] = -math.inf
    t_logits[:, 1] = -math.inf
    s_logits.requires_grad_(True)
    value = paired_query_kd(s_logits, t_logits, s_boxes, t_boxes)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s_logits.grad).all()
    with pytest.raises(ValueError, match="logits must both be"):
        paired_query_kd(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(3, 4))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 10_000))
def test_paired_query_kd_is_zero_only_on_agreement(count: int, classes: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits, boxes = torch.randn(count, classes, generator=g), _boxes(count, g)
    assert float(paired_query_kd(logits, logits, boxes, boxes)) == pytest.approx(0.0, abs=2e-4)  # GIoU eps
    other = paired_query_kd(torch.randn(count, classes, generator=g), logits, _boxes(count, g), boxes)
    assert float(other) > 0.0


def test_location_weights_split_alpha_over_objects_and_beta_over_background() -> None:
    boxes = [torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.8, 0.8, 0.25, 0.25]]), torch.zeros(0, 4)]
    weights = location_weights(boxes, 8, 8, alpha=2.0, beta=0.5)
    assert weights.shape == (2, 64)
    grid = weights[0].reshape(8, 8)
    # the first box covers the 4 x 4 top-left cells, the second the 2 x 2 cells (5..6, 5..6)
    assert float(grid[:4, :4].sum()) == pytest.approx(2.0)
    assert float(grid[5:7, 5:7].sum()) == pytest.approx(2.0)
    assert float(weights[0].sum()) == pytest.approx(2.0 * 2 + 0.5)
    assert torch.allclose(weights[1], torch.full((64,), 0.5 / 64))


def test_memory_loss_matches_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    weights = torch.rand(2, 6, generator=g)
    reference = (
        sum(
            float(weights[b, p])
            * sum((float(teacher[b, p, d]) - float(student[b, p, d])) ** 2 for d in range(5))
            / 5
            for b in range(2)
            for p in range(6)
        )
        / 2
    )
    assert float(memory_distillation_loss(student, teacher, weights)) == pytest.approx(reference, rel=1e-5)
    low = memory_distillation_loss(student.half(), teacher.half(), weights)
    assert low.dtype == torch.float32
    assert float(memory_distillation_loss(teacher, teacher, weights)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        memory_distillation_loss(student[..., :4], teacher, weights)


def test_matching_cost_matches_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(4)
    s_logits, t_logits = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    s_boxes, t_boxes = _boxes(3, g), _boxes(5, g)
    cost = matching_cost(s_logits, s_boxes, t_logits, t_boxes)
    assert cost.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            p = [math.exp(v) for v in _log_softmax(s_logits[i].double().tolist())]
            q = [math.exp(v) for v in _log_softmax(t_logits[j].double().tolist())]
            expected = -sum(a * b for a, b in zip(p, q, strict=True))
            expected += 5 * sum(
                abs(a - b) for a, b in zip(s_boxes[i].tolist(), t_boxes[j].tolist(), strict=True)
            )
            expected -= 2 * _giou(s_boxes[i].tolist(), t_boxes[j].tolist())
            assert float(cost[i, j]) == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------ the small DETR


def test_small_detr_pieces() -> None:
    from distill.models.detr import (
        DetrSize,
        SmallDetr,
        denoising_loss,
        hungarian_pairs,
        pad_targets,
        predictions,
    )

    torch.manual_seed(0)
    teacher = SmallDetr(DetrSize(d_model=32, layers=1, channels=(8, 16), queries=5), 3)
    student = SmallDetr(DetrSize(d_model=16, layers=1, channels=(8, 8), queries=5), 3)
    assert all(p.requires_grad for p in student.parameters())
    data = make_detection_set(3, 0)
    padded = pad_targets(data.targets(range(3)))
    t_encoded, t_decoded = teacher(data.images)
    s_encoded, s_decoded = student(data.images)
    assert t_encoded.grid == s_encoded.grid == (8, 8)
    assert t_encoded.memory.shape == (3, 64, 32) and s_encoded.memory.shape == (3, 64, 16)
    assert s_decoded.logits.shape == (3, 5, 4) and s_decoded.boxes.shape == (3, 5, 4)
    aware = student.decode(s_encoded, *student.target_queries(padded.labels, padded.boxes), padded.mask)
    assert aware.logits.shape[:2] == padded.mask.shape
    loss = student.detection_loss(s_decoded, data.targets(range(3)))
    loss = loss + denoising_loss(student, s_encoded, padded, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    for rows, cols in hungarian_pairs(s_decoded, t_decoded):
        assert sorted(rows.tolist()) == sorted(cols.tolist()) == list(range(5))
    (first, *_) = predictions(s_decoded)
    assert first["boxes"].shape == (5, 4) and int(first["labels"].max()) < 3


def test_learned_queries_start_apart() -> None:
    """transformers initialises DETR's query embeddings from N(0, 0.02); at random init the learned queries
    were then copies of each other (box spread across queries ~1e-8) and training could not separate them
    (64 images not overfitted). SmallDetr uses DETR's own initialisation (`detr_initialisation`)."""
    from distill.models.detr import DetrSize, SmallDetr

    data = make_detection_set(4, 0)
    for seed in range(3):
        torch.manual_seed(seed)
        model = SmallDetr(DetrSize(d_model=32, layers=1, channels=(8, 16), queries=5), 3).eval()
        queries = model.detr.model.query_position_embeddings.weight
        assert 0.5 < float(queries.std()) < 2.0
        with torch.no_grad():
            _, decoded = model(data.images)
        assert float(decoded.boxes.std(dim=1).mean()) > 1e-4  # queries give different boxes


# ------------------------------------------------------------------------------------ the benchmark


def test_coco_map_is_one_for_the_ground_truth_and_lower_for_shifted_boxes() -> None:
    pytest.importorskip("pycocotools")
    bench = load_benchmark("detection")
    data = make_detection_set(6, 1)
    truths = [{"boxes": box_corners(t["boxes"]), "labels": t["class_labels"]} for t in data.targets(range(6))]
    perfect = [
        {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in truths
    ]
    assert bench.coco_map(perfect, truths, 64) == {"map": pytest.approx(1.0), "map_50": pytest.approx(1.0)}
    shifted = [{**p, "boxes": p["boxes"] + 0.03} for p in perfect]
    scores = bench.coco_map(shifted, truths, 64)
    assert scores["map"] < 1.0


@pytest.mark.slow
def test_the_quick_benchmark_writes_its_table(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    out = tmp_path / "detection.md"
    assert load_benchmark("detection").main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("| teacher |", "| alone |", "| logit KD |", "| CLoCKDistill |", "Paper's claim"):
        assert row in text
    assert out.with_suffix(".png").is_file()
