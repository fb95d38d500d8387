"""CIFAR-10 and CIFAR-100: the official binary files, `train|test/<class>/` image folders, or (CIFAR-10) the
shared JPEG archives `images/cifar10/*train*.tar.xz` / `*test*.tar.xz`, extracted once into the cache.

CIFAR-10's default is the shared copy, found by `distill.data.paths.data_path`; `download=True` (or
DISTILL_DOWNLOAD=1) fetches the official binary version for online users, never pickles.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from distill.data.base import DataSplits
from distill.data.folders import load_train_test, split_dirs
from distill.data.image_dataset import ImageArrays, LoadedImages, SplitOptions, image_loader, image_splits
from distill.data.image_io import download_and_unpack, extract_archive
from distill.data.paths import cache_dir, find_data, local_or_download, missing_message, require_dir
from distill.errors import UserError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10_BINARY_URL = (
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "c32a1d4ab5d03f1284b67883e8d87530",
)
CIFAR100_BINARY_URL = (
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    "03b5dce01913d631647c71ecec9e9cb8",
)
CIFAR10_MARKER = "cifar-10-batches-bin/test_batch.bin"


def download_cifar10(root: str | Path) -> Path:
    """Download and unpack CIFAR-10's binary version into `root/cifar-10-batches-bin` (no pickles)."""
    return download_and_unpack(*CIFAR10_BINARY_URL, root, CIFAR10_MARKER)


def download_cifar100(root: str | Path) -> Path:
    """Download and unpack the official CIFAR-100 binary version into `root/cifar-100-binary` (no pickles)."""
    return download_and_unpack(*CIFAR100_BINARY_URL, root, "cifar-100-binary/test.bin")


