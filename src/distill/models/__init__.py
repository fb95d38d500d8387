"""Model zoo and adapters. Every module here registers its architectures in `MODELS` on import."""

from __future__ import annotations

import importlib
import pkgutil

from distill.models.registry import MODELS, build_model, count_parameters, split_model_name

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"registry"} and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODELS", "build_model", "count_parameters", "split_model_name"]
