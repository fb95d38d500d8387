"""What a data loader returns: train / test splits of (input, label) pairs and their shape facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from distill.data.paths import data_root
from distill.errors import UserError
from distill.registry import Registry

IGNORE_LABEL = -100  # an example whose label is hidden (semi-supervised): cross-entropy skips it


@dataclass
class DataSplits:
    """`train` is what the student learns from; `teacher_train` is the teacher's own training set when it
    differs (a teacher trained on all labels, a student given a small labelled subset); None means `train`."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    teacher_train: Dataset | None = None  # the teacher's own (usually larger) training set
    description: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            if len(getattr(self, split)) == 0:  # type: ignore[arg-type]
                raise UserError(f"data: the {split} split is empty")


DATASETS: Registry[DataSplits] = Registry("data set")


def shared_data_dir() -> Path:
    """Old name of `distill.data.paths.data_root` (loaders resolve files with `data_path` there)."""
    return data_root()


def build_data(name: str, **params: Any) -> DataSplits:
    return DATASETS.build(name, **params)


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(x.contiguous(), y.long().contiguous())
