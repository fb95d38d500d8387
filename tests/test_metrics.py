import math

import pytest
import torch

from distill.metrics import accuracy, expected_calibration_error, teacher_student_kl, top1_agreement


def test_agreement_and_accuracy_hand_computed() -> None:
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    teacher = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 4.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    assert top1_agreement(student, teacher) == pytest.approx(0.5)  # rows 0 and 2 agree
    assert accuracy(student, labels) == pytest.approx(0.75)


def test_ece_hand_computed() -> None:
    # Two classes, confidences 0.9, 0.9, 0.6, 0.6 (bins (13/15, 14/15] and (8/15, 9/15]).
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    logits = probs.log()
    labels = torch.tensor([0, 1, 0, 0])
    # high bin: accuracy 1/2, confidence 0.9 -> |0.5 - 0.9| * 2/4 = 0.2
    # low bin: accuracy 1/2 (row 2 right, row 3 wrong), confidence 0.6 -> |0.5 - 0.6| * 2/4 = 0.05
    assert expected_calibration_error(logits, labels) == pytest.approx(0.25, abs=1e-9)


def test_ece_of_perfectly_calibrated_one_hot_is_zero() -> None:
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert expected_calibration_error(logits, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_teacher_student_kl_matches_closed_form() -> None:
    p = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert teacher_student_kl(q.log(), p.log()) == pytest.approx(expected, rel=1e-9)
    assert teacher_student_kl(p.log(), p.log()) == pytest.approx(0.0, abs=1e-12)
