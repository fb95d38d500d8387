"""MNIST and Fashion-MNIST from their IDX files.

MNIST's default is the shared copy (`images/mnist_t10k`, the 10k test split only), found by `data_path`;
Fashion-MNIST's is the Debian package `dataset-fashion-mnist`. With `root` given, `download=True` fetches the
four official files into it (online users only).
"""

from __future__ import annotations

from pathlib import Path

from distill.data.base import DataSplits
from distill.data.image_dataset import LoadedImages, SplitOptions, image_loader, image_splits
from distill.data.image_io import download_archives, idx_file, read_idx_pair
from distill.data.paths import cache_dir, data_path, local_or_download, require_dir

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
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
    return download_archives(MNIST_URL, MNIST_FILES, root)


def download_fashion_mnist(root: str | Path) -> Path:
    """Download the four Fashion-MNIST IDX files into `root`.

    Offline, `apt-get install dataset-fashion-mnist` provides them."""
    return download_archives(FASHION_MNIST_URL, FASHION_MNIST_FILES, root)


@image_loader(
    "mnist",
    summary="MNIST from IDX files; the shared copy (the 10k test split only) is split into train / test",
    omit=("test_per_class",),
    flip=False,
)
def mnist(
    options: SplitOptions, *, root: str | None = None, test_fraction: float = 0.3, download: bool = False
) -> DataSplits:
    """With `train-*` files in `root`, the official 60k / 10k split; with only the `t10k-*` files (the shared
    copy `images/mnist_t10k`, found by `distill.data.paths.data_path`), a stratified split of those 10k
    images by `split_seed`. Without `root`, `download=True` (or DISTILL_DOWNLOAD=1) fetches the shared copy
    into the cache when it is nowhere else. Augmentation is a random crop with `padding` (no flip: digits
    are not mirror-symmetric)."""
    if root:
        path = Path(root).expanduser()
        if download:
            download_mnist(path)
    else:
        path = data_path("images/mnist_t10k", download=download or None)
    require_dir(path, "MNIST folder")
    if idx_file(path, "train-images-idx3-ubyte") is not None:
        train, test = read_idx_pair(path, "train"), read_idx_pair(path, "t10k")
        origin = f"MNIST ({path}, official split)"
    else:
        train, test = read_idx_pair(path, "t10k").split(test_fraction, options.split_seed)
        share = f"{1 - test_fraction:.0%} / {test_fraction:.0%}"
        origin = f"MNIST test split ({path}) divided {share} by seed {options.split_seed}"
    loaded = LoadedImages(*options.subsets(train, test), [str(i) for i in range(10)], origin)
    return image_splits(loaded, options, name="mnist", num_classes=10, mean=MNIST_MEAN, std=MNIST_STD)


def _fashion_mnist_root(root: str | None, download: bool) -> Path:
    if root:
        path = Path(root).expanduser()
        return download_fashion_mnist(path) if download else path
    cache = cache_dir() / "fashion-mnist"
    missing = (
        f"data: Fashion-MNIST not found at {FASHION_MNIST_DEBIAN} or {cache}; "
        "`apt-get install dataset-fashion-mnist`, pass root=..., or download=True (or DISTILL_DOWNLOAD=1)"
    )
    marker = "train-images-idx3-ubyte.gz"
    places = [FASHION_MNIST_DEBIAN, cache]
    return local_or_download(
        places, marker, download_fashion_mnist, download=download or None, missing=missing
    )


@image_loader(
    "fashion_mnist", summary="Fashion-MNIST 60k / 10k from IDX files (Debian dataset-fashion-mnist)"
)
def fashion_mnist(options: SplitOptions, *, root: str | None = None, download: bool = False) -> DataSplits:
    """The official split from `root` (default /usr/share/datasets/fashion-mnist, where
    `apt-get install dataset-fashion-mnist` puts it, then a copy downloaded into the cache);
    `train_per_class` / `test_per_class` take stratified subsets (by `split_seed`) for quick runs."""
    path = require_dir(_fashion_mnist_root(root, download), "Fashion-MNIST folder")
    train, test = options.subsets(read_idx_pair(path, "train"), read_idx_pair(path, "t10k"))
    loaded = LoadedImages(train, test, FASHION_MNIST_CLASSES, f"Fashion-MNIST ({path})")
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return image_splits(loaded, options, name="fashion_mnist", num_classes=10, mean=mean, std=std)