def read_cifar_binary(path: Path, label_bytes: int, label_index: int) -> ImageArrays:
    """Records of `label_bytes` label bytes then 3072 pixel bytes (R, G, B planes of 32x32), as published."""
    if not path.is_file():
        raise UserError(f"data: file not found: {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size == 0 or raw.size % record:
        raise UserError(f"data: {path} is not a CIFAR binary file ({raw.size} bytes, records of {record})")
    rows = raw.reshape(-1, record)
    images = torch.from_numpy(rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    return ImageArrays(images, torch.from_numpy(rows[:, label_index].astype(np.int64)))


def _label_names(path: Path, count: int) -> list[str]:
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) == count:
            return names
    return [str(i) for i in range(count)]


def _single_child(root: Path, name: str) -> Path:
    """`root/name` if the archive held such a top folder, else `root` itself."""
    return root / name if (root / name).is_dir() else root


def _binary_splits(
    train_files: Sequence[Path], test_file: Path, label: tuple[int, int], options: SplitOptions
) -> tuple[ImageArrays, ImageArrays]:
    """The official binary files with `label` = (label bytes per record, which of them), cut to
    `options.train_per_class` / `test_per_class`."""
    train = ImageArrays.concat([read_cifar_binary(f, *label) for f in train_files])
    return options.subsets(train, read_cifar_binary(test_file, *label))


def _cifar10_arrays(path: Path, options: SplitOptions) -> LoadedImages:
    """CIFAR-10 from (in this order) the official binary files, the shared `*train*.tar.xz` / `*test*.tar.xz`
    JPEG archives (extracted once into the cache), or `train|test/<class>/` folders."""
    binary = path / "cifar-10-batches-bin" if (path / "cifar-10-batches-bin").is_dir() else path
    if (binary / "test_batch.bin").is_file():
        batches = [binary / f"data_batch_{i}.bin" for i in range(1, 6)]
        train, test = _binary_splits(batches, binary / "test_batch.bin", (1, 0), options)
        names = _label_names(binary / "batches.meta.txt", 10)
        return LoadedImages(train, test, names, f"CIFAR-10 ({binary}, official binary files)")
    archives = sorted(path.glob("*.tar*"))
    train_archive = next((a for a in archives if "train" in a.name), None)
    test_archive = next((a for a in archives if "test" in a.name), None)
    if train_archive is not None and test_archive is not None:
        root, test_root = extract_archive(train_archive), extract_archive(test_archive)
        train_dir, test_dir = _single_child(root, "train"), _single_child(test_root, "test")
        key = f"cifar10:{root.name}:{test_root.name}"
        train, test, names = load_train_test(train_dir, test_dir, options, cache_key=key)
        origin = f"CIFAR-10 JPEG archives ({train_archive.name}, {test_archive.name})"
        return LoadedImages(train, test, names, origin)
    if (path / "train").is_dir():
        train, test, names = load_train_test(*split_dirs(path), options, size=32)
        return LoadedImages(train, test, names, f"CIFAR-10 folders ({path})")
    raise UserError(
        f"data: no CIFAR-10 in {path}: expected cifar-10-batches-bin/, train/ and test/ folders, "
        "or *train*.tar.xz and *test*.tar.xz archives"
    )


def _cifar10_root(root: str | None, download: bool) -> Path:
    """`root` (downloading into it when asked); else the shared archives wherever `data_path` finds them;
    else the official binaries in the cache (downloaded there when downloads are allowed)."""
    if root:
        path = Path(root).expanduser()
        return download_cifar10(path) if download else path
    shared = find_data("images/cifar10")
    if shared is not None:
        return shared
    missing = missing_message("images/cifar10")
    official = [cache_dir() / "cifar10"]
    return local_or_download(
        official, CIFAR10_MARKER, download_cifar10, download=download or None, missing=missing
    )


@image_loader(
    "cifar10",
    summary="CIFAR-10 from the shared JPEG archives (10k train subset, 10k test), folders or binaries",
)
def cifar10(options: SplitOptions, *, root: str | None = None, download: bool = False) -> DataSplits:
    """Default root: the shared `images/cifar10` (1,000 train images per class, the 10k test split), found by
    `distill.data.paths.data_path`. `download=True` fetches the official binary version (50k / 10k) into
    `root`, or into the cache when there is no `root` and no shared copy, for online users."""
    path = require_dir(_cifar10_root(root, download), "CIFAR-10 folder")
    loaded = _cifar10_arrays(path, options)
    return image_splits(loaded, options, name="cifar10", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)


@image_loader("cifar100", summary="CIFAR-100 from the official binary files or train/ and test/ folders")
def cifar100(options: SplitOptions, *, root: str, label: str = "fine", download: bool = False) -> DataSplits:
    """The published protocol's data: `root/cifar-100-binary/{train,test}.bin` (what `download=True` fetches)
    or `root/train/<class>/`, `root/test/<class>/` image folders. `label` is "fine" (100) or "coarse" (20)
    for the binary files. The published recipes train with `augment=True`."""
    if label not in {"fine", "coarse"}:
        raise UserError(f"data: cifar100 label must be 'fine' or 'coarse', got '{label}'")
    path = Path(root).expanduser()
    if download:
        download_cifar100(path)
    require_dir(path, "CIFAR-100 folder")
    binary = path / "cifar-100-binary" if (path / "cifar-100-binary").is_dir() else path
    if (binary / "test.bin").is_file():
        labels = (2, 1 if label == "fine" else 0)
        train, test = _binary_splits([binary / "train.bin"], binary / "test.bin", labels, options)
        count = 100 if label == "fine" else 20
        names = _label_names(binary / f"{label}_label_names.txt", count)
        origin = f"CIFAR-100 ({binary}, official binary files, {label} labels)"
    else:
        train, test, names = load_train_test(*split_dirs(path), options, size=32)
        count = len(names)
        origin = f"CIFAR-100 folders ({path})"
    loaded = LoadedImages(train, test, names, origin)
    return image_splits(
        loaded, options, name="cifar100", num_classes=count, mean=CIFAR100_MEAN, std=CIFAR100_STD
    )
