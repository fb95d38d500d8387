"""The on-disk teacher cache: sharded safetensors files, a manifest, and sample lookup by id.

Layout of a cache folder:

    manifest.json           format version, teacher / tokenizer / data identity, k, temperature, shards
    shard-00000.safetensors ids (rows, k) int32, logprobs (rows, k) float16, tail (rows,) float32,
                            offsets (samples + 1,) int64 (absent when each sample is one row),
                            optional hidden.<layer> (rows, ...) float16

A row is one sample (classification) or one counted token (language models: the positions where the batch
mask is True, in order). Sample i of a shard owns rows offsets[i - first] .. offsets[i - first + 1].
`logprobs` are the teacher's top-k log-probabilities at the cache's temperature, `tail` the log of the
remaining mass, log(1 - sum(exp(logprobs))). Logit bytes per row: 6 k + 4, plus 8 per sample of several
rows (a language model's sequence).

Shards are written whole under a temporary name and renamed; the manifest lists only finished shards and is
rewritten atomically after each, so an interrupted writer resumes at the first sample no shard holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from distill.errors import UserError
from distill.io import atomic_write_json, save_tensors, sha256_file

if TYPE_CHECKING:
    from distill.losses.sparse import SparseTargets

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Fields two caches must share to be the same cache (a writer resumes only into a matching folder).
IDENTITY = (
    "targets",
    "format",
    "kind",
    "teacher",
    "tokenizer",
    "data",
    "samples",
    "k",
    "vocab",
    "temperature",
    "hidden",
)


@dataclass
class Shard:
    file: str
    first: int  # first sample id
    samples: int
    rows: int
    sha256: str

    @property
    def end(self) -> int:
        return self.first + self.samples


def topk_objectives() -> list[str]:
    """Registered objectives that learn from top-k targets."""
    from distill.objectives import OBJECTIVES

    return [name for name in OBJECTIVES.names() if OBJECTIVES.build(name).accepts_topk]


def _manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"teacher cache {folder}: unreadable manifest ({err})") from err


class CacheWriter:
    """Appends samples in id order and writes a shard every `shard_samples` samples."""

    def __init__(self, folder: Path, header: dict[str, Any], *, shard_samples: int, overwrite: bool) -> None:
        self.folder = Path(folder)
        self.header = {"format": FORMAT_VERSION, **header}
        self.shard_samples = shard_samples
        self.shards: list[Shard] = []
        existing = _manifest(self.folder)
        if existing is not None and not overwrite:
            differs = [f for f in IDENTITY if existing.get(f) != self.header.get(f)]
            if differs:
                raise UserError(
                    f"{self.folder} holds a teacher cache with another {differs[0]}; "
                    "choose another --out or pass --overwrite"
                )
            for shard in (Shard(**s) for s in existing["shards"]):
                if (
                    not (self.folder / shard.file).exists()
                    or sha256_file(self.folder / shard.file) != shard.sha256
                ):
                    break  # a damaged shard: it and the ones after it are written again
                self.shards.append(shard)
        elif existing is None and self.folder.exists() and any(self.folder.iterdir()) and not overwrite:
            raise UserError(f"{self.folder} is not empty and holds no teacher cache; choose another --out")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: list[dict[str, Tensor]] = []
        self._pending_samples = 0

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
        if self._pending_samples:
            self._flush(self._pending_samples)
        if not self.complete:
            raise UserError(
                f"teacher cache {self.folder}: {self.next_sample} of {self.header['samples']} samples"
            )
        return self._write_manifest(complete=True)

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


class TeacherCache:
    """A finished cache, read-only. `targets(sample_ids, rows_per_sample)` gathers the samples' rows in
    order, checking each sample's row count against what the batch counts (no silent misalignment)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"teacher cache not found: {self.folder}")
        manifest = _manifest(self.folder)
        if manifest is None:
            raise UserError(
                f"{self.folder} holds no teacher cache ({MANIFEST} missing); make one with `distill cache`"
            )
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(
                f"teacher cache {self.folder}: format {manifest.get('format')}, expected {FORMAT_VERSION}"
            )
        if not manifest.get("complete"):
            raise UserError(
                f"teacher cache {self.folder} is incomplete; run `distill cache` again to finish it"
            )
        self.manifest = manifest
        self.shards = [Shard(**s) for s in manifest["shards"]]
        self.k: int = manifest["k"]
        self.temperature: float = manifest["temperature"]
        self._loaded: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return int(self.manifest["samples"])

    def check(self, **expected: Any) -> None:
        """One-line error when the run's data / tokenizer / vocabulary is not what the cache was made on."""
        for field, value in expected.items():
            if value is not None and self.manifest.get(field) != value:
                raise UserError(
                    f"teacher cache {self.folder} was made for another {field} "
                    f"({self.manifest.get(field)!r}, this run has {value!r}); make the cache again"
                )

    def check_objectives(self, names: list[str], objectives: list[Any]) -> None:
        """Every objective that needs a teacher must take top-k targets at the cache's temperature, or read
        only teacher layers the cache holds."""
        for name, objective in zip(names, objectives, strict=True):
            if not objective.needs_teacher:
                continue
            layers = list(getattr(objective, "teacher_layers", ()))
            if layers:  # a feature objective: the cache must hold every layer it reads
                missing = [layer for layer in layers if layer not in self.hidden]
                if missing:
                    raise UserError(
                        f"objective '{name}' reads teacher layer '{missing[0]}', which teacher cache "
                        f"{self.folder} does not hold; cache again with --hidden {missing[0]}"
                    )
                continue
            if not getattr(objective, "accepts_topk", False):
                raise UserError(
                    f"objective '{name}' needs the teacher's full logits; a teacher cache holds the top-"
                    f"{self.k} (objectives that take one: {', '.join(topk_objectives())})"
                )
            temperature = getattr(objective, "temperature", 1.0)
            if abs(temperature - self.temperature) > 1e-9:
                raise UserError(
                    f"objective '{name}' softens at temperature {temperature:g} but the teacher cache "
                    f"{self.folder} holds log-probabilities at {self.temperature:g}; cache again with "
                    f"--temperature {temperature:g}"
                )

    def _shard(self, index: int) -> dict[str, Tensor]:
        if index not in self._loaded:
            shard = self.shards[index]
            path = self.folder / shard.file
            if not path.exists():
                raise UserError(f"teacher cache {self.folder}: shard {shard.file} is missing")
            if sha256_file(path) != shard.sha256:
                raise UserError(f"teacher cache {self.folder}: shard {shard.file} fails its checksum")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self._loaded[index] = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            except Exception as err:  # safetensors raises its own error types on a forged or broken file
                raise UserError(
                    f"teacher cache {self.folder}: shard {shard.file} is unreadable ({err})"
                ) from err
        return self._loaded[index]

    def _locate(self, sample: int) -> int:
        low, high = 0, len(self.shards)
        while low < high:  # the shards cover consecutive id ranges
            mid = (low + high) // 2
            if self.shards[mid].end <= sample:
                low = mid + 1
            else:
                high = mid
        if low == len(self.shards) or sample < 0:
            raise UserError(f"teacher cache {self.folder}: no sample {sample} (it holds {len(self)})")
        return low

    def _rows(self, sample_ids: Tensor, rows_per_sample: Tensor | None) -> list[tuple[int, Tensor]]:
        """(shard, row indices) runs holding the samples' rows in batch order, each sample's row count
        checked against what the batch counts."""
        samples = sample_ids.tolist()
        shard_of = [self._locate(sample) for sample in samples]
        parts: list[tuple[int, Tensor]] = []
        position = 0
        while position < len(samples):  # runs of consecutive batch entries in one shard, gathered at once
            end = position
            while end < len(samples) and shard_of[end] == shard_of[position]:
                end += 1
            index = shard_of[position]
            local = torch.tensor(samples[position:end]) - self.shards[index].first
            offsets = self._shard(index).get("offsets")
            if offsets is None:
                starts, counts = local, torch.ones_like(local)
            else:
                starts, counts = offsets[local], offsets[local + 1] - offsets[local]
            if rows_per_sample is not None:
                expected = rows_per_sample[position:end].to(counts.dtype)
                bad = (counts != expected).nonzero()
                if len(bad):
                    b = int(bad[0])
                    raise UserError(
                        f"teacher cache {self.folder}: sample {samples[position + b]} has {int(counts[b])} "
                        f"cached rows, the batch counts {int(expected[b])}; the data or its masking changed "
                        "since caching"
                    )
            # rows start..start+count of each sample, concatenated
            steps = torch.arange(int(counts.sum())) - torch.repeat_interleave(
                counts.cumsum(0) - counts, counts
            )
            parts.append((index, torch.repeat_interleave(starts, counts) + steps))
            position = end
        return parts

    def _gather(self, parts: list[tuple[int, Tensor]], name: str) -> Tensor:
        return torch.cat([self._shard(index)[name][rows] for index, rows in parts])

    def targets(self, sample_ids: Tensor, rows_per_sample: Tensor | None = None) -> SparseTargets:
        """The samples' top-k targets, one row per cached row (sample or counted token), in batch order."""
        from distill.losses.sparse import SparseTargets

        parts = self._rows(sample_ids, rows_per_sample)
        ids, logprobs, tail = (self._gather(parts, name) for name in ("ids", "logprobs", "tail"))
        return SparseTargets(ids.long(), logprobs.float(), tail)

    @property
    def hidden(self) -> list[str]:
        """The teacher modules whose outputs the cache holds (`distill cache --hidden`)."""
        return list(self.manifest.get("hidden", []))

    def features(
        self, sample_ids: Tensor, layers: list[str], rows_per_sample: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The cached outputs of teacher modules `layers`, float32, one row per cached row in batch order."""
        missing = [layer for layer in layers if layer not in self.hidden]
        if missing:
            raise UserError(
                f"teacher cache {self.folder} holds no output of teacher layer '{missing[0]}' (it holds "
                f"{', '.join(self.hidden) or 'none'}); cache again with --hidden {missing[0]}"
            )
        parts = self._rows(sample_ids, rows_per_sample)
        return {layer: self._gather(parts, f"hidden.{layer}").float() for layer in layers}
