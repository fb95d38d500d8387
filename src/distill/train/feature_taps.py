"""Feature objectives meet the models: their layer refs resolved to module paths, and one dry forward pass
that probes the shapes their projectors are built from (`distill.objectives.features`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.errors import UserError
from distill.heads import call_model
from distill.models.cifar import feature_layers_of
from distill.models.hooks import FeatureHooks, resolve_module
from distill.objectives.features import STAGES, FeatureObjective, LayerRef
from distill.teachers import Teacher, TeacherRequest
from distill.train.batches import split_batch


def resolve_layers(
    refs: Sequence[LayerRef] | str,
    model: nn.Module | None,
    role: str,
    objective: str,
) -> list[str]:
    """Module paths of `refs` in `model`: paths are checked (nearest valid path on a typo), indices index
    the model's feature taps, "stages" names the taps between stem and pooled vector."""
    where = f"objective '{objective}': {role}"
    taps = feature_layers_of(model) if model is not None else []
    if (refs == STAGES or any(isinstance(r, int) for r in refs)) and not taps:
        name = type(model).__name__ if model is not None else "a cached teacher"
        raise UserError(f"{where} layers: {name} names no feature taps; give module paths (e.g. 'layer3')")
    if refs == STAGES:
        if len(taps) < 3:
            raise UserError(f"{where} layers: its taps {taps} hold no stage between stem and pooled vector")
        return taps[1:-1]
    paths = []
    for ref in refs:
        if isinstance(ref, int):
            if not -len(taps) <= ref < len(taps):
                raise UserError(
                    f"{where} tap index {ref} is out of range: the model has {len(taps)} taps {taps}"
                )
            paths.append(taps[ref])
        else:
            if model is not None:
                try:
                    resolve_module(model, ref)
                except UserError as err:
                    raise UserError(f"{where}: {err}") from None
            paths.append(ref)
    return paths


def bind_feature_objectives(
    objectives: Sequence[Any], names: Sequence[str], student: nn.Module, teacher: nn.Module | None
) -> None:
    """Resolve every feature objective's layers against the (unwrapped) student and the teacher model."""
    for name, objective in zip(names, objectives, strict=True):
        if not isinstance(objective, FeatureObjective):
            continue
        custom = objective.resolve_paths(student, teacher)
        if custom is not None:  # an objective that knows the architecture (encoder blocks, attention)
            objective.bind_layers(*custom)
            continue
        student_paths = resolve_layers(objective.student_refs, student, "student", name)
        teacher_paths = resolve_layers(objective.teacher_refs, teacher, "teacher", name)
        if objective.student_refs == STAGES and objective.teacher_refs == STAGES:  # pair the deepest stages
            depth = min(len(student_paths), len(teacher_paths))
            student_paths, teacher_paths = student_paths[-depth:], teacher_paths[-depth:]
        objective.bind_layers(student_paths, teacher_paths)


def sample_batch(loader: DataLoader, size: int = 2) -> Any:
    """The first `size` training samples as one batch, drawn without touching the loader's order or any
    random stream (a resumed run probes again and must continue exactly)."""
    dataset = loader.dataset
    count = min(size, len(dataset))  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        return loader.collate_fn([dataset[i] for i in range(count)])


@torch.no_grad()
def probe_and_build(
    objectives: Sequence[Any],
    student: nn.Module,
    teacher: Teacher | None,
    batch: Any,
    move: Any,
    n_data: int,
) -> None:
    """One dry forward pass of both models on `batch` (eval mode, no gradients, random streams untouched);
    each feature objective builds its projectors from the shapes it saw."""
    features = [o for o in objectives if isinstance(o, FeatureObjective) and not o.built]
    if not features:
        return
    inputs, _, mask = (move(v) for v in split_batch(batch))
    index = batch.get("index") if isinstance(batch, dict) else None
    paths = sorted({p for o in features for p in o.student_layers})
    was_training = student.training
    student.eval()
    try:
        with torch.random.fork_rng(devices=[]), FeatureHooks(student, paths) as hooks:
            call_model(student, inputs)
            student_out = dict(hooks.features)
            teacher_out = (
                teacher.outputs(TeacherRequest(inputs, index, mask)).features if teacher is not None else {}
            )
    finally:
        student.train(was_training)
    for objective in features:
        missing = [p for p in objective.teacher_layers if p not in teacher_out]
        if missing:
            raise UserError(
                f"objective '{objective.loss_name}': the teacher gave no output at '{missing[0]}'"
            )
        objective.build(
            [student_out[p].shape for p in objective.student_layers],
            [teacher_out[p].shape for p in objective.teacher_layers],
            n_data,
        )


@torch.no_grad()
def teacher_pass(
    objectives: Sequence[Any], teacher: Teacher | None, dataset: Any, collate: Any, move: Any, batch_size: int
) -> None:
    """One pass of the teacher over the training set, in file order, for the objectives that fit teacher
    statistics before training (`FeatureObjective.wants_teacher_pass`). Random streams are untouched (a
    resumed run makes the same pass and continues exactly); a cached teacher that holds no features gives
    the objectives nothing to observe, and they fall back on their own way."""
    wanting = [o for o in objectives if isinstance(o, FeatureObjective) and o.wants_teacher_pass()]
    if not wanting or teacher is None:
        return
    with torch.random.fork_rng(devices=[]):
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            inputs, labels, mask = (move(v) for v in split_batch(batch))
            index = batch.get("index") if isinstance(batch, dict) else None
            outputs = teacher.outputs(TeacherRequest(inputs, index, mask))
            if not outputs.features:
                return
            for objective in wanting:
                objective.observe_teacher(outputs.features, outputs.logits, labels)
    for objective in wanting:
        objective.finish_teacher_pass()
