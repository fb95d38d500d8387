"""Image loaders on the real shared files, on tiny folders made here, and their errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import require_data, require_file
from distill.data import DATASETS, build_data
from distill.data.cifar import CIFAR10_CLASSES
from distill.data.image_dataset import ImageTensorDataset, random_crop_flip
from distill.data.image_io import extract_archive, read_idx
from distill.data.mnist import FASHION_MNIST_DEBIAN
from distill.data.paths import cache_dir
from distill.errors import UserError


@pytest.fixture
def mnist_dir() -> Path:
    """The shared MNIST test split (a skip naming it when it is not here)."""
    return require_data("images/mnist_t10k")


@pytest.fixture
def cifar_dir() -> Path:
    """The shared CIFAR-10 archives (a skip naming them when they are not here)."""
    return require_data("images/cifar10")


@pytest.fixture
def fashion_dir() -> Path:
    """Fashion-MNIST from the Debian package (a skip saying how to install it when it is not)."""
    how = "apt-get install dataset-fashion-mnist"
    return require_file(FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz", how).parent


@pytest.fixture
def tmp_cache(monkeypatch, tmp_path) -> Path:
    """An empty data cache of this test's own (conftest already points DISTILL_CACHE at a session folder)."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    return cache_dir()


def test_loaders_are_registered():
    assert {"mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "imagenet_folder"} <= set(
        DATASETS.names()
    )


def _digest(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in images}


# ------------------------------------------------------------------------------------------ MNIST (real)


def test_mnist_test_split_is_divided_deterministically(mnist_dir):
    raw = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10000, 28, 28) and raw.dtype == np.uint8
    a, b = build_data("mnist"), build_data("mnist")
    other = build_data("mnist", split_seed=1)
    assert (a.num_classes, a.input_shape, len(a.train), len(a.test)) == (10, (1, 28, 28), 7000, 3000)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.images, other.test.images)
    assert not _digest(a.train.images) & _digest(a.test.images)
    assert torch.bincount(a.test.labels).min() >= 250  # stratified: every digit is in the test part
    x = a.train.batch(range(len(a.train)))[0]
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # MNIST's mean / std normalise it
    student = build_data("mnist", labelled_per_class=5)
    assert len(student.train) == 50 and len(student.teacher_train) == 7000
    assert torch.equal(torch.bincount(student.train.labels), torch.full((10,), 5))


def test_mnist_batches_through_a_dataloader(mnist_dir):
    splits = build_data("mnist", augment=True)
    torch.manual_seed(3)
    x, y = next(iter(DataLoader(splits.train, batch_size=16, shuffle=True)))
    torch.manual_seed(3)
    x2, y2 = next(iter(DataLoader(splits.train, batch_size=16, shuffle=True)))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the global seed fixes order and augmentation
    single_x, single_y = splits.test[0]
    assert single_x.shape == (1, 28, 28) and single_y.ndim == 0


# ----------------------------------------------------------------------------------- Fashion-MNIST (Debian)


def test_fashion_mnist_from_the_debian_package(fashion_dir):
    full = build_data("fashion_mnist")
    assert (len(full.train), len(full.test), full.input_shape, full.num_classes) == (
        60000,
        10000,
        (1, 28, 28),
        10,
    )
    small = build_data("fashion_mnist", train_per_class=30, test_per_class=10, augment=True)
    assert (len(small.train), len(small.test)) == (300, 100)
    assert small.train.augment and not small.test.augment
    assert small.train.classes[0] == "T-shirt/top"


