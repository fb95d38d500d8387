"""Image data sets from local files: MNIST and Fashion-MNIST (IDX), CIFAR-10 / CIFAR-100 (JPEG archives,
folders or the official binary files), any `root/<class>/*.png|jpg` folder, and ImageNet-style
`root/train|val/<class>` folders.

Images stay in memory as uint8 (N, C, H, W) tensors; `ImageTensorDataset` converts them to normalised float32
when a sample or a batch is read, and optionally applies the standard augmentation (random crop with 4-pixel
zero padding, horizontal flip), implemented in torch and drawn from a `torch.Generator` or the global RNG.

Loaders read paths and never download unless asked (`download=True`, for online users).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.base import DATASETS, DataSplits, shared_data_dir
from distill.errors import UserError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ------------------------------------------------------------------------------------------------ paths


def cache_dir() -> Path:
    """Where archives are extracted: `DISTILL_CACHE`, else `~/.cache/distill/data`."""
    return Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill" / "data").expanduser()


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"data: {what} not found: {path}")
    if not path.is_dir():
        raise UserError(f"data: {what} is not a folder: {path}")
    return path


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
        self, indices: Sequence[int] | np.ndarray, *, augment: bool | None = None
    ) -> ImageTensorDataset:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageTensorDataset(
            self.images[index],
            self.labels[index],
            self.mean.flatten().tolist(),
            self.std.flatten().tolist(),
            augment=self.augment if augment is None else augment,
            padding=self.padding,
            flip=self.flip,
            generator=self.generator,
            classes=self.classes,
        )


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
class _Arrays:
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)


def _splits(
    train: _Arrays,
    test: _Arrays,
    *,
    name: str,
    num_classes: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    augment: bool,
    flip: bool,
    padding: int,
    labelled_per_class: int | None,
    split_seed: int,
    classes: Sequence[str],
    description: str,
    generator: torch.Generator | None = None,
) -> DataSplits:
    """Wrap uint8 arrays into DataSplits; `labelled_per_class` gives the student a small labelled subset of
    the train split while the teacher keeps all of it. mean / std default to the train split's statistics."""
    if len(train.labels) == 0 or len(test.labels) == 0:
        raise UserError(f"data: {name} has an empty {'train' if len(train.labels) == 0 else 'test'} split")
    if mean is None or std is None:
        stats = channel_stats(train.images)
        mean, std = mean or stats[0], std or stats[1]
    common: dict[str, Any] = dict(padding=padding, flip=flip, generator=generator, classes=classes)
    full_train = ImageTensorDataset(train.images, train.labels, mean, std, augment=augment, **common)
    test_set = ImageTensorDataset(test.images, test.labels, mean, std, augment=False, **common)
    shape = tuple(train.images.shape[1:])
    description = f"{description}: {len(train.labels)} train / {len(test.labels)} test images {shape}"
    if augment:
        description += f", augmented (crop, padding {padding}{', flip' if flip else ''})"
    if labelled_per_class is None:
        return DataSplits(full_train, test_set, num_classes, shape, description=description)
    subset = per_class_subset(train.labels.numpy(), labelled_per_class, split_seed, "labelled_per_class")
    description += f"; the student sees {len(subset)} labelled images ({labelled_per_class} per class)"
    return DataSplits(
        full_train.subset(subset),
        test_set,
        num_classes,
        shape,
        teacher_train=full_train,
        description=description,
    )


def _take(arrays: _Arrays, per_class: int | None, seed: int, what: str) -> _Arrays:
    if per_class is None:
        return arrays
    index = torch.from_numpy(per_class_subset(arrays.labels.numpy(), per_class, seed, what))
    return _Arrays(arrays.images[index], arrays.labels[index])


