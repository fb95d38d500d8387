"""Tests that need real data call `require_data`: a missing file is a skip whose one-line reason starts
"data missing:" and names it; under `DISTILL_REQUIRE_DATA=1` (CI) tests/conftest.py makes it a failure."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pytest

from distill.data.paths import data_path
from distill.errors import UserError

MISSING = "data missing:"  # tests/conftest.py fails a skip that says so when DISTILL_REQUIRE_DATA=1


def missing_data(reason: str) -> NoReturn:
    """Skip the test with the one line `data missing: <reason>` (a failure under DISTILL_REQUIRE_DATA=1)."""
    __tracebackhide__ = True  # the skip is reported at the test's line, not here
    pytest.skip(f"{MISSING} {reason}")


def require_data(relative: str) -> Path:
    """The local path of shared file or folder `relative` (as `distill.data.paths.data_path` finds it, never
    downloading), else `missing_data`."""
    __tracebackhide__ = True
    try:
        return data_path(relative, download=False)
    except UserError as error:
        missing_data(str(error).removeprefix("data: "))


def require_dataset(name: str) -> None:
    """`missing_data` unless the registered data set `name` builds from local files."""
    __tracebackhide__ = True
    from distill.data import build_data

    try:
        build_data(name)
    except UserError as error:
        missing_data(str(error).removeprefix("data: "))


def require_file(path: Path, how: str) -> Path:
    """`path` when it is a file (data installed, not shared), else `missing_data` saying `how` to get it."""
    __tracebackhide__ = True
    if not path.is_file():
        missing_data(f"{path} not found; {how}")
    return path
