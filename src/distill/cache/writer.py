"""Writing a teacher cache: one writer per folder (a lock), shards written whole and renamed, the manifest
rewritten after each; a killed writer's leftovers are removed and its work resumed (`distill.cache.store`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import Tensor

from distill.cache.manifest import (
    FORMAT_VERSION,
    IDENTITY,
    LOCK,
    MANIFEST,
    SHARD_NAME,
    TEMPORARY,
    Shard,
    inside_folder,
    read_manifest,
)
from distill.errors import UserError
from distill.io import atomic_write_json, save_tensors, sha256_file


def _owned(name: str) -> bool:
    """A name a cache writer puts in its folder."""
    return name in {MANIFEST, LOCK} or bool(SHARD_NAME.fullmatch(name) or TEMPORARY.fullmatch(name))


class CacheWriter:
    """Appends samples in id order and writes a shard every `shard_samples` samples. One writer per folder
    (a lock); `close()` (or `finish()`) releases it."""

    def __init__(self, folder: Path, header: dict[str, Any], *, shard_samples: int, overwrite: bool) -> None:
        self.folder = Path(folder)
        self.header = {"format": FORMAT_VERSION, **header}
        self.shard_samples = shard_samples
        self.shards: list[Shard] = []
        self._pending: list[dict[str, Tensor]] = []
        self._pending_samples = 0
        self._refuse_another(overwrite)  # read only: a refused folder is left as it was
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock: FileLock | None = FileLock(str(self.folder / LOCK), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise UserError(
                f"another `distill cache` is writing into {self.folder}; wait for it or choose another --out"
            ) from None
        try:
            self._recover(overwrite)
        except BaseException:
            self.close()
            raise

    def _refuse_another(self, overwrite: bool) -> None:
        if not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise UserError(f"{self.folder} is not a folder; choose another --out")
        if overwrite:
            return
        found = read_manifest(self.folder)  # malformed: one line (--overwrite replaces it)
        if found is not None:
            differs = [f for f in IDENTITY if found[0].get(f) != self.header.get(f)]
            if differs:
                raise UserError(
                    f"{self.folder} holds a teacher cache with another {differs[0]}; "
                    "choose another --out or pass --overwrite"
                )
        elif any(not _owned(entry.name) for entry in self.folder.iterdir()):
            raise UserError(f"{self.folder} is not empty and holds no teacher cache; choose another --out")

    def _recover(self, overwrite: bool) -> None:
        """Keep the good shards of an earlier (killed) writer, drop everything else it left, and write the
        manifest before any new shard: from here on a killed writer resumes."""
        found = None if overwrite else read_manifest(self.folder)
        for entry in self.folder.iterdir():  # a killed writer's temporaries; with --overwrite the old cache
            if entry.is_file() and (
                TEMPORARY.fullmatch(entry.name)
                or (overwrite and (entry.name == MANIFEST or SHARD_NAME.fullmatch(entry.name)))
            ):
                entry.unlink(missing_ok=True)
        if found is not None:
            for shard in found[1]:
                path = self.folder / shard.file
                if (
                    not path.is_file()
                    or not inside_folder(self.folder, shard.file)
                    or sha256_file(path) != shard.sha256
                ):
                    break  # a damaged shard: it and the ones after it are written again
                self.shards.append(shard)
        if found is None or len(self.shards) < len(found[1]) or not found[0].get("complete"):
            self._write_manifest(complete=False)
        self._remove_unlisted()

    def _remove_unlisted(self) -> None:
        """Shards the manifest does not list: written after its last update by a killed writer, or after a
        damaged one. They are written again."""
        listed = {shard.file for shard in self.shards}
        for entry in self.folder.iterdir():
            if SHARD_NAME.fullmatch(entry.name) and entry.name not in listed:
                entry.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def next_sample(self) -> int:
        """The first sample id not yet stored (resume from here)."""
        return (self.shards[-1].end if self.shards else 0) + self._pending_samples

    @property
    def complete(self) -> bool:
        return self.next_sample >= self.header["samples"]

    def add(
        self, ids: Tensor, logprobs: Tensor, tail: Tensor, rows_per_sample: Tensor, **hidden: Tensor
    ) -> None:
        """One batch of consecutive samples: `rows_per_sample[i]` rows each, `ids`/`logprobs` (rows, k)."""
        part = {
            "ids": ids.to(torch.int32).cpu(),
            "logprobs": logprobs.to(torch.float16).cpu(),
            "tail": tail.float().cpu(),
            "counts": rows_per_sample.to(torch.int64).cpu(),
        }
        part |= {f"hidden.{name}": value.to(torch.float16).cpu() for name, value in hidden.items()}
        self._pending.append(part)
        self._pending_samples += len(rows_per_sample)
        while self._pending_samples >= self.shard_samples:
            self._flush(self.shard_samples)

    def finish(self) -> dict[str, Any]:
        try:
            if self._pending_samples:
                self._flush(self._pending_samples)
            if not self.complete:
                raise UserError(
                    f"teacher cache {self.folder}: {self.next_sample} of {self.header['samples']} samples"
                )
            manifest = self._write_manifest(complete=True)
            self._remove_unlisted()
            return manifest
        finally:
            self.close()

    def _flush(self, samples: int) -> None:
        """Write the first `samples` pending samples as one shard."""
        joined = {k: torch.cat([p[k] for p in self._pending]) for k in self._pending[0]}
        counts = joined.pop("counts")
        rows = int(counts[:samples].sum())
        tensors = {k: v[:rows] for k, v in joined.items()}
        if bool((counts[:samples] != 1).any()):  # one row per sample (classification) needs no offsets
            tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts[:samples].cumsum(0)])
        first = self.next_sample - self._pending_samples
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_tensors(self.folder / name, tensors)
        self.shards.append(Shard(name, first, samples, rows, sha256_file(self.folder / name)))
        rest = {k: v[rows:] for k, v in joined.items()} | {"counts": counts[samples:]}
        self._pending = [rest] if len(rest["counts"]) else []
        self._pending_samples -= samples
        self._write_manifest(complete=False)

    def _write_manifest(self, *, complete: bool) -> dict[str, Any]:
        manifest = self.header | {"complete": complete, "shards": [vars(s) for s in self.shards]}
        atomic_write_json(self.folder / MANIFEST, manifest)
        return manifest
