"""`distill predict` and `distill eval`: a student from a finished run (its verified checkpoint) or from an
export folder (its files checked against `distill_export.json`), applied to image files, texts to classify or
text prompts, or evaluated with its task's own metrics on the recipe's held-out split or another data set.

A text classifier's labels are matched by name: another data set or table is evaluated with the student's own
tokenizer, and its labels are renumbered as the student's (a label the student does not know is refused)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import UserError, clipped, shown
from distill.export import MARKER, MARKER_FORMAT
from distill.export_student import (
    CAUSAL_LM,
    TEXT,
    FinishedRun,
    Student,
    choose_student,
    find_method,
    load_run_student,
    open_finished_run,
    quiet_transformers,
    read_json,
    read_recipe,
)
from distill.io import sha256_file
from distill.recipe.schema import Recipe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LM_FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Loaded:
    """One student ready to use, with its recipe and a label for tables."""

    student: Student
    recipe: Recipe
    label: str
    method: str


def is_export(path: Path) -> bool:
    return (path / MARKER).is_file()


def verify_export(path: Path) -> dict[str, Any]:
    """An export folder's marker, every file it lists checked against its sha256."""
    document = read_json(path / MARKER)
    sums = document.get("sha256") if isinstance(document, dict) else None
    if not isinstance(sums, dict) or document.get("format") != MARKER_FORMAT:
        raise UserError(f"{path / MARKER}: not an export distill wrote")
    for name, digest in sums.items():
        file = path / name
        inside = isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts
        if not inside or not file.is_file():
            raise UserError(f"export {path}: {clipped(str(name))} is missing")
        if sha256_file(file) != digest:
            raise UserError(f"export {path}: {name} fails its checksum (damaged or edited)")
    return document


def load_export(path: Path) -> Loaded:
    document = verify_export(path)
    recipe = read_recipe(path / "recipe.yaml")
    label = f"{document.get('method')} seed {document.get('seed')}"
    if document.get("weights") == "onnx":
        raise UserError(
            f"export {path} holds an ONNX graph: run it with onnxruntime (its README.md shows how)"
        )
    if document.get("task") == CAUSAL_LM:
        from distill.data.tokenizers import load_tokenizer
        from distill.models.causal_lm import build_causal_lm

        tokenizer = load_tokenizer(path)
        with quiet_transformers():
            model = build_causal_lm(path=path).eval()
        data = None  # built on demand (`evaluation_data`) with this tokenizer
        return Loaded(
            Student(model, CAUSAL_LM, data, tokenizer=tokenizer), recipe, label, str(document["method"])
        )
    if document.get("task") == TEXT:
        student = load_text_export(path, str(document.get("weights")))
        return Loaded(student, recipe, label, str(document["method"]))
    from safetensors.torch import load_file

    from distill.export_student import load_weights_into
    from distill.models import build_model

    spec = read_json(path / "model.json")
    model = build_model(
        spec["architecture"],
        num_classes=spec["num_classes"],
        input_shape=tuple(spec["input_shape"]),
        **spec["params"],
    )
    load_weights_into(model, load_file(str(path / "model.safetensors")), str(path))
    student = Student(model.eval(), str(document.get("task")), None, spec=spec)
    return Loaded(student, recipe, label, str(document["method"]))


