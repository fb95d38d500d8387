"""Language-model data sets (`text`, `jsonl`, `json`, `csv`, `parquet`, `arithmetic`): `distill.lm.data`."""

from functools import partial

from distill.data.base import DATASETS
from distill.lm.data import arithmetic_data, file_data

for _name in ("text", "jsonl", "json", "csv", "parquet"):
    DATASETS.add(_name, partial(file_data, _name), summary=f"local {_name} file for language models")
DATASETS.add("arithmetic", arithmetic_data, summary="synthetic multi-digit additions, exact match")
