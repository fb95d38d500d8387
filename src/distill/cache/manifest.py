"""A teacher cache's manifest: its constants, its schema (one line for a malformed one) and its shards
(layout and rules in `distill.cache.store`)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import UserError, first_line

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
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
# What `distill.io`'s atomic writes leave behind when the process is killed mid-write.
TEMPORARY = re.compile(r"\.(manifest\.json|shard-\d{5,}\.safetensors)\..+\.tmp")
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


def inside_folder(folder: Path, name: str) -> bool:
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
        raise UserError(f"teacher cache {folder}: unreadable {MANIFEST} ({first_line(err)})") from err
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
        if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or not inside_folder(folder, name):
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
