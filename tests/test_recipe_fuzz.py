"""The recipe fuzzer (issue 22 item 7): hypothesis mutates the packaged recipes and runs each through the real
CLI in-process. Property, for every generated recipe:

- exit status 0 and a run folder that holds `report.md`, or exit status 2 with exactly one stderr line that
  starts with `error:` (never a traceback, never an exception out of `distill.cli.main`);
- no file written, changed or removed outside the run folder (the example's working folder is compared before
  and after, the run folder left out; caches live in `$DISTILL_CACHE`, which the test suite isolates), and
  nothing in Hugging Face's datasets cache;
- no hang: each example has `DISTILL_FUZZ_TIMEOUT` seconds (default 120, SIGALRM);
- when it exits with status 2, no library logged an error of its own (that line would reach stderr too).

Mutations: values of every type at any place (wrong types, out-of-range numbers, NaN / inf / huge numbers,
unicode and very long strings, lists and mappings where scalars belong), keys removed, known and unknown keys
added, registered names swapped (objectives, models, data sets), plausible alternative settings, shared
sub-trees (which YAML writes as anchors and aliases), and edits of the YAML text itself (merge keys, a key
given twice, a cut-off file, a byte-order mark, bytes that are not UTF-8).

The packaged recipes are shrunk first (1 epoch, a few labelled images or problems, tiny models, one seed),
and sizes a mutation makes larger than that are brought back (`CAPS`), so that a valid recipe trains in
about a second: a legitimately huge run (a billion epochs) is not a hang.

CI runs `CI_EXAMPLES` examples (derandomized, well under a minute). The long campaign is opt-in:

    DISTILL_FUZZ_EXAMPLES=5000 nice .venv/bin/python -m pytest -q -s -p no:cacheprovider \\
        tests/test_recipe_fuzz.py -k campaign

It records every failure instead of stopping at the first, prints the outcome counts, writes them (and each
failing recipe) to `DISTILL_FUZZ_REPORT` (default: `distill-fuzz-report` in the temporary folder) and fails
at the end if any example broke the property. `DISTILL_FUZZ_SEED` changes the examples. Failures found in
code this test's authors could not change, reported to its owners, are listed in `KNOWN` and counted as
"known" instead of failing the suite. Results: docs/reliability.md, "Recipe fuzzer".
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from distill.cli import main
from distill.recipe.load import builtin_recipe_text
from distill.recipe.schema import MAX_THREADS

CAMPAIGN = int(os.environ.get("DISTILL_FUZZ_EXAMPLES", "0") or 0)
CI_EXAMPLES = 40
TIMEOUT_S = int(os.environ.get("DISTILL_FUZZ_TIMEOUT", "120"))
RECIPE = "fuzz.yaml"

# ------------------------------------------------------------------------------------- base recipes

TINY_TEACHER = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
TINY_STUDENT = {**TINY_TEACHER, "hidden_size": 8, "intermediate_size": 16}


def _common(doc: dict[str, Any]) -> None:
    doc["trainer"].update(epochs=1, threads=1)
    doc["seeds"] = [0]
    doc["evaluation"] = {**doc.get("evaluation", {}), "latency": False}
    doc["output"] = {"dir": "run", "tensorboard": False}


def shrink_vision(doc: dict[str, Any]) -> None:
    doc["data"]["params"]["labelled_per_class"] = 3
    doc["teacher"]["params"]["channels"] = [4, 8]
    doc["teacher"]["train"]["epochs"] = 1
    doc["student"]["params"]["hidden"] = [16]
    doc["trainer"].update(checkpoint_every=0, log_every=10)
    _common(doc)


def shrink_lm(doc: dict[str, Any]) -> None:
    doc["data"]["params"].update(digits=2, train_examples=24, test_examples=4)
    doc["data"]["batch_size"] = 8
    doc["data"]["eval_batch_size"] = 8
    doc["teacher"]["params"]["config"] = dict(TINY_TEACHER)
    doc["student"]["params"]["config"] = dict(TINY_STUDENT)
    doc["teacher"]["train"]["epochs"] = 1
    doc["trainer"].update(eval_every=1, log_every=10)
    for method in doc["methods"]:
        if method.get("source", {}).get("name") == "student_rollouts":
            method["source"]["params"]["max_new_tokens"] = 8
    _common(doc)


BASES: dict[str, Callable[[dict[str, Any]], None]] = {
    "quickstart": shrink_vision,
    "bench_vision_quick_digits": shrink_vision,
    "lm_arithmetic": shrink_lm,
    "lm_gkd": shrink_lm,
}
BASE_WEIGHTS = ["quickstart"] * 4 + ["bench_vision_quick_digits", "lm_arithmetic", "lm_arithmetic", "lm_gkd"]


def base_recipe(name: str) -> dict[str, Any]:
    doc = yaml.safe_load(builtin_recipe_text(name))
    BASES[name](doc)
    return doc


# --------------------------------------------------------------------------------------------- values

INTS = [-(2**63), -1, 0, 1, 2, 3, 7, 2**31, 2**32, 2**63, 2**64, 10**30]
FLOATS = [0.0, -0.0, -1.0, 0.5, 1.0, 1.5, 1e-300, 5e-324, 1e300, -1e300, math.inf, -math.inf, math.nan]
STRINGS = [
    "", " ", "abc", "on", "off", "yes", "no", "null", "~", "true", "1e3", "0x10", "010", "1:20", "NaN",
    ".inf", "-", "*a", "&a", "!!python/object:os.system", "é", "日本語", "\u202e\u200b", "a\nb", "\t",
    "x" * 300, "é" * 200, "💥" * 70, "y" * 5000, "%s%n{0}", "'\"", "../x",
]  # fmt: skip
FIXTURES = (
    "a-file",
    "empty.txt",
    "binary.bin",
    "latin1.txt",
    "train.jsonl",
    "chat.jsonl",
    "nul.txt",
    "subdir",
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTS),
    st.integers(-5, 70),
    st.sampled_from(FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(STRINGS),
    st.text(max_size=12),
    st.sampled_from(FIXTURES),  # relative names of the example's fixture files (inputs a recipe may read)
)
keys = st.one_of(st.sampled_from(STRINGS), st.text(min_size=1, max_size=10), st.sampled_from(INTS[:6]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)

# Keys a recipe knows somewhere (sections, params of data sets, models, objectives, sources): "add" draws
# from these as well as from odd keys.
KNOWN_KEYS = [
    "name", "params", "weight", "warmup_epochs", "objectives", "methods", "source", "teacher", "student",
    "checkpoint", "cache", "train", "epochs", "seed", "lr", "betas", "weight_decay", "momentum", "nesterov",
    "milestones", "gamma", "min_lr_ratio", "grad_accum", "mixed_precision", "max_grad_norm", "threads",
    "device", "fused_loss", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "nonfinite",
    "rule", "latency", "dir", "tensorboard", "batch_size", "eval_batch_size", "task", "description",
    "temperature", "alpha", "beta", "t_start", "t_end", "adaptive", "base", "base_params", "decay",
    "min_ratio", "online", "balance", "swing", "noise_scale", "label_smoothing", "ignore_index",
    "normalized", "standardize", "divergence", "hidden", "dropout", "channels", "labelled_per_class",
    "test_fraction", "split_seed", "max_length", "tokenizer", "digits", "train_examples", "test_examples",
    "config", "path", "dtype", "lora", "layout", "fields", "prompt_tokens", "max_new_tokens", "exact_match",
    "mix", "do_sample", "top_k", "top_p", "fixed_length", "hidden_size", "num_attention_heads",
    "num_hidden_layers", "vocab_size", "model_type", "bpe", "root", "augment",
]  # fmt: skip

# Plausible alternative settings (mostly valid): they make mutated recipes train in other ways.
PLAUSIBLE: dict[tuple[str, ...], list[Any]] = {
    ("optimizer", "name"): ["sgd", "adamw"],
    ("optimizer", "nesterov"): [True],
    ("optimizer", "momentum"): [0.0, 0.99],
    ("optimizer", "betas"): [[0.0, 0.0], [0.5, 0.9]],
    ("optimizer", "weight_decay"): [0.05, 1000.0],
    ("optimizer", "lr"): [1e-6, 1.0, 100.0],
    ("schedule", "name"): ["constant", "step", "cosine"],
    ("schedule", "milestones"): [[0.5], [0.1, 0.2, 5.0]],
    ("schedule", "warmup_epochs"): [0.5, 3.0],
    ("schedule", "min_lr_ratio"): [0.5, 1.0],
    ("trainer", "mixed_precision"): ["bf16", "fp16"],
    ("trainer", "nonfinite"): ["skip"],
    ("trainer", "grad_accum"): [2, 3],
    ("trainer", "max_grad_norm"): [1.0, 1e-9],
    ("trainer", "checkpoint_every"): [1, 3],
    ("trainer", "keep_checkpoints"): [1],
    ("trainer", "eval_every"): [2],
    ("trainer", "fused_loss"): ["on", "off"],
    ("trainer", "device"): ["cpu", "auto"],
    ("evaluation", "rule"): ["best"],
    ("evaluation", "latency"): [True],
    ("data", "batch_size"): [1, 7, 100000],
    ("data", "eval_batch_size"): [1, 3],
    ("seeds",): [[1], [0, 1], [4294967295]],
    ("teacher", "train", "cache"): [False],
    ("data", "params", "test_fraction"): [0.001, 0.999],
    ("data", "params", "labelled_per_class"): [0, 1, 200],
    ("data", "params", "split_seed"): [4294967295, 4294967296],
    ("data", "params", "max_length"): [2, 3, 8],
    ("data", "params", "prompt_tokens"): [0, 1000],
    ("data", "params", "layout"): ["chat", "text", "prompt_completion"],
    ("data", "params", "exact_match"): [True, False],
    ("data", "params", "max_new_tokens"): [1, 2],
    ("data", "params", "fields"): [{"prompt": "completion"}, {"text": "prompt"}],
    ("data", "params", "tokenizer"): [
        {"bpe": {"vocab_size": 1}},
        {"bpe": {"vocab_size": 260, "min_frequency": 0}},
        "subdir",
        "a-file",
        "train.jsonl",
    ],
    ("data",): [
        {"name": "jsonl", "params": {"path": "train.jsonl", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "jsonl", "params": {"path": "chat.jsonl", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "text", "params": {"path": "train.jsonl", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "text", "params": {"path": "nul.txt", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "text", "params": {"path": "binary.bin", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "csv", "params": {"path": "latin1.txt", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "parquet", "params": {"path": "train.jsonl", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "json", "params": {"path": "empty.txt", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "jsonl", "params": {"path": "subdir", "tokenizer": {"bpe": {"vocab_size": 280}}}},
        {"name": "image_folder", "params": {"root": "subdir"}},
        {"name": "digits", "params": {"labelled_per_class": 2}},
    ],
    ("student", "params", "config", "num_key_value_heads"): [3],
    ("student", "params", "config", "vocab_size"): [10, 5000],
    ("student", "params", "config", "tie_word_embeddings"): [True],
    ("student", "params", "config", "max_position_embeddings"): [1, 4],
    ("student", "params", "dtype"): ["bfloat16", "float16"],
    ("teacher", "params", "dtype"): ["bfloat16", "float32"],
    ("student", "params", "lora"): [{"r": 2}, {"r": 0}, {"target_modules": ["nothing"]}],
    ("student", "params", "tokenizer"): ["subdir", "a-file", "missing"],
    ("student", "params", "path"): ["subdir", "a-file"],
    ("student", "checkpoint"): ["binary.bin", "a-file", "subdir", "missing.safetensors"],
    ("teacher", "checkpoint"): ["binary.bin", "empty.txt", "subdir"],
    ("teacher", "cache"): ["subdir", "a-file", "missing"],
    ("source",): [
        {"name": "teacher_generations", "params": {"do_sample": False, "max_new_tokens": 4}},
        {"name": "teacher_generations", "params": {"temperature": 0.0}},
        {"name": "student_rollouts", "params": {"mix": 0.5, "max_new_tokens": 4}},
        {"name": "opsd", "params": {"max_new_tokens": 4}},
        {"name": "soda", "params": {}},
        {"name": "mixsd", "params": {}},
    ],
}
SWAPS: dict[str, list[Any]] = {
    "model_type": ["llama", "gpt2", "qwen2", "mistral", "bert", "t5", "x"],
    "layout": ["auto", "chat", "text", "prompt_completion", "x"],
    "dtype": ["bfloat16", "float16", "float32", "int8"],
    "divergence": ["reverse_kl", "forward_kl", "generalized_jsd", "x"],
    "base": ["forward_kl", "reverse_kl", "x"],
    "mixed_precision": ["no", "bf16", "fp16"],
    "fused_loss": ["auto", "on", "off"],
}
OBJECTIVE_PARAMS: list[dict[str, Any]] = [
    {"temperature": 2.0},
    {"temperature": 1e-3},
    {"temperature": 100.0},
    {"label_smoothing": 0.1},
    {"alpha": 0.5, "beta": 2.0},
    {"beta": 0.5},
    {"beta": 0.0, "normalized": True},
    {"standardize": True},
    {"seed": 3},
    {"t_start": 0.99, "t_end": 1.0},
    {"base": "forward_kl", "base_params": {"temperature": 2.0}},
    {"top_k": 1},
    {"top_k": 1000},
    {"iterations": 1},
    {"epsilon": 1e-9},
    {"divergence": "forward_kl"},
    {"online": True},
    {"forward_weight": 1.0, "entropy_weight": 1.0},
    {"min_k": 0},
    {"entropy_quantile": 1.0},
    {"privacy_scores": [0.5]},
    {"discount": 1.0},
]
VISION_MODELS = ["mlp", "small_cnn", "resnet8", "resnet14", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1"]
DATA_SETS = ["digits", "arithmetic", "facts", "jsonl", "text", "image_folder", "tinyshakespeare", "mnist"]

# Sizes brought back after mutation so that valid recipes stay small: key -> (cap, refused above). A value
# above the cap is set to the cap unless it is above the second number (then the run refuses it, or fails to
# allocate it, at once).
CAPS: dict[str, tuple[int, int | None]] = {
    "epochs": (1, None),
    "labelled_per_class": (200, None),
    "train_examples": (32, 10**7),
    "test_examples": (8, 10**7),
    "digits": (3, 100),
    "threads": (2, MAX_THREADS),
    "num_hidden_layers": (2, None),
    "num_layers": (2, None),
    "hidden_size": (32, 2**40),
    "intermediate_size": (64, 2**40),
    "num_attention_heads": (4, 2**40),
    "num_key_value_heads": (4, 2**40),
    "max_position_embeddings": (128, 2**40),
    "vocab_size": (1024, 2**24),
    "max_new_tokens": (16, 2**20),
    "max_length": (64, 2**40),
    "start": (8, None),
    "limit": (16, None),
}
LIST_CAPS: dict[str, tuple[int, int]] = {"hidden": (64, 2**40), "channels": (16, 2**40)}


# ------------------------------------------------------------------------------------------ mutation


Path_ = tuple[Any, ...]


def walk(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every (path, value) below `node` (each shared sub-tree once per place it appears)."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            yield (*path, key), value
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*path, index), value
            yield from walk(value, (*path, index))


def get(doc: Any, path: Path_) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def put(doc: Any, path: Path_, value: Any) -> None:
    get(doc, path[:-1])[path[-1]] = value


def mutate(doc: dict[str, Any], draw: Callable[..., Any]) -> str:
    """Apply one mutation to `doc` in place; returns its description."""
    places = [p for p, _ in walk(doc)]
    kind = draw(
        st.sampled_from(
            ["replace"] * 4
            + ["delete", "delete", "add", "add", "number", "number", "swap", "swap", "alias"]
            + ["plausible"] * 4
        )
    )
    if kind == "replace" and places:
        path = draw(st.sampled_from(places))
        put(doc, path, draw(values))
        return f"replace {path}"
    if kind == "delete" and places:
        path = draw(st.sampled_from(places))
        parent = get(doc, path[:-1])
        del parent[path[-1]]
        return f"delete {path}"
    if kind == "add":
        mappings = [()] + [p for p, v in walk(doc) if isinstance(v, dict)]
        path = draw(st.sampled_from(mappings))
        key = draw(st.one_of(st.sampled_from(KNOWN_KEYS), keys))
        get(doc, path)[key] = draw(values)
        return f"add {(*path, key)}"
    if kind == "number":
        numbers = [p for p, v in walk(doc) if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers:
            path = draw(st.sampled_from(numbers))
            old = get(doc, path)
            change = draw(
                st.sampled_from(
                    [
                        "neg",
                        "zero",
                        "nan",
                        "inf",
                        "tiny",
                        "huge",
                        "str",
                        "float",
                        "succ",
                        "one",
                        "big",
                        "bool",
                    ]
                )
            )
            new = {
                "neg": -old if old else -1,
                "zero": 0,
                "nan": math.nan,
                "inf": math.inf,
                "tiny": 1e-300,
                "huge": draw(st.sampled_from([2**31, 2**63, 2**64, 1e300])),
                "str": str(old),
                "float": float(old) + 0.5,
                "succ": old + 1,
                "one": 1,
                "big": 10**6,
                "bool": True,
            }[change]
            put(doc, path, new)
            return f"number {path} {change}"
    if kind == "swap":
        swaps = [p for p, v in walk(doc) if p and p[-1] in SWAPS and isinstance(v, str)]
        names = [p for p, v in walk(doc) if p and p[-1] == "name" and isinstance(v, str)]
        if swaps and draw(st.booleans()):
            path = draw(st.sampled_from(swaps))
            put(doc, path, draw(st.sampled_from(SWAPS[path[-1]])))
            return f"swap {path}"
        if names:
            path = draw(st.sampled_from(names))
            from distill.objectives import OBJECTIVES

            if "objectives" in path:
                choices = OBJECTIVES.names()
            elif len(path) == 2 and path[0] in ("student", "teacher"):
                choices = VISION_MODELS + ["hf"] if path[0] == "student" else VISION_MODELS[:5] + ["hf"]
            elif path == ("data", "name"):
                choices = DATA_SETS
            elif "source" in path:
                choices = ["dataset", "teacher_generations", "student_rollouts", "opsd", "soda", "mixsd"]
            else:
                choices = ["adamw", "sgd", "constant", "step", "x"]
            put(doc, path, draw(st.sampled_from(choices)))
            return f"swap {path}"
    if kind == "alias":
        trees = [p for p, v in walk(doc) if isinstance(v, dict | list)]
        if len(trees) >= 2:
            source = draw(st.sampled_from(trees))
            inside = {id(v) for _, v in walk(get(doc, source))} | {id(get(doc, source))}
            targets = [
                p
                for p in places
                if p[: len(source)] != source
                and source[: len(p)] != p
                and id(get(doc, p[:-1])) not in inside  # never a tree inside itself
            ]
            if targets:
                target = draw(st.sampled_from(targets))
                put(doc, target, get(doc, source))  # the same object twice: YAML writes &anchor / *alias
                return f"alias {target} = {source}"
    if kind == "plausible":
        options = [p for p in PLAUSIBLE if _has_parent(doc, p)]
        options += [
            (*p, "source") for p, v in walk(doc) if len(p) == 2 and p[0] == "methods" and isinstance(v, dict)
        ]
        objectives = [p for p, v in walk(doc) if p and p[-1] == "objectives" and isinstance(v, list) and v]
        choice = draw(st.sampled_from(options + ["objective"] if objectives else options or ["none"]))
        if choice == "objective":
            path = (*draw(st.sampled_from(objectives)), 0)
            if isinstance(get(doc, path), dict):
                get(doc, path)["params"] = dict(draw(st.sampled_from(OBJECTIVE_PARAMS)))
            return f"plausible {path}.params"
        if choice != "none":
            table = PLAUSIBLE[("source",)] if choice[-1] == "source" else PLAUSIBLE[choice]
            put(doc, choice, copy.deepcopy(draw(st.sampled_from(table))))
            return f"plausible {choice}"
    return "none"


def _has_parent(doc: dict[str, Any], path: Path_) -> bool:
    try:
        return isinstance(get(doc, path[:-1]), dict)
    except (KeyError, IndexError, TypeError):
        return False


def _number(value: Any) -> float | None:
    """What the recipe loader (YAML 1.2: `1e3` is a number) and pydantic's lax mode would read as a whole
    number, if anything."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip(), 0)
        with contextlib.suppress(ValueError):
            number = float(value.strip())
            return number if math.isfinite(number) and number.is_integer() else None
    return None