def load_text_export(path: Path, weights: str) -> Student:
    """A text classifier from its export: `hf` (encoder folder + head) or `safetensors` (one state dict)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from distill.data.tokenizers import load_tokenizer
    from distill.export_student import load_weights_into
    from distill.models.encoders import EncoderClassifier

    spec = read_json(path / ("head.json" if weights == "hf" else "model.json"))
    with quiet_transformers():
        if weights == "hf":
            encoder = AutoModel.from_pretrained(str(path))
        else:
            encoder = AutoModel.from_config(AutoConfig.for_model(**spec["encoder_config"]))
    model = EncoderClassifier(encoder, spec["num_classes"], pooling=spec["pooling"], pad_id=spec["pad_id"])
    if weights == "hf":
        load_weights_into(model.head, load_file(str(path / "head.safetensors")), str(path))
    else:
        load_weights_into(model, load_file(str(path / "model.safetensors")), str(path))
    return Student(model.eval(), TEXT, None, tokenizer=load_tokenizer(path), spec=spec)


def run_students(run: FinishedRun, method: str | None, seed: int | None, every: bool) -> list[Loaded]:
    """The students of a run: with `every`, all seeds of the method named (or of every method); else the
    one `distill export` would choose."""
    if not every:
        choice = choose_student(run, method, seed)
        student = load_run_student(run, choice)
        return [Loaded(student, run.recipe, f"{choice.method.name} seed {choice.seed}", choice.method.name)]
    methods = [find_method(run, method)] if method is not None else run.recipe.method_list()
    loaded: list[Loaded] = []
    for spec in methods:
        for s in [seed] if seed is not None else run.recipe.seeds:
            choice = choose_student(run, spec.name, s)
            student = load_run_student(run, choice, loaded[0].student.data if loaded else None)
            loaded.append(Loaded(student, run.recipe, f"{spec.name} seed {s}", spec.name))
    return loaded


def load_students(path: Path, method: str | None, seed: int | None, *, every: bool = False) -> list[Loaded]:
    if is_export(path):
        if method is not None or seed is not None:
            raise UserError(f"{path} is an export of one student: --method and --seed are for run folders")
        return [load_export(path)]
    return run_students(open_finished_run(path), method, seed, every)


# ------------------------------------------------------------------------------------------------ predict


def _is_image_file(text: str) -> bool:
    return Path(text).suffix.lower() in IMAGE_SUFFIXES and Path(text).is_file()


def image_batch(spec: dict[str, Any], inputs: list[str]) -> torch.Tensor:
    """Image files as the classifier's normalised input batch (resized and centre-cropped as in training)."""
    from distill.data.image_io import decode_images

    channels, *size = spec["input_shape"]
    if channels not in (1, 3) or len(size) != 2:
        raise UserError(f"this student takes inputs of shape {spec['input_shape']}, not images")
    if not spec.get("preprocessing"):
        raise UserError(
            "this student's data set records no image normalisation; predict cannot read images for it"
        )
    for text in inputs:
        if not _is_image_file(text):
            why = "no such file" if not Path(text).exists() else ", ".join(IMAGE_SUFFIXES)
            raise UserError(
                f"predict: {shown(text)} is not an image file ({why}); this student classifies images"
            )
    pixels = decode_images([Path(t) for t in inputs], channels=channels, size=tuple(size))
    mean = torch.tensor(spec["preprocessing"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["preprocessing"]["std"]).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def text_batch(student: Student, texts: list[str]) -> torch.Tensor:
    """Texts as the classifier's input: token ids of the run's tokenizer, cut to its maximum length and
    right-padded with its pad id, as the training data was."""
    spec = student.spec or {}
    for text in texts:
        if not text.strip():
            raise UserError("predict: an empty text; give the texts to classify")
    encoded = student.tokenizer(
        texts, padding=True, truncation=True, max_length=spec.get("max_length"), return_tensors="pt"
    )
    ids = encoded["input_ids"].long()
    return ids.masked_fill(encoded["attention_mask"] == 0, int(spec.get("pad_id", 0)))


@torch.inference_mode()
def classify(loaded: Loaded, inputs: list[str], top_k: int) -> list[list[tuple[str, float]]]:
    spec = loaded.student.spec or {}
    text = loaded.student.task == TEXT
    batch = text_batch(loaded.student, inputs) if text else image_batch(spec, inputs)
    probs = torch.softmax(loaded.student.model(batch).float(), -1)
    names = spec.get("class_names") or [str(i) for i in range(probs.shape[-1])]
    best = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(names[int(i)], float(p)) for p, i in zip(values, indices, strict=True)]
        for values, indices in zip(best.values, best.indices, strict=True)
    ]


