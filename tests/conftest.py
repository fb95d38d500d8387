from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

# The same examples on every run: a CI failure can be reproduced, and a green run stays green.
settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Teacher caches of the tests never touch the user's cache."""
    os.environ["DISTILL_CACHE"] = str(tmp_path_factory.mktemp("distill-cache"))
    torch.set_num_threads(1)


@pytest.fixture
def distill_cmd() -> list[str]:
    return [sys.executable, "-m", "distill"]
