"""Atomic file writes: write to a temporary name in the same folder, flush to disk, then rename."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor


def _file_mode() -> int:
    """The mode a plain `open()` would give a new file: 0o666 less the process's umask (a temporary file
    from `mkstemp` is 0o600, which would hide the run's files from the user's group)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, atomically; tensors are made contiguous and moved to the CPU first."""
    cpu, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        shared = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        # safetensors refuses tensors that share memory (tied input / output embeddings): each gets a copy.
        cpu[key] = value.clone() if shared is not None and shared in seen else value
        seen.add(shared)
    _atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable short hash of JSON-able data (configs, specs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where distill keeps what it can make again (trained teachers, generations, tokenizers, data):
    `$DISTILL_CACHE`, else `~/.cache/distill`."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))