def keep_small(doc: Any) -> None:
    """Bring sizes a mutation raised back to `CAPS`; keep the run folder a relative, harmless name."""
    for _, node in list(walk({"root": doc})):
        if not isinstance(node, dict):
            continue
        for key, value in list(node.items()):
            if key in CAPS:
                cap, refused = CAPS[key]
                number = _number(value)
                if number is not None and number > cap and (refused is None or number <= refused):
                    node[key] = cap
            if key in LIST_CAPS and isinstance(value, list):
                cap, refused = LIST_CAPS[key]
                node[key] = [
                    cap if (n := _number(v)) is not None and cap < n <= refused else v for v in value
                ]
            if key == "seeds" and isinstance(value, list) and len(value) > 2:
                node[key] = value[:2]
    output = doc.get("output") if isinstance(doc, dict) else None
    if isinstance(output, dict) and isinstance(output.get("dir"), str):
        folder = output["dir"]
        if folder.startswith(("/", "~", "\\")) or ".." in folder or "\0" in folder:
            output["dir"] = "run"


def yaml_text(doc: Any, draw: Callable[..., Any]) -> tuple[bytes, str]:
    """The recipe's file, sometimes with an edit of the YAML text itself."""
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    edit = draw(st.sampled_from(["none"] * 12 + ["merge", "twice", "cut", "bom", "latin1", "tab", "flow"]))
    if edit == "merge" and "\ntrainer:\n" in text:
        text = text.replace("\ntrainer:\n", "\ntrainer:\n  <<: {threads: 1, epochs: 1}\n", 1)
    elif edit == "twice":
        text += "seeds: [0]\n"
    elif edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "tab":
        text = text.replace("\n  ", "\n\t", 1)
    elif edit == "flow":
        text = text.replace("\n", " {\n", 1)
    data = text.encode("utf-8")
    if edit == "latin1":
        data = data.replace(b"name:", b"name: \xe9", 1)
    return data, edit


