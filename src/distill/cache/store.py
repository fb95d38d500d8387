"""The on-disk teacher cache: sharded safetensors files, a manifest, and sample lookup by id.

Layout of a cache folder:

    manifest.json           format version, teacher / tokenizer / data identity, k, temperature, shards
    shard-00000.safetensors ids (rows, k) int32, logprobs (rows, k) float16, tail (rows,) float32,
                            offsets (samples + 1,) int64 (absent when each sample is one row),
                            optional hidden.<layer> (rows, ...) float16
    .distill-cache.lock     held by the one writer at work

A row is one sample (classification) or one counted token (language models: the positions where the batch
mask is True, in order). Sample i of a shard owns rows offsets[i - first] .. offsets[i - first + 1].
`logprobs` are the teacher's top-k log-probabilities at the cache's temperature, `tail` the log of the
remaining mass, log(1 - sum(exp(logprobs))). Logit bytes per row: 6 k + 4, plus 8 per sample of several
rows (a language model's sequence).

Writing: the manifest (header, no shards) is written before the first shard, shards are written whole under a
temporary name and renamed, and the manifest lists only finished shards, rewritten atomically after each; so a
writer killed at any point resumes at the first sample no good shard holds, and the next writer removes what
the killed one left (temporaries, shards the manifest does not list).

Reading: opening a cache checks the manifest's schema (one line for a malformed one), that every shard is a
plain file name inside the folder and that the shards cover the samples in order; `verify()` then checks
every shard's sha256 and its tensors' shapes against k, its rows and samples. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from distill.cache.manifest import MANIFEST, Shard, first_line, read_manifest, topk_objectives
from distill.errors import UserError
from distill.io import sha256_file

if TYPE_CHECKING:
    from distill.losses.sparse import SparseTargets


class TeacherCache:
    """A finished cache, read-only. `targets(sample_ids, rows_per_sample)` gathers the samples' rows in
    order, checking each sample's row count against what the batch counts (no silent misalignment).

    Opening checks the manifest (schema, shard names, coverage of the samples) and that every shard is
    there; `verify()` checks every shard's bytes (sha256) and tensor shapes, which reading a shard does
    anyway for that shard. A run calls `verify()` before its folder is made (`open_recipe_cache`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"teacher cache not found: {self.folder}")
        found = read_manifest(self.folder)
        if found is None:
            raise UserError(
                f"{self.folder} holds no teacher cache ({MANIFEST} missing); make one with `distill cache`"
            )
        manifest, shards = found
        if not manifest["complete"]:
            raise UserError(
                f"teacher cache {self.folder} is incomplete; run `distill cache` again to finish it"
            )
        self.manifest = manifest
        self.shards = shards
        self.k: int = manifest["k"]
        self.temperature: float = manifest["temperature"]
        self._loaded: dict[int, dict[str, Tensor]] = {}
        self._verified: set[int] = set()
        for shard in self.shards:
            if not (self.folder / shard.file).is_file():
                raise UserError(f"teacher cache {self.folder}: shard {shard.file} is missing")

    def verify(self) -> TeacherCache:
        """Check every shard now: its sha256, and its tensors against the manifest's k and the shard's rows
        and samples. One line for the first that fails."""
        for index in range(len(self.shards)):
            self._verify(index)
        return self

    def _verify(self, index: int) -> None:
        if index in self._verified:
            return
        shard = self.shards[index]
        path = self.folder / shard.file
        if not path.is_file():
            raise UserError(f"teacher cache {self.folder}: shard {shard.file} is missing")
        if sha256_file(path) != shard.sha256:
            # A file that is not safetensors at all is named as such (a pickle put in its place, say).
            problem = self._shape_problem(path, shard)
            if problem is not None and problem.startswith("is not"):
                raise UserError(f"teacher cache {self.folder}: shard {shard.file} {problem}")
            raise UserError(
                f"teacher cache {self.folder}: shard {shard.file} fails its checksum (damaged or changed "
                "since it was written); make the cache again"
            )
        problem = self._shape_problem(path, shard)
        if problem is not None:
            raise UserError(f"teacher cache {self.folder}: shard {shard.file} {problem}")
        self._verified.add(index)

    def _shape_problem(self, path: Path, shard: Shard) -> str | None:
        """What in the shard's tensors disagrees with the manifest, read from the safetensors header (and the
        small offsets tensor) only; None when nothing does."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                layout = {}
                for name in handle.keys():  # noqa: SIM118
                    part = handle.get_slice(name)
                    layout[name] = (tuple(part.get_shape()), part.get_dtype())
                offsets = handle.get_tensor("offsets") if "offsets" in layout else None
        except Exception as err:  # safetensors raises its own error types on a forged or broken file
            return f"is not a readable safetensors file ({first_line(err)})"
        k, rows, samples = self.k, shard.rows, shard.samples
        expected = {"ids": ((rows, k), "I32"), "logprobs": ((rows, k), "F16"), "tail": ((rows,), "F32")}
        for name, (shape, dtype) in expected.items():
            if name not in layout:
                return f"has no '{name}' tensor"
            if layout[name] != (shape, dtype):
                got_shape, got_dtype = layout[name]
                return (
                    f"holds '{name}' of shape {got_shape} {got_dtype}, the manifest says {shape} {dtype} "
                    f"(k = {k}, {rows} rows); make the cache again"
                )
        hidden = {f"hidden.{layer}" for layer in self.hidden}
        for name in sorted(hidden):
            if name not in layout or layout[name][0][:1] != (rows,):
                return f"has no '{name}' tensor of {rows} rows; make the cache again"
        unexpected = sorted(set(layout) - set(expected) - hidden - {"offsets"})
        if unexpected:
            return f"holds a tensor '{unexpected[0]}' the manifest does not list"
        if offsets is None:
            if rows != samples:
                return f"holds {rows} rows for {samples} samples and no offsets"
        elif (
            layout["offsets"] != ((samples + 1,), "I64")
            or int(offsets[0]) != 0
            or int(offsets[-1]) != rows
            or bool((offsets.diff() < 0).any())
        ):
            return f"has offsets that do not split its {rows} rows into its {samples} samples"
        return None

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
            self._verify(index)
            shard = self.shards[index]
            try:
                with safe_open(str(self.folder / shard.file), framework="pt") as handle:
                    self._loaded[index] = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            except Exception as err:  # safetensors raises its own error types on a forged or broken file
                raise UserError(
                    f"teacher cache {self.folder}: shard {shard.file} is unreadable ({first_line(err)})"
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
