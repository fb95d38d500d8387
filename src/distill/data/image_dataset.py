"""What every image loader shares: uint8 images in memory, their data set, the standard augmentation, and
the stratified splits and subsets that turn a loader's arrays into `DataSplits`.

Images stay in memory as uint8 (N, C, H, W) tensors; `ImageTensorDataset` converts them to normalised float32
when a sample or a batch is read, and optionally applies the standard augmentation (random crop with 4-pixel
zero padding, horizontal flip), implemented in torch and drawn from a `torch.Generator` or the global RNG.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.base import DATASETS, IGNORE_LABEL, DataSplits
from distill.errors import UserError

# ----------------------------------------------------------------------------------------- augmentation


def random_crop_flip(
    images: Tensor, *, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """The standard CIFAR augmentation on a batch (N, C, H, W) of any dtype: zero-pad by `padding`, crop back
    to H x W at a random offset, and mirror left-right with probability 1/2. Randomness comes from
    `generator` (on the images' device) or the global torch RNG, so a fixed seed repeats it."""
    if images.ndim != 4:
        raise ValueError(f"random_crop_flip expects (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
    if flip:
        mirror = torch.rand(n, generator=generator, device=images.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


# -------------------------------------------------------------------------------------------- data set


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels in memory; samples come out as normalised float32.

    `__getitems__` serves a whole DataLoader batch with one vectorised conversion (and augmentation);
    `batch(indices)` returns the stacked `(x, y)` directly for loops that index the data set themselves.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        generator: torch.Generator | None = None,
        classes: Sequence[str] = (),
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise UserError(
                f"data: mean / std need {channels} values (one per channel), got {len(mean)} / {len(std)}"
            )
        self.images = images.contiguous()
        self.labels = labels.long().contiguous()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.padding = padding
        self.flip = flip
        self.generator = generator
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def normalise(self, images: Tensor) -> Tensor:
        return (images.float() / 255.0 - self.mean.to(images.device)) / self.std.to(images.device)

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if self.augment:
            images = random_crop_flip(images, padding=self.padding, flip=self.flip, generator=self.generator)
        return self.normalise(images), self.labels[index]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch([int(index)])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0), strict=True))

    def subset(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        augment: bool | None = None,
        labels: Tensor | None = None,
    ) -> ImageTensorDataset:
        """The examples at `indices` (with `labels` in place of theirs, when given)."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageTensorDataset(
            self.images[index],
            self.labels[index] if labels is None else labels,
            self.mean.flatten().tolist(),
            self.std.flatten().tolist(),
            augment=self.augment if augment is None else augment,
            padding=self.padding,
            flip=self.flip,
            generator=self.generator,
            classes=self.classes,
        )


def hide_labels(labels: Tensor, labelled: np.ndarray) -> Tensor:
    """Semi-supervised training (`unlabelled: true`): every example of the split, the labels of all but
    `labelled` replaced by IGNORE_LABEL (-100), which cross-entropy skips and distillation terms ignore."""
    hidden = torch.full_like(labels.long(), IGNORE_LABEL)
    index = torch.as_tensor(labelled, dtype=torch.long)
    hidden[index] = labels.long()[index]
    return hidden


def refuse_unlabelled_without_labelled(unlabelled: bool) -> None:
    if unlabelled:
        raise UserError("data: unlabelled: true needs labelled_per_class (which examples keep their labels)")


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale, computed in float64."""
    x = images.double().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-3)
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------------- splitting


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices with `test_fraction` of every class in the test part, drawn with a fixed seed."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"data: test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def per_class_subset(labels: np.ndarray, per_class: int, seed: int, what: str = "per_class") -> np.ndarray:
    """Indices of `per_class` examples of every class (all of a class that has fewer is an error)."""
    if per_class < 1:
        raise UserError(f"data: {what} must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise UserError(f"data: class {cls} has {len(members)} examples, fewer than {what}={per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass
class ImageArrays:
    """What a loader reads: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def take(self, index: np.ndarray | Tensor) -> ImageArrays:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageArrays(self.images[index], self.labels[index])

    def per_class(self, per_class: int | None, seed: int, what: str) -> ImageArrays:
        """`per_class` examples of every class drawn by `seed` (all of them when None)."""
        if per_class is None:
            return self
        return self.take(per_class_subset(self.labels.numpy(), per_class, seed, what))

    def split(self, test_fraction: float, seed: int) -> tuple[ImageArrays, ImageArrays]:
        """A stratified train / test split (see `stratified_split`)."""
        train, test = stratified_split(self.labels.numpy(), test_fraction, seed)
        return self.take(train), self.take(test)

    @staticmethod
    def concat(parts: Sequence[ImageArrays]) -> ImageArrays:
        return ImageArrays(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass
class LoadedImages:
    """A loader's two splits, its class names and where they came from (the start of the description)."""

    train: ImageArrays
    test: ImageArrays
    classes: Sequence[str]
    origin: str


@dataclass(frozen=True)
class SplitOptions:
    """The parameters every image loader takes, declared once (`image_loader` adds them to each loader's
    signature): the seed of every draw, per-class subsets of the train and test splits, the student's
    labelled subset of the train split, and the train split's augmentation."""

    split_seed: int = 0
    train_per_class: int | None = None
    test_per_class: int | None = None
    labelled_per_class: int | None = None
    unlabelled: bool = False
    augment: bool = False
    padding: int = 4
    flip: bool = True

    def subsets(self, train: ImageArrays, test: ImageArrays) -> tuple[ImageArrays, ImageArrays]:
        """`train_per_class` / `test_per_class` examples of every class of each split (all when None)."""
        seed = self.split_seed
        train = train.per_class(self.train_per_class, seed, "train_per_class")
        return train, test.per_class(self.test_per_class, seed, "test_per_class")


_SPLIT_PARAMETERS = [
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
    for f in fields(SplitOptions)
]


def image_loader(
    name: str, *, summary: str, omit: Sequence[str] = (), **fixed: Any
) -> Callable[[Callable[..., DataSplits]], Callable[..., DataSplits]]:
    """Register `load(options, *, <its own parameters>)` as the data set `name`. The registered function
    takes keyword parameters only: its own, then the fields of `SplitOptions` less those in `omit` and those
    `fixed` to a value (mnist: `flip=False`); `inspect.signature` (and so a recipe's check) sees them all."""
    shared = [p for p in _SPLIT_PARAMETERS if p.name not in fixed and p.name not in omit]

    def decorate(load: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        own = list(inspect.signature(load).parameters.values())[1:]

        def factory(**params: Any) -> DataSplits:
            common = {p.name: params.pop(p.name) for p in shared if p.name in params}
            return load(SplitOptions(**common, **fixed), **params)

        factory.__signature__ = inspect.Signature([*own, *shared], return_annotation="DataSplits")  # type: ignore[attr-defined]
        factory.__name__ = factory.__qualname__ = load.__name__
        factory.__doc__, factory.__module__ = load.__doc__, load.__module__
        DATASETS.add(name, factory, summary=summary)
        return factory

    return decorate


def image_splits(
    loaded: LoadedImages,
    options: SplitOptions,
    *,
    name: str,
    num_classes: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> DataSplits:
    """Wrap uint8 arrays into DataSplits; `labelled_per_class` gives the student a small labelled subset of
    the train split while the teacher keeps all of it. mean / std default to the train split's statistics."""
    train, test = loaded.train, loaded.test
    if len(train.labels) == 0 or len(test.labels) == 0:
        raise UserError(f"data: {name} has an empty {'train' if len(train.labels) == 0 else 'test'} split")
    if mean is None or std is None:
        stats = channel_stats(train.images)
        mean, std = mean or stats[0], std or stats[1]
    augment, padding, flip = options.augment, options.padding, options.flip
    common = dict(padding=padding, flip=flip, classes=loaded.classes)
    full_train = ImageTensorDataset(train.images, train.labels, mean, std, augment=augment, **common)
    test_set = ImageTensorDataset(test.images, test.labels, mean, std, augment=False, **common)
    shape = tuple(train.images.shape[1:])
    description = f"{loaded.origin}: {len(train.labels)} train / {len(test.labels)} test images {shape}"
    if augment:
        description += f", augmented (crop, padding {padding}{', flip' if flip else ''})"
    per_class = options.labelled_per_class
    if per_class is None:
        refuse_unlabelled_without_labelled(options.unlabelled)
        return DataSplits(full_train, test_set, num_classes, shape, description=description)
    subset = per_class_subset(train.labels.numpy(), per_class, options.split_seed, "labelled_per_class")
    description += f"; the student sees {len(subset)} labelled images ({per_class} per class)"
    if options.unlabelled:
        hidden = hide_labels(train.labels, subset)
        description += f" and {len(hidden) - len(subset)} unlabelled ones"
        student_train = full_train.subset(np.arange(len(hidden)), labels=hidden)
    else:
        student_train = full_train.subset(subset)
    return DataSplits(
        student_train,
        test_set,
        num_classes,
        shape,
        teacher_train=full_train,
        description=description,
    )