def continue_prompts(loaded: Loaded, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, each prompt tokenised as the training data was (BOS first)."""
    from distill.sources.generations import generate

    tokenizer = loaded.student.tokenizer
    for prompt in prompts:
        if _is_image_file(prompt):
            raise UserError(
                f"predict: {shown(prompt)} is an image file; this student is a language model: "
                "give text prompts"
            )
        if not prompt.strip():
            raise UserError("predict: an empty prompt; give the text to continue")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    bos = tokenizer.bos_token_id
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    ids = [i if bos is None or i[:1] == [bos] else [bos, *i] for i in ids]
    completions = generate(loaded.student.model, tokenizer, ids, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(c, skip_special_tokens=True) for c in completions]


# ------------------------------------------------------------------------------------------------ eval


def _registered(name: str) -> bool:
    from distill.data.base import DATASETS

    return name in DATASETS.names()


def evaluation_data(loaded: Loaded, data: str | None) -> Any:
    """The data set to evaluate on: the recipe's, a registered name, or a file / folder (all of it)."""
    recipe, student = loaded.recipe, loaded.student
    if student.task == CAUSAL_LM:
        if data is None or _registered(data):
            return _lm_data(recipe, student, data)
        path = Path(data)
        kind = LM_FILE_KINDS.get(path.suffix.lower())
        if not path.is_file() or kind is None:
            raise UserError(_unknown_data(data, f"a {'/'.join(LM_FILE_KINDS)} file"))
        return _lm_data(recipe, student, kind, path=str(path), test_path=str(path))
    if student.task == TEXT:
        return _text_data(loaded, data)
    if data is None and student.data is not None:
        return student.data
    if data is None or _registered(data):
        from distill.data import build_data

        name = data or recipe.data.name
        return build_data(name, **(recipe.data.params if name == recipe.data.name else {}))
    if not Path(data).is_dir():
        raise UserError(_unknown_data(data, "a folder of <class>/ image folders"))
    return _image_folder(student.spec or {}, Path(data))


def _unknown_data(data: str, what: str) -> str:
    return f"--data {shown(data)}: neither a registered data set nor {what}"


def _lm_data(recipe: Recipe, student: Student, name: str | None, **params: Any) -> Any:
    """Language-model data tokenised with the student's own tokenizer. A file (`params`: its path) keeps the
    recipe's layout settings; a registered name other than the recipe's gets its defaults."""
    if name is None and student.data is not None:
        return student.data
    from distill.data import build_data
    from distill.data.text import LMData

    name = name or recipe.data.name
    base = dict(recipe.data.params) if name == recipe.data.name else {}
    if params:
        base = {k: v for k, v in recipe.data.params.items() if k in ("max_length", "layout", "fields")}
    data = build_data(name, **{**base, **params, "tokenizer": student.tokenizer})
    if not isinstance(data, LMData):
        raise UserError(f"--data {name}: not a language-model data set")
    return data


@dataclass
class _TextTable:
    test: Any
    num_classes: int
    label_names: tuple[str, ...]
    description: str


def _text_data(loaded: Loaded, data: str | None) -> Any:
    """A text classifier's evaluation data: the run's held-out split, a registered text data set (its test
    split), or a csv / tsv / jsonl / parquet table (all of it, tokenised with the student's tokenizer)."""
    from distill.data import build_data
    from distill.data.text_classification import TABLE_FORMATS, TokenDataset, read_table, tokenize_texts

    recipe, student = loaded.recipe, loaded.student
    if data is None and student.data is not None:
        return student.data
    params = dict(recipe.data.params)
    if data is None or _registered(data):
        name = data or recipe.data.name
        if name != recipe.data.name:  # its own defaults, read with the run's tokenizer
            params = {"tokenizer": params["tokenizer"]} if "tokenizer" in params else {}
        built = build_data(name, **params)
        if not hasattr(built, "label_names"):
            raise UserError(f"--data {name}: not a text classification data set")
        return built
    path = Path(data)
    if not path.is_file() or path.suffix.lower().lstrip(".") not in TABLE_FORMATS:
        raise UserError(_unknown_data(data, f"a {'/'.join(TABLE_FORMATS)} table of texts and labels"))
    same = recipe.data.name == "text_table"
    texts, labels = read_table(
        str(path),
        None,
        params.get("text_column", "text") if same else "text",
        params.get("label_column", "label") if same else "label",
    )
    spec = student.spec or {}
    ids = tokenize_texts(student.tokenizer, texts, int(spec.get("max_length", 128)))
    number = {label: i for i, label in enumerate(sorted(set(labels)))}
    dataset = TokenDataset(ids, torch.tensor([number[y] for y in labels]), int(spec.get("pad_id", 0)))
    return _TextTable(dataset, len(number), tuple(sorted(number)), f"{path}: {len(texts)} texts")


def _student_labels(loaded: Loaded, data: Any, labels: torch.Tensor) -> torch.Tensor:
    """The data's label numbers as the student's (matched by name); one line for a label it does not know."""
    names = list((loaded.student.spec or {}).get("label_names") or [])
    theirs = list(getattr(data, "label_names", ()) or [])
    if not names or not theirs or theirs == names:
        return labels
    unknown = [n for n in theirs if n not in names]
    if unknown:
        raise UserError(
            f"the data's label {shown(unknown[0])} is not one of the student's labels ({', '.join(names)})"
        )
    return torch.tensor([names.index(n) for n in theirs])[labels]


@dataclass
class _Folder:
    test: Any
    num_classes: int
    input_shape: tuple[int, ...]


def _image_folder(spec: dict[str, Any], root: Path) -> _Folder:
    """Every image under `root/<class>/`, labelled by the student's class names (else sorted folder names)."""
    from torch.utils.data import TensorDataset

    from distill.data.folders import list_images

    names = spec.get("class_names")
    if names:
        folders = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        strange = sorted(set(folders) - set(names))
        if strange:
            raise UserError(
                f"--data {root}: class folder {shown(strange[0])} is not one of the student's classes"
            )
    files, labels, names = list_images(root, names)
    batch = image_batch(spec, [str(f) for f in files])
    return _Folder(TensorDataset(batch, torch.as_tensor(labels)), len(names), tuple(batch.shape[1:]))


@torch.inference_mode()
def evaluate(loaded: Loaded, data: Any, batch_size: int) -> dict[str, float]:
    """The task's own metrics: `classification_metrics` on the test split, or the LM evaluator's."""
    model: nn.Module = loaded.student.model
    if loaded.student.task == CAUSAL_LM:
        from distill.tasks.causal_lm import check_context
        from distill.tasks.causal_lm_eval import LMEvaluator

        check_context(
            model, data, "student"
        )  # sequences longer than its positions: one line, not an index error
        return LMEvaluator(data, batch_size=batch_size)(model)
    from torch.utils.data import DataLoader

    from distill.metrics import classification_metrics

    spec = loaded.student.spec or {}
    if loaded.student.task == TEXT:
        logits, labels = [], []
        for x, y in DataLoader(data.test, batch_size=batch_size):
            logits.append(model(x).float())
            labels.append(_student_labels(loaded, data, y))
        return classification_metrics(torch.cat(logits), torch.cat(labels))
    shape = list(getattr(data, "input_shape", ()))
    if spec.get("input_shape") is not None and shape != list(spec["input_shape"]):
        raise UserError(f"the data's inputs have shape {shape}, the student takes {spec['input_shape']}")
    if spec.get("num_classes") is not None and data.num_classes > spec["num_classes"]:
        raise UserError(
            f"the data has {data.num_classes} classes, the student predicts {spec['num_classes']}"
        )
    logits, labels = [], []
    for x, y in DataLoader(data.test, batch_size=batch_size):
        logits.append(model(x).float())
        labels.append(y)
    return classification_metrics(torch.cat(logits), torch.cat(labels))
