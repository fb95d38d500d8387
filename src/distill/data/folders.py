"""Image folders: any `root/<class>/*.png|jpg` folder (`image_folder`, split by a seed) and ImageNet-style
`root/train|val/<class>/` folders (`imagenet_folder`). The CIFAR loaders read their folders through here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.base import DataSplits
from distill.data.image_dataset import (
    ImageArrays,
    LoadedImages,
    SplitOptions,
    image_loader,
    image_splits,
    per_class_subset,
)
from distill.data.image_io import decode_images, decoded_cache_path, save_npz
from distill.data.paths import require_dir
from distill.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _class_folders(root: Path) -> list[Path]:
    require_dir(root, "image folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"data: no class folders in {root} (expected {root}/<class>/*.png|jpg)")
    return folders


def list_images(root: Path, classes: Sequence[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files under `root/<class>/` (sorted) with integer labels; `classes` fixes the class order."""
    found = {p.name: p for p in _class_folders(root)}
    names = list(classes) if classes is not None else sorted(found)
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        if name not in found:
            continue  # a split may miss a class; the label still follows the reference order
        members = sorted(
            f
            for f in found[name].rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
        )
        files += members
        labels += [label] * len(members)
    if not files:
        raise UserError(f"data: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files, np.asarray(labels, dtype=np.int64), names


def load_folder(
    root: Path,
    *,
    classes: Sequence[str] | None = None,
    per_class: int | None = None,
    what: str = "per_class",
    seed: int = 0,
    channels: int = 3,
    size: int | Sequence[int] | None = None,
    cache_key: str | None = None,
) -> tuple[ImageArrays, list[str]]:
    """The images of `root/<class>/` decoded into memory (`per_class` of each class when given, drawn by
    `seed` before decoding); with `cache_key` the decoded arrays are kept in the cache and read back."""
    files, labels, names = list_images(root, classes)
    if per_class is not None:
        keep = per_class_subset(labels, per_class, seed, what)
        files, labels = [files[i] for i in keep], labels[keep]
    cached = decoded_cache_path(cache_key, files, channels, size) if cache_key else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as saved:
            images = torch.from_numpy(saved["images"])
    else:
        images = decode_images(files, channels=channels, size=size)
        if cached is not None:
            save_npz(cached, images=images.numpy())
    return ImageArrays(images, torch.from_numpy(labels)), names


def load_train_test(
    train_dir: Path,
    test_dir: Path,
    options: SplitOptions,
    *,
    channels: int = 3,
    size: int | Sequence[int] | None = None,
    cache_key: str | None = None,
) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """Two class folders, the test one read in the train one's class order, each cut to its
    `options.train_per_class` / `test_per_class` before decoding."""
    common: dict[str, Any] = dict(seed=options.split_seed, channels=channels, size=size, cache_key=cache_key)
    train, names = load_folder(train_dir, per_class=options.train_per_class, what="train_per_class", **common)
    test, _ = load_folder(
        test_dir, classes=names, per_class=options.test_per_class, what="test_per_class", **common
    )
    return train, test, names


def split_dirs(root: Path) -> tuple[Path, Path]:
    """`root/train` and `root/val` (or `root/test`)."""
    require_dir(root, "data folder")
    train = root / "train"
    test = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not train.is_dir() or test is None:
        raise UserError(f"data: expected {root}/train/<class>/ and {root}/val/<class>/ (or test/) folders")
    return train, test


def as_size(image_size: int | Sequence[int] | None) -> int | tuple[int, int] | None:
    if image_size is None or isinstance(image_size, int):
        return image_size
    return (int(image_size[0]), int(image_size[1]))


@image_loader(
    "image_folder",
    summary="any folder of root/<class>/*.png|jpg, split into train / test by a seed",
    omit=("train_per_class", "test_per_class"),
)
def image_folder(
    options: SplitOptions,
    *,
    root: str,
    test_fraction: float = 0.2,
    image_size: int | list[int] | None = None,
    channels: int = 3,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DataSplits:
    """Class names are the sub-folder names in sorted order. Without mean / std the train split's own
    per-channel statistics normalise both splits."""
    path = Path(root).expanduser()
    arrays, names = load_folder(path, seed=options.split_seed, channels=channels, size=as_size(image_size))
    train, test = arrays.split(test_fraction, options.split_seed)
    loaded = LoadedImages(
        train, test, names, f"image folder {path} ({len(names)} classes, {test_fraction:.0%} test)"
    )
    return image_splits(
        loaded, options, name=f"image folder {path}", num_classes=len(names), mean=mean, std=std
    )


@image_loader(
    "imagenet_folder", summary="ImageNet-style root/train/<class>/ and root/val|test/<class>/ image folders"
)
def imagenet_folder(
    options: SplitOptions,
    *,
    root: str,
    image_size: int | list[int] | None = 64,
    channels: int = 3,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> DataSplits:
    """Images are resized (shorter side) and centre-cropped to `image_size` and held in memory as uint8:
    fit for Tiny-ImageNet-sized sets or per-class subsets; mean / std default to ImageNet's."""
    path = Path(root).expanduser()
    size = as_size(image_size)
    train, test, names = load_train_test(*split_dirs(path), options, channels=channels, size=size)
    loaded = LoadedImages(train, test, names, f"image folders {path} ({len(names)} classes)")
    return image_splits(
        loaded, options, name=f"image folders {path}", num_classes=len(names), mean=mean, std=std
    )
