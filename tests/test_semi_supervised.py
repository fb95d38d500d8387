"""Semi-supervised training sets (`labelled_per_class` + `unlabelled: true`): the rest of the training split
joins the student's set with its labels hidden (-100); label terms skip those rows, distillation terms use
them."""

from __future__ import annotations

import pytest
import torch

from data_helpers import require_data
from distill.data import build_data
from distill.errors import UserError
from distill.objectives import StepOutputs, build_objective
from distill.tasks.classification import check_labels


def test_digits_keep_every_image_and_hide_all_but_the_labelled_ones() -> None:
    labelled = build_data("digits", labelled_per_class=5)
    semi = build_data("digits", labelled_per_class=5, unlabelled=True)
    labels = semi.train.tensors[1]
    assert len(semi.train) == len(semi.teacher_train) == 1257
    assert int((labels != -100).sum()) == len(labelled.train) == 50
    # the labelled images are the same ones, with the same labels
    kept = labels != -100
    assert torch.equal(semi.train.tensors[0][kept], labelled.train.tensors[0])
    assert torch.equal(labels[kept], labelled.train.tensors[1])
    assert "and 1207 unlabelled ones" in semi.description
    check_labels(semi)  # hidden labels are not out of range


def test_image_data_sets_hide_labels_the_same_way() -> None:
    require_data("images/mnist_t10k")
    semi = build_data("mnist", labelled_per_class=3, unlabelled=True)
    assert len(semi.train) == len(semi.teacher_train) and int((semi.train.labels != -100).sum()) == 30
    x, y = semi.train[0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.long


def test_unlabelled_without_labelled_per_class_is_refused() -> None:
    with pytest.raises(UserError, match="unlabelled: true needs labelled_per_class"):
        build_data("digits", unlabelled=True)


@pytest.mark.parametrize("name", ["dkd", "pld", "cross_entropy"])
def test_label_terms_skip_rows_whose_label_is_hidden(name: str) -> None:
    torch.manual_seed(0)
    objective = build_objective(name, {})
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])
    keep = labels != -100
    together = objective(StepOutputs(student, teacher, labels))
    alone = objective(StepOutputs(student[keep], teacher[keep], labels[keep]))
    torch.testing.assert_close(together, alone)


def test_distillation_terms_read_every_row() -> None:
    objective = build_objective("hinton_kd", {})
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    hidden = objective(StepOutputs(student, teacher, torch.full((4,), -100)))
    torch.testing.assert_close(hidden, objective(StepOutputs(student, teacher, torch.arange(4))))
