"""Reading image files: IDX files (MNIST's format), tar archives extracted once into the cache, image files
decoded with PIL, decoded arrays cached as npz, and the official archives fetched for online users."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.data.image_dataset import ImageArrays
from distill.data.paths import cache_dir, download_file
from distill.errors import UserError
from distill.io import atomic_write_bytes, sha256_file

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


def idx_file(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def read_idx_pair(root: Path, prefix: str) -> ImageArrays:
    images_path = idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = idx_file(root, f"{prefix}-labels-idx1-ubyte")
    for path, stem in ((images_path, "images-idx3-ubyte"), (labels_path, "labels-idx1-ubyte")):
        if path is None:
            raise UserError(f"data: {root / f'{prefix}-{stem}.gz'} not found")
    assert images_path is not None and labels_path is not None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"data: {images_path} and {labels_path} do not form an image / label pair")
    return ImageArrays(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))


# ------------------------------------------------------------------------------------------------ archives


def extract_archive(archive: Path, cache: Path | None = None) -> Path:
    """Extract a tar archive once into the cache and return the folder. The folder's name carries the
    archive's SHA-256; extraction goes to a temporary folder that is renamed into place when complete, with a
    manifest (archive name, checksum, file count), so a crashed or concurrent run never leaves half a copy."""
    if not archive.is_file():
        raise UserError(f"data: archive not found: {archive}")
    digest = sha256_file(archive)
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


def download_archives(base_url: str, files: dict[str, str], root: str | Path) -> Path:
    """Download each of `files` (name -> MD5) from `base_url` into `root`, skipping those already there."""
    root = Path(root).expanduser()
    for name, md5 in files.items():
        if not (root / name).is_file():
            download_file(base_url + name, root / name, md5=md5)
    return root


def download_and_unpack(url: str, md5: str, root: str | Path, marker: str) -> Path:
    """Download the tar archive at `url` into `root` (MD5-checked) and unpack it there, unless `root / marker`
    is already there."""
    root = Path(root).expanduser()
    if not (root / marker).is_file():
        name = url.rsplit("/", 1)[1]
        download_archives(url.removesuffix(name), {name: md5}, root)
        with tarfile.open(root / name) as tar:
            tar.extractall(root, filter="data")
    return root


# ------------------------------------------------------------------------------------------- image files


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


def decoded_cache_path(key: str, files: Sequence[Path], channels: int, size: Any) -> Path:
    """Where the decoded images of `files` are kept: named by a hash of the key, settings and files."""
    spec = json.dumps([key, channels, size, [f.as_posix() for f in files]]).encode()
    return cache_dir() / "decoded" / f"{hashlib.sha256(spec).hexdigest()[:24]}.npz"


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Arrays as one npz file, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
