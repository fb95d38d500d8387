from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

# The same examples on every run: a CI failure can be reproduced, and a green run stays green.
settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")

# Tests never download data (there is no network here). A test whose data is not on disk skips with a reason
# that starts "data missing:" (`data_helpers.require_data`); under DISTILL_REQUIRE_DATA=1, as `.ci/run` sets
# it, every such skip becomes a failure, so that a CI machine without its data cannot pass by skipping.
os.environ.pop("DISTILL_DOWNLOAD", None)
MISSING_DATA = "data missing:"


def _require_data() -> bool:
    return os.environ.get("DISTILL_REQUIRE_DATA") == "1"


def pytest_report_header() -> str:
    return (
        f"data: missing data {'fails' if _require_data() else 'skips (DISTILL_REQUIRE_DATA=1: fails)'} a test"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and _require_data() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if MISSING_DATA in reason:
            report.outcome = "failed"
            report.longrepr = (
                f"{reason.removeprefix('Skipped: ')} (DISTILL_REQUIRE_DATA=1 makes it a failure)"
            )
    return report


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Teacher caches of the tests never touch the user's cache."""
    os.environ["DISTILL_CACHE"] = str(tmp_path_factory.mktemp("distill-cache"))
    torch.set_num_threads(1)


@pytest.fixture
def distill_cmd() -> list[str]:
    return [sys.executable, "-m", "distill"]
