"""The data files and folders a recipe names must exist: checked before anything runs (`distill validate`,
`distill run`), so that a misspelt path is one line that names its recipe key, not a failure at load time.

Only paths the recipe gives are checked, the way the loaders read them (`distill.data`): `path` and
`test_path` are files (`read_records` takes them as written, relative to the current folder), `root` a
folder (`Path(root).expanduser()`, then `require_dir`). A data set asked to `download` makes its `root`
itself; a data set's default (a shared copy) is left to the resolver, `distill.data.paths.data_path`, which
refuses a missing one in one line when the data is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import UserError, clipped
from distill.recipe.schema import Recipe

# parameter -> what it names; the loaders read `path` as written and expand `~` in `root`
DATA_PATHS = {"path": "file", "test_path": "file", "root": "folder"}


def _named_path(params: dict[str, Any], key: str) -> Path | None:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        return None
    return Path(value).expanduser() if DATA_PATHS[key] == "folder" else Path(value)


def check_data_files(recipe: Recipe, source: str = "recipe") -> None:
    """Refuse, in one line naming the recipe key and the path, a data file or folder that does not exist."""
    params = recipe.data.params
    for key, kind in DATA_PATHS.items():
        path = _named_path(params, key)
        if path is None or (kind == "folder" and params.get("download") is True):
            continue
        if not (path.is_file() if kind == "file" else path.is_dir()):
            problem = f"is not a {kind}" if path.exists() else f"{kind} not found"
            raise UserError(f"{source}: data.params.{key}: {problem}: {clipped(str(params[key]), 200)}")
