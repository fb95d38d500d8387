"""Data sets by name. Every module here is imported, so that its loaders register in `DATASETS`;
`paths` finds the shared data files they read (docs/data.md)."""

from __future__ import annotations

import importlib
import pkgutil

from distill.data.base import DATASETS, DataSplits, build_data

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATASETS", "DataSplits", "build_data"]
