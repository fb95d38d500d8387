"""Language-model data sets (`text`, `jsonl`, `json`, `csv`, `parquet`, `arithmetic`, `tinyshakespeare`):
`distill.data.text`."""

import inspect
from functools import partial
from typing import Any

from distill.data.arithmetic import arithmetic_data
from distill.data.base import DATASETS
from distill.data.paths import data_path
from distill.data.text import LMData, build_lm_data, read_records, resolve_tokenizer
from distill.errors import clipped


def file_data(
    fmt: str,
    *,
    path: str,
    test_path: str | None = None,
    tokenizer: Any = None,
    layout: str = "auto",
    max_length: int = 128,
    test_fraction: float = 0.1,
    prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    exact_match: bool | None = None,
    fields: dict[str, str] | None = None,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
) -> LMData:
    records = read_records(path, fmt)
    test_records = read_records(test_path, fmt) if test_path is not None else None
    names = {"text": "text", **(fields or {})}
    text_records = records
    if fmt == "text" and test_records is None:  # train the tokenizer on the training part only
        text = records[0]["text"]
        text_records = [{"text": text[: int(len(text) * (1 - test_fraction))]}]
    tok = resolve_tokenizer(tokenizer, text_records, names["text"])
    return build_lm_data(
        records,
        test_records,
        tokenizer=tok,
        layout="text" if fmt == "text" else layout,
        max_length=max_length,
        test_fraction=test_fraction,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        exact_match=exact_match,
        fields=fields,
        seed=seed,
        where=clipped(str(path), 200),
        max_train_examples=max_train_examples,
        max_test_examples=max_test_examples,
    )


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
