"""Teachers a run trains itself, cached by content in `$DISTILL_CACHE`, and weights loaded from files.

A teacher without a checkpoint is trained with cross-entropy on the task's teacher split, then stored (weights
+ manifest with a checksum) under a key of its spec and the data spec; the next run with the same key loads
it. A damaged entry (a manifest that is not JSON or has no checksum, a missing file, a failed checksum) is
moved to a `.damaged-<time>` sibling with one warning line, and the teacher trained again."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import UserError
from distill.io import atomic_write_json, cache_root, load_tensors, save_tensors, sha256_file
from distill.models import count_parameters
from distill.recipe.schema import Recipe, ScheduleSpec, TeacherSpec
from distill.runfolder import RunFolder
from distill.tasks.results import TeacherInfo
from distill.train import OptimizerConfig, ScheduleConfig, fit
from distill.train.logs import warn

__all__ = ["cache_root", "fit_or_load_teacher", "load_weights"]


def optimizer_config(spec: Any) -> OptimizerConfig:
    return OptimizerConfig(
        name=spec.name,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        betas=tuple(spec.betas),
        decay_biases_and_norms=spec.decay_biases_and_norms,
    )


def schedule_config(spec: ScheduleSpec, steps_per_epoch: int) -> ScheduleConfig:
    """Epoch-based recipe settings in optimizer steps."""
    return ScheduleConfig(
        name=spec.name,
        warmup_steps=round(spec.warmup_epochs * steps_per_epoch),
        min_lr_ratio=spec.min_lr_ratio,
        milestones=[round(m * steps_per_epoch) for m in spec.milestones],
        gamma=spec.gamma,
    )


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: every process takes its share of the batches (`EpochSampler`)."""
    per_process = math.ceil(examples / max(1, world_size))
    batches = math.ceil(per_process / batch_size)
    return math.ceil(batches / grad_accum)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_weights(model: nn.Module, path: Path, role: str) -> None:
    """safetensors weights into `model`, every shape checked; one line for a file that does not fit."""
    if not path.exists():
        raise UserError(f"{role}.checkpoint not found: {path}")
    try:
        tensors = load_tensors(path)
    except Exception as err:  # safetensors raises several types for a bad file
        raise UserError(f"{role}.checkpoint {path} is not a safetensors file ({err})") from err
    own = model.state_dict()
    for key, tensor in tensors.items():
        if key in own and own[key].shape != tensor.shape:
            raise UserError(
                f"{role}.checkpoint {path} does not fit the {role} model: "
                f"'{key}' has shape {tuple(tensor.shape)}, "
                f"the model {tuple(own[key].shape)} (another class count or architecture?)"
            )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{role}.checkpoint {path} does not fit the {role} model "
            f"(missing {len(missing)} tensors, e.g. {missing[:1]}; unexpected {len(unexpected)})"
        )


def teacher_spec_identity(spec: TeacherSpec) -> dict[str, Any]:
    """The teacher spec's fields that decide its weights (not where caches live)."""
    return spec.model_dump(mode="json", exclude={"cache": True, "train": {"cache"}})