# ------------------------------------------------------------------------------------------------ IDX files


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array; only unsigned-byte data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"data: file not found: {path}") from None
    except (OSError, EOFError) as error:
        raise UserError(f"data: cannot read {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"data: {path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"data: {path} is truncated (no complete IDX header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise UserError(
            f"data: {path} holds {len(data) - header} bytes of data, expected {int(np.prod(shape))}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_idx_pair(root: Path, prefix: str) -> _Arrays:
    images_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    for path, stem in ((images_path, "images-idx3-ubyte"), (labels_path, "labels-idx1-ubyte")):
        if path is None:
            raise UserError(f"data: {root / f'{prefix}-{stem}.gz'} not found")
    assert images_path is not None and labels_path is not None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"data: {images_path} and {labels_path} do not form an image / label pair")
    return _Arrays(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))


def _download(url: str, target: Path, md5: str) -> None:
    """Fetch `url` to `target` through a temporary file, checking its MD5 (online users only)."""
    tmp_name = ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise UserError(f"data: {url} has MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp_name, target)
    except OSError as error:
        raise UserError(f"data: cannot download {url}: {error}") from None
    finally:
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def download_mnist(root: str | Path) -> Path:
    """Download the four original MNIST IDX files into `root` (skips files already there)."""
    root = Path(root).expanduser()
    for name, md5 in MNIST_FILES.items():
        if not (root / name).is_file():
            _download(MNIST_URL + name, root / name, md5)
    return root


def download_fashion_mnist(root: str | Path) -> Path:
    """Download the four Fashion-MNIST IDX files into `root`.

    Offline, `apt-get install dataset-fashion-mnist` provides them."""
    root = Path(root).expanduser()
    for name, md5 in FASHION_MNIST_FILES.items():
        if not (root / name).is_file():
            _download(FASHION_MNIST_URL + name, root / name, md5)
    return root


def _default_mnist_root() -> Path:
    return shared_data_dir() / "images" / "mnist_t10k"


@DATASETS.register(
    "mnist",
    summary="MNIST from IDX files; the shared copy (the 10k test split only) is split into train / test",
)
def mnist(
    *,
    root: str | None = None,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    train_per_class: int | None = None,
    labelled_per_class: int | None = None,
    augment: bool = False,
    padding: int = 4,
    download: bool = False,
) -> DataSplits:
    """With `train-*` files in `root`, the official 60k / 10k split; with only the `t10k-*` files (the shared
    copy at ../shared/data/images/mnist_t10k), a stratified split of those 10k images by `split_seed`.
    Augmentation is a random crop with `padding` (no flip: digits are not mirror-symmetric)."""
    path = Path(root).expanduser() if root else _default_mnist_root()
    if download:
        download_mnist(path)
    _require_dir(path, "MNIST folder")
    if _idx_file(path, "train-images-idx3-ubyte") is not None:
        train, test = _read_idx_pair(path, "train"), _read_idx_pair(path, "t10k")
        origin = f"MNIST ({path}, official split)"
    else:
        pool = _read_idx_pair(path, "t10k")
        train_idx, test_idx = stratified_split(pool.labels.numpy(), test_fraction, split_seed)
        train = _Arrays(pool.images[train_idx], pool.labels[train_idx])
        test = _Arrays(pool.images[test_idx], pool.labels[test_idx])
        share = f"{1 - test_fraction:.0%} / {test_fraction:.0%}"
        origin = f"MNIST test split ({path}) divided {share} by seed {split_seed}"
    train = _take(train, train_per_class, split_seed, "train_per_class")
    return _splits(
        train,
        test,
        name="mnist",
        num_classes=10,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        augment=augment,
        flip=False,
        padding=padding,
        labelled_per_class=labelled_per_class,
        split_seed=split_seed,
        classes=[str(i) for i in range(10)],
        description=origin,
    )


@DATASETS.register(
    "fashion_mnist", summary="Fashion-MNIST 60k / 10k from IDX files (Debian dataset-fashion-mnist)"
)
def fashion_mnist(
    *,
    root: str | None = None,
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    labelled_per_class: int | None = None,
    augment: bool = False,
    padding: int = 4,
    flip: bool = True,
    download: bool = False,
) -> DataSplits:
    """The official split from `root` (default /usr/share/datasets/fashion-mnist, where
    `apt-get install dataset-fashion-mnist` puts it); `train_per_class` / `test_per_class` take stratified
    subsets (by `split_seed`) for quick runs."""
    path = Path(root).expanduser() if root else FASHION_MNIST_DEBIAN
    if download:
        download_fashion_mnist(path)
    if not path.exists() and root is None:
        raise UserError(
            f"data: Fashion-MNIST not found at {path}; "
            "`apt-get install dataset-fashion-mnist` or pass root=..."
        )
    _require_dir(path, "Fashion-MNIST folder")
    train = _take(_read_idx_pair(path, "train"), train_per_class, split_seed, "train_per_class")
    test = _take(_read_idx_pair(path, "t10k"), test_per_class, split_seed, "test_per_class")
    return _splits(
        train,
        test,
        name="fashion_mnist",
        num_classes=10,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        augment=augment,
        flip=flip,
        padding=padding,
        labelled_per_class=labelled_per_class,
        split_seed=split_seed,
        classes=FASHION_MNIST_CLASSES,
        description=f"Fashion-MNIST ({path})",
    )


# ------------------------------------------------------------------------------------------- image folders


def _class_folders(root: Path) -> list[Path]:
    _require_dir(root, "image folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"data: no class folders in {root} (expected {root}/<class>/*.png|jpg)")
    return folders


def _list_images(
    root: Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray, list[str]]:
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


def _resize(image: Any, size: tuple[int, int]) -> Any:
    """Resize the shorter side to fit, then centre-crop to `size` = (height, width)."""
    from PIL import Image

    height, width = size
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def decode_images(
    files: Sequence[Path], *, channels: int = 3, size: int | Sequence[int] | None = None
) -> Tensor:
    """Decode image files with PIL into one uint8 tensor (N, C, H, W). Without `size` all images must share
    one size; with it they are resized (shorter side) and centre-cropped."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("data: reading image files needs Pillow (`pip install pillow`)") from None
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserError(f"data: channels must be 1 or 3, got {channels}")
    target = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    out: np.ndarray | None = None
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if target is not None:
                    image = _resize(image, target)  # type: ignore[arg-type]
                array = np.asarray(image, dtype=np.uint8)
        except OSError as error:
            raise UserError(f"data: cannot read image {path}: {error}") from None
        if out is None:
            out = np.empty((len(files), *array.shape), dtype=np.uint8)
        if array.shape != out.shape[1:]:
            raise UserError(
                f"data: {path} is {array.shape[1]}x{array.shape[0]} "
                f"but {files[0]} is {out.shape[2]}x{out.shape[1]};"
                " set image_size to resize them"
            )
        out[i] = array
    if out is None:
        raise UserError("data: no images to decode")
    tensor = torch.from_numpy(out)
    return tensor[:, None] if channels == 1 else tensor.permute(0, 3, 1, 2).contiguous()


def _load_folder(
    root: Path,
    *,
    classes: Sequence[str] | None,
    per_class: int | None,
    seed: int,
    channels: int,
    size: int | Sequence[int] | None,
    what: str,
    cache_key: str | None = None,
) -> tuple[_Arrays, list[str]]:
    files, labels, names = _list_images(root, classes)
    if per_class is not None:
        keep = per_class_subset(labels, per_class, seed, what)
        files, labels = [files[i] for i in keep], labels[keep]
    cached = _decoded_cache_path(cache_key, files, channels, size) if cache_key else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as saved:
            images = torch.from_numpy(saved["images"])
    else:
        images = decode_images(files, channels=channels, size=size)
        if cached is not None:
            _atomic_save_npz(cached, images=images.numpy())
    return _Arrays(images, torch.from_numpy(labels)), names


def _decoded_cache_path(key: str, files: Sequence[Path], channels: int, size: Any) -> Path:
    spec = json.dumps([key, channels, size, [f.as_posix() for f in files]]).encode()
    return cache_dir() / "decoded" / f"{hashlib.sha256(spec).hexdigest()[:24]}.npz"


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _as_size(image_size: int | Sequence[int] | None) -> int | tuple[int, int] | None:
    if image_size is None or isinstance(image_size, int):
        return image_size
    return (int(image_size[0]), int(image_size[1]))


@DATASETS.register(
    "image_folder", summary="any folder of root/<class>/*.png|jpg, split into train / test by a seed"
)
def image_folder(
    *,
    root: str,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    image_size: int | list[int] | None = None,
    channels: int = 3,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    labelled_per_class: int | None = None,
    augment: bool = False,
    padding: int = 4,
    flip: bool = True,
) -> DataSplits:
    """Class names are the sub-folder names in sorted order. Without mean / std the train split's own
    per-channel statistics normalise both splits."""
    path = Path(root).expanduser()
    arrays, names = _load_folder(
        path,
        classes=None,
        per_class=None,
        seed=split_seed,
        channels=channels,
        size=_as_size(image_size),
        what="per_class",
    )
    train_idx, test_idx = stratified_split(arrays.labels.numpy(), test_fraction, split_seed)
    train = _Arrays(arrays.images[train_idx], arrays.labels[train_idx])
    test = _Arrays(arrays.images[test_idx], arrays.labels[test_idx])
    return _splits(
        train,
        test,
        name=f"image folder {path}",
        num_classes=len(names),
        mean=mean,
        std=std,
        augment=augment,
        flip=flip,
        padding=padding,
        labelled_per_class=labelled_per_class,
        split_seed=split_seed,
        classes=names,
        description=f"image folder {path} ({len(names)} classes, {test_fraction:.0%} test)",
    )


def _split_dirs(root: Path) -> tuple[Path, Path]:
    _require_dir(root, "data folder")
    train = root / "train"
    test = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not train.is_dir() or test is None:
        raise UserError(f"data: expected {root}/train/<class>/ and {root}/val/<class>/ (or test/) folders")
    return train, test


def _load_split_folders(
    root: Path,
    *,
    split_seed: int,
    train_per_class: int | None,
    test_per_class: int | None,
    channels: int,
    size: int | Sequence[int] | None,
    cache_key: str | None = None,
) -> tuple[_Arrays, _Arrays, list[str]]:
    train_dir, test_dir = _split_dirs(root)
    train, names = _load_folder(
        train_dir,
        classes=None,
        per_class=train_per_class,
        seed=split_seed,
        channels=channels,
        size=size,
        what="train_per_class",
        cache_key=cache_key,
    )
    test, _ = _load_folder(
        test_dir,
        classes=names,
        per_class=test_per_class,
        seed=split_seed,
        channels=channels,
        size=size,
        what="test_per_class",
        cache_key=cache_key,
    )
    return train, test, names


@DATASETS.register(
    "imagenet_folder", summary="ImageNet-style root/train/<class>/ and root/val|test/<class>/ image folders"
)
def imagenet_folder(
    *,
    root: str,
    image_size: int | list[int] | None = 64,
    channels: int = 3,
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    labelled_per_class: int | None = None,
    augment: bool = False,
    padding: int = 4,
    flip: bool = True,
) -> DataSplits:
    """Images are resized (shorter side) and centre-cropped to `image_size` and held in memory as uint8:
    fit for Tiny-ImageNet-sized sets or per-class subsets; mean / std default to ImageNet's."""
    path = Path(root).expanduser()
    train, test, names = _load_split_folders(
        path,
        split_seed=split_seed,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        channels=channels,
        size=_as_size(image_size),
    )
    return _splits(
        train,
        test,
        name=f"image folders {path}",
        num_classes=len(names),
        mean=mean,
        std=std,
        augment=augment,
        flip=flip,
        padding=padding,
        labelled_per_class=labelled_per_class,
        split_seed=split_seed,
        classes=names,
        description=f"image folders {path} ({len(names)} classes)",
    )


# ------------------------------------------------------------------------------------------- archives


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def extract_archive(archive: Path, cache: Path | None = None) -> Path:
    """Extract a tar archive once into the cache and return the folder. The folder's name carries the
    archive's SHA-256; extraction goes to a temporary folder that is renamed into place when complete, with a
    manifest (archive name, checksum, file count), so a crashed or concurrent run never leaves half a copy."""
    if not archive.is_file():
        raise UserError(f"data: archive not found: {archive}")
    digest = _sha256(archive)
    base = (cache or cache_dir()).expanduser()
    stem = archive.name.split(".")[0]
    final = base / f"{stem}-{digest[:16]}"
    if (final / "MANIFEST.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{stem}."))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise UserError(f"data: cannot extract {archive}: {error}") from None
        count = sum(1 for p in tmp.rglob("*") if p.is_file())
        manifest = {"archive": archive.name, "sha256": digest, "files": count}
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "MANIFEST.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_cifar_binary(path: Path, label_bytes: int, label_index: int) -> _Arrays:
    """Records of `label_bytes` label bytes then 3072 pixel bytes (R, G, B planes of 32x32), as published."""
    if not path.is_file():
        raise UserError(f"data: file not found: {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size == 0 or raw.size % record:
        raise UserError(f"data: {path} is not a CIFAR binary file ({raw.size} bytes, records of {record})")
    rows = raw.reshape(-1, record)
    images = torch.from_numpy(rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    return _Arrays(images, torch.from_numpy(rows[:, label_index].astype(np.int64)))


def _concat(parts: Sequence[_Arrays]) -> _Arrays:
    return _Arrays(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


CIFAR10_BINARY_URL = (
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "c32a1d4ab5d03f1284b67883e8d87530",
)
CIFAR100_BINARY_URL = (
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    "03b5dce01913d631647c71ecec9e9cb8",
)


def _download_and_unpack(url: str, md5: str, root: Path) -> Path:
    archive = root / url.rsplit("/", 1)[1]
    if not archive.is_file():
        _download(url, archive, md5)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def download_cifar10(root: str | Path) -> Path:
    """Download and unpack CIFAR-10's binary version into `root/cifar-10-batches-bin` (no pickles)."""
    root = Path(root).expanduser()
    if not (root / "cifar-10-batches-bin" / "test_batch.bin").is_file():
        _download_and_unpack(*CIFAR10_BINARY_URL, root)
    return root


def download_cifar100(root: str | Path) -> Path:
    """Download and unpack the official CIFAR-100 binary version into `root/cifar-100-binary` (no pickles)."""
    root = Path(root).expanduser()
    if not (root / "cifar-100-binary" / "test.bin").is_file():
        _download_and_unpack(*CIFAR100_BINARY_URL, root)
    return root


def _label_names(path: Path, count: int) -> list[str]:
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) == count:
            return names
    return [str(i) for i in range(count)]


def _cifar10_arrays(
    path: Path, *, split_seed: int, train_per_class: int | None, test_per_class: int | None
) -> tuple[_Arrays, _Arrays, list[str], str]:
    """CIFAR-10 from (in this order) the official binary files, `train|test/<class>/` folders, or the shared
    `*train*.tar.xz` / `*test*.tar.xz` JPEG archives (extracted once into the cache)."""
    binary = path / "cifar-10-batches-bin" if (path / "cifar-10-batches-bin").is_dir() else path
    if (binary / "test_batch.bin").is_file():
        train = _concat([_read_cifar_binary(binary / f"data_batch_{i}.bin", 1, 0) for i in range(1, 6)])
        test = _read_cifar_binary(binary / "test_batch.bin", 1, 0)
        train = _take(train, train_per_class, split_seed, "train_per_class")
        test = _take(test, test_per_class, split_seed, "test_per_class")
        names = _label_names(binary / "batches.meta.txt", 10)
        return train, test, names, f"CIFAR-10 ({binary}, official binary files)"
    archives = sorted(path.glob("*.tar*"))
    train_archive = next((a for a in archives if "train" in a.name), None)
    test_archive = next((a for a in archives if "test" in a.name), None)
    if train_archive is not None and test_archive is not None:
        root = extract_archive(train_archive)
        test_root = extract_archive(test_archive)
        key = f"cifar10:{root.name}:{test_root.name}"
        train, names = _load_folder(
            _single_child(root, "train"),
            classes=None,
            per_class=train_per_class,
            seed=split_seed,
            channels=3,
            size=None,
            what="train_per_class",
            cache_key=key,
        )
        test, _ = _load_folder(
            _single_child(test_root, "test"),
            classes=names,
            per_class=test_per_class,
            seed=split_seed,
            channels=3,
            size=None,
            what="test_per_class",
            cache_key=key,
        )
        return train, test, names, f"CIFAR-10 JPEG archives ({train_archive.name}, {test_archive.name})"
    if (path / "train").is_dir():
        train, test, names = _load_split_folders(
            path,
            split_seed=split_seed,
            train_per_class=train_per_class,
            test_per_class=test_per_class,
            channels=3,
            size=32,
        )
        return train, test, names, f"CIFAR-10 folders ({path})"
    raise UserError(
        f"data: no CIFAR-10 in {path}: expected cifar-10-batches-bin/, train/ and test/ folders, "
        "or *train*.tar.xz and *test*.tar.xz archives"
    )


def _single_child(root: Path, name: str) -> Path:
    """`root/name` if the archive held such a top folder, else `root` itself."""
    return root / name if (root / name).is_dir() else root


@DATASETS.register(
    "cifar10",
    summary="CIFAR-10 from the shared JPEG archives (10k train subset, 10k test), folders or binaries",
)
def cifar10(
    *,
    root: str | None = None,
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    labelled_per_class: int | None = None,
    augment: bool = False,
    padding: int = 4,
    flip: bool = True,
    download: bool = False,
) -> DataSplits:
    """Default root: ../shared/data/images/cifar10 (1,000 train images per class, the 10k test split).
    `download=True` fetches the official binary version (50k / 10k) into `root` for online users."""
    path = Path(root).expanduser() if root else shared_data_dir() / "images" / "cifar10"
    if download:
        download_cifar10(path)
    _require_dir(path, "CIFAR-10 folder")
    train, test, names, origin = _cifar10_arrays(
        path, split_seed=split_seed, train_per_class=train_per_class, test_per_class=test_per_class
    )
    return _splits(
        train,
        test,
        name="cifar10",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        augment=augment,
        flip=flip,
        padding=padding,
        labelled_per_class=labelled_per_class,
        split_seed=split_seed,
        classes=names,
        description=origin,
    )


@DATASETS.register("cifar100", summary="CIFAR-100 from the official binary files or train/ and test/ folders")
def cifar100(
    *,
    root: str,
    label: str = "fine",
    split_seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    labelled_per_class: int | None = None,
    augment: bool = False,
    padding: int = 4,
    flip: bool = True,
    download: bool = False,
) -> DataSplits:
    """The published protocol's data: `root/cifar-100-binary/{train,test}.bin` (what `download=True` fetches)
    or `root/train/<class>/`, `root/test/<class>/` image folders. `label` is "fine" (100) or "coarse" (20)
    for the binary files. The published recipes train with `augment=True`."""
    if label not in {"fine", "coarse"}:
        raise UserError(f"data: cifar100 label must be 'fine' or 'coarse', got '{label}'")
    path = Path(root).expanduser()
    if download:
        download_cifar100(path)
    _require_dir(path, "CIFAR-100 folder")
    binary = path / "cifar-100-binary" if (path / "cifar-100-binary").is_dir() else path
    if (binary / "test.bin").is_file():
        index = 1 if label == "fine" else 0
        train = _take(
            _read_cifar_binary(binary / "train.bin", 2, index), train_per_class, split_seed, "train_per_class"
        )
        test = _take(
            _read_cifar_binary(binary / "test.bin", 2, index), test_per_class, split_seed, "test_per_class"
        )
        count = 100 if label == "fine" else 20
        names = _label_names(binary / f"{label}_label_names.txt", count)
        origin = f"CIFAR-100 ({binary}, official binary files, {label} labels)"
    else:
        train, test, names = _load_split_folders(
            path,
            split_seed=split_seed,
            train_per_class=train_per_class,
            test_per_class=test_per_class,
            channels=3,
            size=32,
        )
        count = len(names)
        origin = f"CIFAR-100 folders ({path})"
    return _splits(
        train,
        test,
        name="cifar100",
        num_classes=count,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        augment=augment,
        flip=flip,
        padding=padding,
        labelled_per_class=labelled_per_class,
        split_seed=split_seed,
        classes=names,
        description=origin,
    )
