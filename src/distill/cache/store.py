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

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from torch import Tensor

from distill.errors import UserError
from distill.io import atomic_write_json, save_tensors, sha256_file

if TYPE_CHECKING:
    from distill.losses.sparse import SparseTargets

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".distill-cache.lock"
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
SHARD_FIELDS = ("file", "first", "samples", "rows", "sha256")
_SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
# What `distill.io`'s atomic writes leave behind when the process is killed mid-write.
_TEMPORARY = re.compile(r"\.(manifest\.json|shard-\d{5,}\.safetensors)\..+\.tmp")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_temperature(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _malformed(folder: Path, what: str) -> UserError:
    return UserError(
        f"teacher cache {folder}: malformed {MANIFEST} ({what}); make the cache again "
        "(`distill cache ... --overwrite`)"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _inside(folder: Path, name: str) -> bool:
    """Whether `folder / name` is, links resolved, a direct entry of `folder`."""
    return (folder / name).resolve().parent == folder.resolve()


def read_manifest(folder: Path) -> tuple[dict[str, Any], list[Shard]] | None:
    """The cache's manifest and its shards, schema-checked (one line for anything malformed); None when the
    folder holds no manifest."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"teacher cache {folder}: unreadable {MANIFEST} ({_first_line(err)})") from err
    return manifest, _validate(folder, manifest)


def _validate(folder: Path, manifest: Any) -> list[Shard]:
    if not isinstance(manifest, dict):
        raise _malformed(folder, "not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(
            f"teacher cache {folder}: format {manifest.get('format')!r}, this version of distill reads "
            f"{FORMAT_VERSION}; make the cache again (`distill cache ... --overwrite`)"
        )
    required = (
        ("samples", _is_count, "a count"),
        ("k", lambda v: _is_count(v, 1), "a positive count"),
        ("temperature", _is_temperature, "a positive number"),
        ("complete", lambda v: isinstance(v, bool), "true or false"),
        ("shards", lambda v: isinstance(v, list), "a list"),
    )
    optional = (
        ("hidden", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
        ("vocab", lambda v: _is_count(v, 1), "a positive count"),
        ("kind", lambda v: isinstance(v, str), "a string"),
        ("teacher", lambda v: isinstance(v, str), "a string"),
        ("data", lambda v: isinstance(v, str), "a string"),
        ("tokenizer", lambda v: v is None or isinstance(v, str), "a string or null"),
    )
    for field, valid, meaning in required + optional:
        if field not in manifest:
            if any(field == name for name, _, _ in required):
                raise _malformed(folder, f"no '{field}'")
            continue
        if not valid(manifest[field]):
            raise _malformed(folder, f"'{field}' is not {meaning}")
    shards: list[Shard] = []
    end = 0
    for position, entry in enumerate(manifest["shards"]):
        where = f"shards[{position}]"
        if not isinstance(entry, dict):
            raise _malformed(folder, f"{where} is not an object")
        missing = [f for f in SHARD_FIELDS if f not in entry]
        if missing:
            raise _malformed(folder, f"{where} has no '{missing[0]}'")
        extra = sorted(set(entry) - set(SHARD_FIELDS))
        if extra:
            raise _malformed(folder, f"{where} has an unknown field '{extra[0]}'")
        name = entry["file"]
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or not _inside(folder, name):
            raise UserError(
                f"teacher cache {folder}: {where} names '{str(name)[:60]}', not a file of the cache folder"
            )
        for field in ("first", "samples", "rows"):
            if not _is_count(entry[field], 1 if field == "samples" else 0):
                raise _malformed(folder, f"{where}.{field} is not a count")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise _malformed(folder, f"{where}.sha256 is not a sha256 digest")
        if entry["first"] != end:
            raise _malformed(
                folder, f"{where} starts at sample {entry['first']}, the shards before end at {end}"
            )
        if any(s.file == name for s in shards):
            raise _malformed(folder, f"{where} names {name} a second time")
        shard = Shard(**{f: entry[f] for f in SHARD_FIELDS})
        shards.append(shard)
        end = shard.end
    samples = manifest["samples"]
    if end > samples or (manifest["complete"] and end != samples):
        raise _malformed(folder, f"its shards hold {end} samples, it says {samples}")
    return shards


def _owned(name: str) -> bool:
    """A name a cache writer puts in its folder."""
    return name in {MANIFEST, LOCK} or bool(_SHARD_NAME.fullmatch(name) or _TEMPORARY.fullmatch(name))


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
                _TEMPORARY.fullmatch(entry.name)
                or (overwrite and (entry.name == MANIFEST or _SHARD_NAME.fullmatch(entry.name)))
            ):
                entry.unlink(missing_ok=True)
        if found is not None:
            for shard in found[1]:
                path = self.folder / shard.file
                if (
                    not path.is_file()
                    or not _inside(self.folder, shard.file)
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
            if _SHARD_NAME.fullmatch(entry.name) and entry.name not in listed:
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
            return f"is not a readable safetensors file ({_first_line(err)})"
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
                    f"teacher cache {self.folder}: shard {shard.file} is unreadable ({_first_line(err)})"
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