def fit_or_load_teacher(
    teacher: nn.Module,
    recipe: Recipe,
    train_set: Any,
    cached: Path,
    folder: RunFolder,
    progress: bool,
    *,
    load: Callable[[nn.Module, Path], None],
    run_name: str = "teacher",
    **evaluation: Any,
) -> TeacherInfo:
    """Load the teacher's weights from the run cache folder `cached` (when the recipe caches and the
    checksum holds) or train it with cross-entropy and cache it. `evaluation`: `fit` settings for its
    evaluation (an evaluation set, or a language model's evaluator). It trains in the run folder's
    `run_name` (each member of an ensemble in its own)."""
    spec: TeacherSpec = recipe.teacher  # type: ignore[assignment]
    hit = _teacher_cache_entry(cached) if spec.train.cache else None
    if isinstance(hit, str):  # a damaged entry: set aside (never used, never deleted), the teacher retrained
        _set_aside(cached, hit)
        hit = None
    if hit is not None:
        weights, manifest = hit
        load(teacher, weights)
        return TeacherInfo(
            "cache",
            count_parameters(teacher),
            manifest["metrics"],
            manifest["train_seconds"],
            manifest.get("history", []),
        )
    batch = recipe.data.batch_size
    folder.claim()  # the teacher's checkpoints go into the run folder
    result = fit(
        teacher,
        train_set,
        objectives=["cross_entropy"],
        optimizer=optimizer_config(spec.train.optimizer),
        schedule=schedule_config(
            spec.train.schedule, steps_per_epoch(len(train_set), batch, 1, world_size())
        ),
        run_dir=folder.path / run_name,
        epochs=spec.train.epochs,
        batch_size=batch,
        seed=spec.train.seed,
        progress=progress,
        tensorboard=False,
        device=recipe.trainer.device,
        label=run_name,
        **evaluation,
    )
    info = TeacherInfo(
        "trained", count_parameters(teacher), result.final, result.train_seconds, result.history
    )
    if spec.train.cache:
        write_teacher_cache(cached, teacher, info, spec)
    return info


def read_teacher_cache(cached: Path) -> tuple[Path, dict[str, Any]] | None:
    """The cached teacher's weights file and manifest, when both are there, well-formed, and the checksum
    holds; None otherwise (a miss: the teacher is trained again)."""
    entry = _teacher_cache_entry(cached)
    return entry if isinstance(entry, tuple) else None


def _teacher_cache_entry(cached: Path) -> tuple[Path, dict[str, Any]] | str | None:
    """(weights, manifest) for a good entry; what is wrong with a damaged one; None when there is none."""
    manifest_path, weights = cached / "manifest.json", cached / "model.safetensors"
    if not cached.exists() and not cached.is_symlink():
        return None
    if not cached.is_dir():
        return "is not a folder"
    if not manifest_path.is_file():
        return "has no manifest.json"
    if not weights.is_file():
        return "has no model.safetensors"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "has a manifest.json that is not JSON"
    if not isinstance(manifest, dict):
        return "has a manifest.json that is not a JSON object"
    digest = manifest.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return "has a manifest without the weights' sha256"
    if not isinstance(manifest.get("metrics"), dict) or not isinstance(
        manifest.get("train_seconds"), int | float
    ):
        return "has a manifest without the teacher's metrics"
    if not isinstance(manifest.get("history", []), list):
        return "has a manifest with a malformed history"
    if sha256_file(weights) != digest:
        return "fails its checksum (model.safetensors changed or damaged)"
    return weights, manifest


def _set_aside(cached: Path, reason: str) -> None:
    """Move a damaged entry to a `.damaged-<time>` sibling (kept for inspection) with one warning line."""
    if int(os.environ.get("RANK", "0")) != 0:  # several processes found it: rank 0 moves it and says so
        return
    stamp = f"{cached.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, number = cached.with_name(stamp), 1
    while aside.exists() or aside.is_symlink():
        aside, number = cached.with_name(f"{stamp}-{number}"), number + 1
    try:
        os.rename(cached, aside)
        moved = f"set aside as {aside.name}"
    except OSError as err:  # another run moved it first, or the cache is read-only: train anyway
        moved = f"could not set it aside ({err.strerror or err})"
    warn(f"cached teacher {cached} {reason}: {moved}; training the teacher again")


def write_teacher_cache(cached: Path, teacher: nn.Module, info: TeacherInfo, spec: TeacherSpec) -> None:
    """Weights + manifest (checksum, metrics, spec), staged under a private name and renamed into place."""
    if int(os.environ.get("RANK", "0")) != 0:  # several processes trained the same teacher: rank 0 stores it
        return
    staging = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_tensors(staging / "model.safetensors", teacher.state_dict())
    atomic_write_json(
        staging / "manifest.json",
        {
            "sha256": sha256_file(staging / "model.safetensors"),
            "metrics": info.metrics,
            "train_seconds": info.train_seconds,
            "history": info.history,
            "spec": spec.model_dump(mode="json"),
        },
    )
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(staging, cached)
