"""scikit-learn's digits (1,797 real 8x8 images, bundled with scikit-learn): the zero-setup default."""

from __future__ import annotations

import numpy as np
import torch

from distill.data.base import DATASETS, DataSplits, tensor_dataset
from distill.data.image_dataset import hide_labels, per_class_subset, refuse_unlabelled_without_labelled
from distill.errors import UserError


@DATASETS.register("digits", summary="scikit-learn digits, 8x8 grey images, 10 classes")
def digits(
    *,
    test_fraction: float = 0.3,
    labelled_per_class: int | None = None,
    unlabelled: bool = False,
    split_seed: int = 0,
) -> DataSplits:
    """A stratified train / test split; with `labelled_per_class` the student's training set is a small
    labelled subset of the train split while the teacher keeps the whole train split; `unlabelled` adds the
    rest of the train split to the student's set with its labels hidden (-100; semi-supervised KD)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"data: test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # pixel values 0..16 -> [-1, 1]
    labels = bunch.target.astype(np.int64)
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
        )
    except ValueError:  # a stratified split needs every class on both sides
        raise UserError(
            f"data: test_fraction {test_fraction:g} leaves one split of the {len(labels)} images with fewer "
            "images than the 10 classes; choose a fraction between 0.01 and 0.99"
        ) from None
    full_train = tensor_dataset(torch.from_numpy(x_train)[:, None], torch.from_numpy(y_train))
    test = tensor_dataset(torch.from_numpy(x_test)[:, None], torch.from_numpy(y_test))
    description = f"scikit-learn digits: {len(y_train)} train / {len(y_test)} test images (8x8, 10 classes)"
    if labelled_per_class is None:
        refuse_unlabelled_without_labelled(unlabelled)
        return DataSplits(full_train, test, 10, (1, 8, 8), description=description)
    subset = per_class_subset(y_train, labelled_per_class, split_seed, "labelled_per_class")
    student_train = tensor_dataset(
        torch.from_numpy(x_train[subset])[:, None], torch.from_numpy(y_train[subset])
    )
    description += f"; the student sees {len(subset)} labelled images ({labelled_per_class} per class)"
    if unlabelled:
        hidden = hide_labels(torch.from_numpy(y_train), subset)
        student_train = tensor_dataset(torch.from_numpy(x_train)[:, None], hidden)
        description += f" and {len(y_train) - len(subset)} unlabelled ones"
    return DataSplits(student_train, test, 10, (1, 8, 8), teacher_train=full_train, description=description)
