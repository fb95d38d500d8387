"""The run folder: distill lists every top-level entry it writes there in a manifest, so `--overwrite`
removes exactly those and nothing a user put beside them.

Rules (each with a regression test in `tests/test_run_folder.py`):
- A folder holds a run when it has the manifest (`.distill-run.json`), or, for runs from before manifests
  existed, one of the run markers (`recipe.yaml`, `metrics.json`, ...). Such a folder is refused unless the
  user resumes or overwrites.
- `--overwrite` deletes only the entries the manifest lists, never a folder without a manifest, and never
  when the folder holds the recipe file or any input the recipe names (a teacher checkpoint from an
  earlier run, a data file, a tokenizer).
- Entries that were there before the run began are never listed, so never deleted later.
- An advisory lock (`filelock`) keeps two runs out of one folder.
- The manifest also keeps the recipe the run was started from, written when the folder is first claimed
  (before a teacher trains into it), so that `--resume` can refuse an edited recipe even when the run was
  cut short before its `recipe.yaml` copy was written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from distill.errors import UserError
from distill.io import atomic_write_json

MANIFEST = ".distill-run.json"
LOCK = ".distill-run.lock"
# What a run writes at the top of its folder; pre-existing entries of these names are never claimed.
RUN_ENTRIES = (
    "recipe.yaml",
    "report.md",
    "metrics.json",
    "learning_curves.png",
    "methods",
    "teacher",
    "generations",
)
LEGACY_MARKERS = ("recipe.yaml", "metrics.json", "report.md", "methods", "teacher")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / MANIFEST).exists() or any((folder / m).exists() for m in LEGACY_MARKERS)
    )


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def read_manifest(folder: Path) -> list[str] | None:
    """The names the manifest lists, or None when there is no readable manifest."""
    document = _manifest(folder)
    written = document.get("written") if document is not None else None
    if not isinstance(written, list) or not all(isinstance(n, str) for n in written):
        return None
    return written


def manifest_recipe(folder: Path) -> dict[str, Any] | None:
    """The recipe document the manifest keeps (what the run was started from), or None (no manifest, or one
    from before manifests kept it)."""
    document = _manifest(folder)
    recipe = document.get("recipe") if document is not None else None
    return recipe if isinstance(recipe, dict) else None


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def recipe_inputs(document: Any) -> Iterator[Path]:
    """Every string in a recipe's data (the `output` section left out) that names an existing file or folder:
    the inputs a run reads (data files, checkpoints, tokenizers, caches), whatever the task calls them."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key != "output":
                yield from recipe_inputs(value)
    elif isinstance(document, list):
        for value in document:
            yield from recipe_inputs(value)
    elif isinstance(document, str) and document not in ("", ".") and len(document) < 4096:
        try:
            path = Path(document).expanduser()
            if path.exists():
                yield path
        except (OSError, ValueError):
            return


class RunFolder:
    """One run's folder. `claim()` before the first write: it creates the folder, takes the lock and records
    the entries this run owns (and `recipe`, the run's recipe as a JSON document); `release()` at the end."""

    def __init__(
        self, path: Path, protected: Iterable[Path] = (), recipe: dict[str, Any] | None = None
    ) -> None:
        self.path = path
        self.protected = [Path(p) for p in protected]
        self.recipe = recipe
        self._lock: FileLock | None = None
        self._before = set(os.listdir(path)) if path.is_dir() else set()

    # --------------------------------------------------------------------------------- opening
    def open(self, *, resume: bool, overwrite: bool) -> RunFolder:
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"output folder {path} is a file")
        for parent in path.absolute().parents:
            if parent.exists() and not parent.is_dir():
                raise UserError(f"output folder {path}: {parent} is a file, not a folder")
        run_there = holds_run(path)
        if run_there and not (resume or overwrite):
            raise UserError(
                f"output folder {path} holds an earlier run; pass --resume to continue it or --overwrite"
            )
        if resume and not run_there:
            raise UserError(f"--resume: output folder {path} holds no run to continue")
        if overwrite and run_there and _is_main_process():
            self._clear()
        ours = set(read_manifest(path) or [])
        if resume and not (path / MANIFEST).exists():  # a run from before manifests: adopt its entries
            ours |= set(RUN_ENTRIES)
        self._before -= ours
        clashes = sorted(set(RUN_ENTRIES) & self._before)
        if clashes:
            raise UserError(
                f"output folder {path} already has '{clashes[0]}', which a run would overwrite; "
                "choose another --out"
            )
        return self

    def _clear(self) -> None:
        """Delete what the manifest lists, after refusing every case where that could hit a user's file."""
        path = self.path
        written = read_manifest(path)
        if written is None:
            raise UserError(
                f"--overwrite: {path} has no run manifest ({MANIFEST}), so distill cannot tell its files "
                "from yours; remove the earlier run yourself or choose another --out"
            )
        root = path.resolve()
        for item in self.protected:
            if item.resolve().is_relative_to(root):
                raise UserError(
                    f"--overwrite refused: {path} holds {item}, which this recipe reads; choose another --out"
                )
        self._lock_now()  # only now: a refused folder is left without even a lock file
        for name in written:
            if not _plain_name(name) or name in (MANIFEST, LOCK):
                continue
            entry = path / name
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            elif entry.is_dir():
                shutil.rmtree(entry)  # removes links inside, never what they point to
        self._before = set(os.listdir(path))
        atomic_write_json(path / MANIFEST, {"format": 1, "written": []})

    # --------------------------------------------------------------------------------- writing
    def claim(self) -> None:
        """Create the folder (if needed), lock it and record the entries this run owns. Idempotent."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"output folder {self.path} cannot be made ({err.strerror})") from None
        if _is_main_process():
            self._lock_now()
        self.record()

    def record(self, extra: Iterable[str] = ()) -> None:
        """Add this run's entries (the standard ones, `extra`, any new top-level entry) to the manifest."""
        if not _is_main_process():
            return
        listed = read_manifest(self.path) or []
        now = set(os.listdir(self.path))
        owned = {*RUN_ENTRIES, *extra, LOCK} - self._before
        owned |= now - self._before - {MANIFEST}
        merged = sorted(set(listed) | {n for n in owned if _plain_name(n)})
        kept = manifest_recipe(self.path)
        recipe = self.recipe if self.recipe is not None else kept
        if merged != listed or recipe != kept or not (self.path / MANIFEST).exists():
            document: dict[str, Any] = {"format": 1, "written": merged}
            if recipe is not None:
                document["recipe"] = recipe
            atomic_write_json(self.path / MANIFEST, document)

    def _lock_now(self) -> None:
        if self._lock is not None:
            return
        lock = FileLock(str(self.path / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(f"output folder {self.path} is in use by another distill run") from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
