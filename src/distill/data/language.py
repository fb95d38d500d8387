"""Language-model data sets (`text`, `jsonl`, `json`, `csv`, `parquet`, `arithmetic`, `tinyshakespeare`):
`distill.data.text`."""

import inspect
from functools import partial
from typing import Any

from distill.data.base import DATASETS
from distill.data.paths import data_path
from distill.data.text import LMData, arithmetic_data, file_data


def tinyshakespeare_data(*, path: str | None = None, **params: Any) -> LMData:
    """Tiny-shakespeare as plain text: the shared copy (`text/tinyshakespeare.txt`) unless `path` is given."""
    return file_data("text", path=path or str(data_path("text/tinyshakespeare.txt")), **params)


# Its parameters are `file_data`'s (path optional): the recipe check refuses any other by name.
_file_parameters = inspect.signature(file_data).parameters.values()
tinyshakespeare_data.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [p.replace(default=None) if p.name == "path" else p for p in _file_parameters if p.name != "fmt"],
    return_annotation=LMData,
)


for _name in ("text", "jsonl", "json", "csv", "parquet"):
    DATASETS.add(_name, partial(file_data, _name), summary=f"local {_name} file for language models")
DATASETS.add("arithmetic", arithmetic_data, summary="synthetic multi-digit additions, exact match")
DATASETS.add("tinyshakespeare", tinyshakespeare_data, summary="tiny-shakespeare text (the shared copy)")