def test_fashion_mnist_missing_root_names_it(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(UserError, match=str(missing)):
        build_data("fashion_mnist", root=str(missing))


# --------------------------------------------------------------------------------------- CIFAR-10 (real)


def test_cifar10_from_the_shared_archives(cifar_dir):
    splits = build_data("cifar10", train_per_class=20, test_per_class=10)
    assert (len(splits.train), len(splits.test), splits.input_shape, splits.num_classes) == (
        200,
        100,
        (3, 32, 32),
        10,
    )
    assert splits.train.classes == list(CIFAR10_CLASSES)
    assert torch.equal(torch.bincount(splits.test.labels), torch.full((10,), 10))
    extracted = sorted(p for p in cache_dir().iterdir() if p.name.startswith("cifar10_"))
    for folder in extracted:
        assert json.loads((folder / "MANIFEST.json").read_text())["files"] == 10000
    train_root = next(p for p in extracted if "train" in p.name)
    assert all(len(list(d.glob("*.jpg"))) == 1000 for d in (train_root / "train").iterdir())
    again = build_data("cifar10", train_per_class=20, test_per_class=10)
    assert torch.equal(again.train.images, splits.train.images)


def _make_archive(path: Path, top: str, classes: dict[str, int], seed: int) -> None:
    staging = path.parent / f"staging-{top}"
    _make_folder(staging / top, classes, size=(32, 32), suffix=".jpg", seed=seed)
    with tarfile.open(path, "w:xz") as tar:
        tar.add(staging / top, arcname=top)


def test_archives_are_extracted_once_atomically_with_a_manifest(tmp_path, tmp_cache):
    root = tmp_path / "cifar"
    root.mkdir()
    _make_archive(root / "mini_train.tar.xz", "train", {"airplane": 4, "bird": 4}, seed=0)
    _make_archive(root / "mini_test.tar.xz", "test", {"airplane": 2, "bird": 2}, seed=1)
    splits = build_data("cifar10", root=str(root))
    assert (len(splits.train), len(splits.test), splits.train.classes) == (8, 4, ["airplane", "bird"])
    extracted = sorted(p for p in tmp_cache.iterdir() if p.name.startswith("mini_"))
    assert [p.name.split("-")[0] for p in extracted] == ["mini_test", "mini_train"]
    assert not [p for p in tmp_cache.iterdir() if p.name.startswith(".")]  # no temporary folder is left
    for folder in extracted:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert manifest["sha256"].startswith(folder.name.split("-")[1]) and manifest["files"] in (4, 8)
    stamps = [p.stat().st_mtime_ns for p in extracted]
    assert extract_archive(root / "mini_train.tar.xz") == extracted[1]
    again = build_data("cifar10", root=str(root))
    assert [p.stat().st_mtime_ns for p in extracted] == stamps  # reused, not extracted again
    assert torch.equal(again.train.images, splits.train.images)


def test_cifar10_full_test_split_is_normalised(cifar_dir):
    splits = build_data("cifar10", train_per_class=1)
    assert (len(splits.train), len(splits.test)) == (10, 10000)
    x = splits.test.batch(range(0, 10000, 7))[0]
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 0.05 and (per_channel.std(1) - 1).abs().max() < 0.05


def test_cifar10_missing_root_names_it(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nowhere")):
        build_data("cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no CIFAR-10 in"):
        build_data("cifar10", root=str(tmp_path))


def test_corrupt_archive_is_a_user_error(tmp_path):
    bad = tmp_path / "broken_train.tar.xz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(UserError, match="broken_train.tar.xz"):
        extract_archive(bad, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no half-extracted folder is left


def _write_cifar_binary(path: Path, labels: list[list[int]], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    np.concatenate([np.asarray(labels, dtype=np.uint8), pixels], axis=1).tofile(path)
    return pixels.reshape(-1, 3, 32, 32)


def test_cifar10_and_cifar100_binary_layouts(tmp_path):
    c10 = tmp_path / "c10" / "cifar-10-batches-bin"
    c10.mkdir(parents=True)
    for i in range(1, 6):
        _write_cifar_binary(c10 / f"data_batch_{i}.bin", [[k % 10] for k in range(20)], i)
    first_test = _write_cifar_binary(c10 / "test_batch.bin", [[k % 10] for k in range(10)], 0)
    splits = build_data("cifar10", root=str(tmp_path / "c10"))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (100, 10, 10)
    assert torch.equal(splits.test.images, torch.from_numpy(first_test))

    c100 = tmp_path / "c100" / "cifar-100-binary"
    c100.mkdir(parents=True)
    _write_cifar_binary(c100 / "train.bin", [[k % 20, k % 100] for k in range(200)], 1)
    _write_cifar_binary(c100 / "test.bin", [[k % 20, k % 100] for k in range(100)], 2)
    fine = build_data("cifar100", root=str(tmp_path / "c100"))
    coarse = build_data("cifar100", root=str(tmp_path / "c100"), label="coarse")
    assert (fine.num_classes, int(fine.train.labels.max())) == (100, 99)
    assert (coarse.num_classes, int(coarse.train.labels.max())) == (20, 19)
    (c100 / "test.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="test.bin"):
        build_data("cifar100", root=str(tmp_path / "c100"))


# ------------------------------------------------------------------------------------ folders made here


def _make_folder(root: Path, classes: dict[str, int], size=(8, 8), mode="RGB", suffix=".png", seed=0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"{i:03d}{suffix}"
            )


def test_image_folder_splits_by_class_and_seed(tmp_path):
    _make_folder(tmp_path, {"cat": 6, "dog": 6, "owl": 6})
    _make_folder(tmp_path, {"owl": 2}, suffix=".jpg", seed=1)  # mixed formats in one class
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    splits = build_data("image_folder", root=str(tmp_path), test_fraction=0.25, augment=True)
    assert (splits.num_classes, splits.input_shape) == (3, (3, 8, 8))
    assert splits.train.classes == ["cat", "dog", "owl"]
    assert len(splits.train) + len(splits.test) == 20 and set(splits.test.labels.tolist()) == {0, 1, 2}
    x = splits.train.batch(range(len(splits.train)))[0]
    assert x.shape == (len(splits.train), 3, 8, 8)
    again = build_data("image_folder", root=str(tmp_path), test_fraction=0.25)
    assert torch.equal(again.test.images, splits.test.images)
    plain = again.train.batch(range(len(again.train)))[0].transpose(0, 1).reshape(3, -1)
    assert plain.mean(1).abs().max() < 1e-4  # the train split's own statistics normalise it


def test_image_folder_resizes_and_reads_grey(tmp_path):
    _make_folder(tmp_path, {"a": 3}, size=(20, 12))
    _make_folder(tmp_path, {"b": 3}, size=(9, 9), mode="L")
    with pytest.raises(UserError, match="set image_size"):
        build_data("image_folder", root=str(tmp_path))
    splits = build_data("image_folder", root=str(tmp_path), image_size=8, channels=1, mean=[0.5], std=[0.25])
    assert splits.input_shape == (1, 8, 8)
    rect = build_data("image_folder", root=str(tmp_path), image_size=[6, 10], test_fraction=0.5)
    assert rect.input_shape == (3, 6, 10)


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match=str(missing)):
        build_data("image_folder", root=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"no class folders in {empty}"):
        build_data("image_folder", root=str(empty))
    (empty / "cls").mkdir()
    with pytest.raises(UserError, match=f"no images .* under {empty}"):
        build_data("image_folder", root=str(empty))
    _make_folder(tmp_path / "bad", {"x": 3, "y": 3})
    (tmp_path / "bad" / "x" / "zz.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="zz.png"):
        build_data("image_folder", root=str(tmp_path / "bad"))
    (tmp_path / "bad" / "x" / "zz.png").unlink()
    with pytest.raises(UserError, match="need 3 values"):
        build_data("image_folder", root=str(tmp_path / "bad"), mean=[0.5], std=[0.5])


def test_imagenet_and_cifar100_style_split_folders(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        _make_folder(tmp_path / "inet" / split, {"n01": count, "n02": count, "n03": count}, size=(40, 30))
    splits = build_data("imagenet_folder", root=str(tmp_path / "inet"), image_size=16, labelled_per_class=2)
    assert (splits.num_classes, splits.input_shape, len(splits.test)) == (3, (3, 16, 16), 6)
    assert (len(splits.train), len(splits.teacher_train)) == (6, 12)
    for split, count in (("train", 3), ("test", 1)):
        _make_folder(tmp_path / "c100" / split, {f"class{i:02d}": count for i in range(5)}, size=(32, 32))
    stand_in = build_data("cifar100", root=str(tmp_path / "c100"), augment=True)
    assert (stand_in.num_classes, len(stand_in.train), len(stand_in.test)) == (5, 15, 5)
    with pytest.raises(UserError, match="train/<class>"):
        build_data("imagenet_folder", root=str(tmp_path / "inet" / "train"))


# ---------------------------------------------------------------------------------------- augmentation


def test_random_crop_flip_is_a_padded_shifted_window():
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    again = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8 and torch.equal(out, again)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(len(images)):
        windows = [
            (padded[i, :, dy : dy + 8, dx : dx + 8], flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
        ]
        matches = [flip for w, flip in windows if torch.equal(w.flip(-1) if flip else w, out[i])]
        assert matches, f"image {i} is no crop of its padded input"
        flips += matches[0]
    assert 10 < flips < 54  # about half are mirrored
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_dataset_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), [0.5], [0.5])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), [0.5], [0.5])


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(UserError, match=str(bad)):
        read_idx(bad)
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        build_data("mnist", root=str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "absent")):
        build_data("mnist", root=str(tmp_path / "absent"))
