"""The run's side of a teacher cache (`teacher: {cache: DIR}`): opening it with every identity check, and
what `distill cache` makes one from (`CacheSource`, which each task prepares)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from distill.cache.store import TeacherCache
from distill.errors import UserError
from distill.io import fingerprint
from distill.recipe.schema import Recipe
from distill.tasks.results import TeacherInfo
from distill.tasks.teacher_store import teacher_spec_identity


@dataclass
class CacheSource:
    """What a cache is made from and checked against: the training set, the teacher, identities."""

    train: Dataset
    teacher: nn.Module | None
    teacher_info: TeacherInfo | None
    kind: str  # "classification" | "lm"
    vocab: int
    data: str  # fingerprint of the training samples
    tokenizer: str | None


def dataset_fingerprint(dataset: Dataset) -> str:
    """A hash of every training sample (token ids and counted positions, or tensors and labels)."""
    digest = hashlib.sha256()
    examples = getattr(dataset, "examples", None)
    if examples is not None:  # language-model examples
        for example in examples:
            digest.update(torch.tensor(example.ids, dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(example.targets, dtype=torch.bool).numpy().tobytes())
        return digest.hexdigest()[:16]
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:  # a TensorDataset: hash the tensors whole
        for tensor in tensors:
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
    for index in range(len(dataset)):  # type: ignore[arg-type]
        for part in dataset[index]:
            digest.update(torch.as_tensor(part).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def refuse_augmented(dataset: Dataset) -> None:
    if getattr(dataset, "augment", False):
        raise UserError(
            "the training data is augmented (random crops / flips): a cache holds one view per sample, "
            "which is not the view the student sees; set the data's augment: false or use the live teacher"
        )


def open_recipe_cache(recipe: Recipe, *, data: str, vocab: int, tokenizer: str | None = None) -> TeacherCache:
    """The recipe's `teacher.cache`, checked against this run's data, vocabulary and tokenizer, and verified
    whole (manifest, every shard's sha256 and shapes) now: the task prepares it before the run folder is
    made, so a damaged cache is refused in one line with nothing written."""
    assert recipe.teacher is not None and recipe.teacher.cache is not None
    cache = TeacherCache(recipe.teacher.cache)
    cache.check(data=data, vocab=vocab, tokenizer=tokenizer)
    made_by = str(cache.manifest.get("teacher", "")).split("-")[0]
    # A named teacher too: the cache must be that teacher's.
    if recipe.teacher.name is not None and made_by != fingerprint(teacher_spec_identity(recipe.teacher)):
        raise UserError(
            f"teacher cache {cache.folder} was made by another teacher than the recipe's "
            f"'{recipe.teacher.name}'; make the cache again or drop teacher.name"
        )
    return cache.verify()


def cache_teacher_info(cache: TeacherCache) -> TeacherInfo:
    return TeacherInfo(
        "offline",
        int(cache.manifest.get("teacher_parameters", 0)),
        cache.manifest.get("teacher_metrics", {}),
        0.0,
        [],
    )