# ---------------------------------------------------------------------------------------- one example


# Loggers that write to stderr on their own (the libraries' handlers do not propagate to the root logger).
LOGGERS = ("", "datasets", "transformers", "huggingface_hub", "accelerate", "torch")


class LoggedErrors(logging.Handler):
    """Log records of level ERROR and above during an example: each would be a line on the user's stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


class Hang(BaseException):
    """Raised by SIGALRM: the example ran past its time (not an Exception, so no code swallows it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def write_fixtures(folder: Path) -> None:
    """Files a mutated recipe may name as its inputs: each broken in its own way, one valid."""
    (folder / "a-file").write_text("x")
    (folder / "empty.txt").write_text("")
    (folder / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (folder / "latin1.txt").write_bytes("café crème 12+34=46\n".encode("latin-1") * 20)
    (folder / "nul.txt").write_bytes(b"text\0text\n" * 20)
    rows = [{"prompt": f"{i}+{i}=", "completion": f" {2 * i}"} for i in range(20)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "chat.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    (folder / "subdir").mkdir()


def snapshot(folder: Path, skip: set[Path]) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        found[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() else None
    return found


def hf_datasets_cache() -> set[str]:
    import datasets.config

    root = Path(datasets.config.HF_DATASETS_CACHE)
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _parsed(data: bytes) -> Any:
    """The recipe file as the CLI reads it, or None when it does not parse."""
    from distill.errors import UserError
    from distill.recipe.load import parse_yaml

    try:
        return parse_yaml(data.decode("utf-8"), RECIPE)
    except (UserError, UnicodeDecodeError):
        return None


def run_example(folder: Path, data: bytes, doc: Any) -> tuple[str, str]:
    """Run `distill run` on the recipe in `folder`; returns (outcome, detail). Outcomes: trained, refused,
    stopped (exit 2 after the run folder appeared, e.g. a loss that became NaN), and the failures traceback,
    bad-error (exit 2 without exactly one `error:` line), bad-exit, no-report, hang, wrote-outside."""
    recipe = folder / RECIPE
    recipe.write_bytes(data)
    run_folders = {folder / "runs"}
    for document in (doc, _parsed(data)):  # an edit of the YAML text (a cut) may change output.dir
        output = document.get("output") if isinstance(document, dict) else None
        out_dir = output.get("dir") if isinstance(output, dict) else None
        if isinstance(out_dir, str):
            run_folders.add((folder / out_dir) if out_dir not in ("", ".") else folder)
    before = snapshot(folder, run_folders)
    hf_before = hf_datasets_cache()
    err, out = io.StringIO(), io.StringIO()
    code: int | str = 0
    old_cwd = os.getcwd()
    os.chdir(folder)
    logged = LoggedErrors()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(logged)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    sys.argv = ["distill", "run", RECIPE, "--no-progress"]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else str(stop.code))
    except Hang:
        return "hang", f"no end after {TIMEOUT_S} s"
    except Exception as error:  # the property's whole point: nothing but SystemExit leaves main()
        frames = traceback.extract_tb(error.__traceback__)
        ours = [f for f in frames if "/distill/" in f.filename] or frames
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        return "traceback", f"{type(error).__name__} at {where}: {str(error)[:300]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(logged)
        os.chdir(old_cwd)
        torch.set_num_threads(1)  # a recipe's trainer.threads stays with the process
    lines = err.getvalue().strip().splitlines()
    if snapshot(folder, run_folders) != before:
        return "wrote-outside", "the working folder changed outside the run folder"
    if hf_datasets_cache() != hf_before:
        return "wrote-outside", "Hugging Face's datasets cache changed"
    if code == 0:
        if not any(folder.rglob("report.md")):
            return "no-report", "exit 0 without a report"
        return "trained", ""
    if code != 2:
        return "bad-exit", f"exit {code!r}: {err.getvalue()[-300:]}"
    if "Traceback" in err.getvalue() or len(lines) != 1 or not lines[0].startswith("error: "):
        return "bad-error", err.getvalue()[-500:]
    if logged.messages:  # a library's own error line on stderr, besides ours
        return "bad-error", f"logged besides the error line: {logged.messages[0][:200]}"
    if len(lines[0]) > 1000:
        line = lines[0]
        return "bad-error", f"an error line of {len(line)} characters: {line[:150]} ... {line[-100:]}"
    marks = (".distill-run.json", ".distill-run.lock")
    started = any(p.name in marks for root in run_folders if root.is_dir() for p in root.rglob("*"))
    return ("stopped" if started else "refused"), lines[0][:300]


FAILURES = {"traceback", "bad-error", "bad-exit", "no-report", "hang", "wrote-outside"}
# Failures found by the fuzzer in files outside this work's reach, reported to their owners: counted as
# "known" (and listed in the campaign's summary) instead of failing the suite. Remove an entry once fixed.
# Each pattern reads "<outcome>: <detail>".
# Failures found in code the fuzzer's authors could not change, counted apart until fixed (none left open).
KNOWN: dict[str, re.Pattern[str]] = {}


class Campaign:
    """Outcome counts; in the long campaign, failing recipes are kept instead of stopping the run."""

    def __init__(self, keep_going: bool, report: Path | None) -> None:
        self.keep_going = keep_going
        self.report = report
        self.counts: Counter[str] = Counter()
        self.by_base: Counter[tuple[str, str]] = Counter()
        self.messages: Counter[str] = Counter()
        self.known: Counter[str] = Counter()
        self.stopped: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def record(
        self, base: str, mutations: list[str], edit: str, data: bytes, outcome: str, detail: str
    ) -> None:
        known = next((name for name, p in KNOWN.items() if p.search(f"{outcome}: {detail}")), None)
        if outcome in FAILURES and known is not None:
            outcome = "known"
            self.known[known] += 1
        self.counts[outcome] += 1
        self.by_base[(base, outcome)] += 1
        if outcome in ("refused", "stopped"):
            # the message without the recipe's path, to see which checks refuse what
            self.messages[f"{outcome}: " + detail.split(f"{RECIPE}: ", 1)[-1][:90]] += 1
        if outcome == "stopped":  # refused after its run folder appeared: worth a look, each one
            self.stopped.append({"base": base, "mutations": mutations, "detail": detail})
        if outcome not in FAILURES:
            return
        entry = {
            "base": base,
            "mutations": mutations,
            "yaml_edit": edit,
            "outcome": outcome,
            "detail": detail,
        }
        self.failures.append(entry)
        if self.report is not None:
            self.report.mkdir(parents=True, exist_ok=True)
            (self.report / f"failure-{len(self.failures):04d}.yaml").write_bytes(data)
        if not self.keep_going:
            raise AssertionError(f"{outcome}: {detail}\nmutations: {mutations} (yaml edit: {edit})")

    def summary(self) -> dict[str, Any]:
        return {
            "generated": sum(self.counts.values()),
            "counts": dict(self.counts),
            "by_base": {f"{b} {o}": n for (b, o), n in sorted(self.by_base.items())},
            "wall_seconds": round(time.perf_counter() - self.started, 1),
            "known": dict(self.known),
            "stopped": self.stopped,
            "failures": self.failures,
            "top_messages": dict(self.messages.most_common(60)),
        }


def fuzz(campaign: Campaign, workdir: Path) -> Callable[..., None]:
    @given(data=st.data())
    def one_recipe(data: st.DataObject) -> None:
        base = data.draw(st.sampled_from(BASE_WEIGHTS), label="base")
        doc = base_recipe(base)
        if len(doc.get("methods", [])) > 1:  # one or two of the recipe's methods
            chosen = data.draw(
                st.lists(st.sampled_from(range(len(doc["methods"]))), min_size=1, max_size=2, unique=True)
            )
            doc["methods"] = [doc["methods"][i] for i in sorted(chosen)]
        count = data.draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]), label="mutations")
        mutations = [mutate(doc, data.draw) for _ in range(count)]
        keep_small(doc)
        text, edit = yaml_text(doc, data.draw)
        with tempfile.TemporaryDirectory(dir=workdir) as name:
            folder = Path(name)
            write_fixtures(folder)
            outcome, detail = run_example(folder, text, doc)
        campaign.record(base, mutations, edit, text, outcome, detail)

    return one_recipe


SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def test_recipe_fuzzer(tmp_path: Path) -> None:
    """The CI profile: a few dozen derandomized examples; every one must keep the property."""
    campaign = Campaign(keep_going=False, report=None)
    run = settings(max_examples=CI_EXAMPLES, deadline=None, suppress_health_check=SUPPRESS, database=None)(
        fuzz(campaign, tmp_path)
    )
    run()
    summary = campaign.summary()
    print(json.dumps({k: summary[k] for k in ("generated", "counts", "wall_seconds")}))
    assert campaign.counts["trained"] >= 1, summary  # the fuzzer must reach training, not only validation


@pytest.mark.slow
@pytest.mark.skipif(not CAMPAIGN, reason="the long campaign runs with DISTILL_FUZZ_EXAMPLES=N")
def test_recipe_fuzzer_campaign(tmp_path: Path) -> None:
    default = Path(tempfile.gettempdir()) / "distill-fuzz-report"
    report = Path(os.environ.get("DISTILL_FUZZ_REPORT", default)).absolute()
    campaign = Campaign(keep_going=True, report=report)
    run = settings(
        max_examples=CAMPAIGN,
        deadline=None,
        suppress_health_check=SUPPRESS,
        database=None,
        derandomize=False,
    )(fuzz(campaign, tmp_path))
    run = hypothesis_seed(int(os.environ.get("DISTILL_FUZZ_SEED", "0")))(run)
    try:
        run()
    finally:
        summary = campaign.summary()
        report.mkdir(parents=True, exist_ok=True)
        (report / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2, ensure_ascii=False))
        for failure in campaign.failures:
            print(json.dumps(failure, ensure_ascii=False))
    assert not campaign.failures, f"{len(campaign.failures)} failing recipes: see {report}"
