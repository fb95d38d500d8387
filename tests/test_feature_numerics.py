"""Numerics sweep of the feature objectives: each one built the way the trainer builds it (layers from real
models' feature taps, projectors from one probe), then fed features that break naive maths — all zeros
(zero norms in AT / SP / PKT / RKD normalisations), identical student and teacher (zero distances), huge
magnitudes (1e4) — in float32, bf16 and fp16. Value and gradient must stay finite."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import Tensor

from distill.models import build_model
from distill.models.hooks import FeatureHooks
from distill.objectives import OBJECTIVES, StepOutputs, build_objective
from distill.objectives.features import is_feature_objective
from distill.teachers import FrozenTeacher
from distill.train.feature_taps import bind_feature_objectives, probe_and_build

FEATURE_OBJECTIVES = [n for n in OBJECTIVES.names() if is_feature_objective(n)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCENARIOS = ("plain", "zeros", "equal", "huge")
BATCH = 4


# Objectives that read a text encoder's blocks or attention: swept on a tiny encoder pair (fresh BERTs).
ENCODER_ONLY = {"tinybert_hidden", "tinybert_attention", "minilm_attention", "minilm_relations"}
ENCODER_ONLY |= {"attribution_guidance"}
ENCODER_PARAMS = {"minilm_attention": {"relation_heads": 2}, "minilm_relations": {"relation_heads": 2}}
ENCODER_PARAMS |= {"tinybert_attention": {"relation_heads": 2}}
MASK_TAP = "token_mask"
# Objectives that read a dual_head student's two heads and the teacher's logits (S06 DHO).
DUAL_HEAD = {"dho"}


def tiny_encoder(hidden: int, layers: int) -> torch.nn.Module:
    config = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": 2}
    config |= {"intermediate_size": 2 * hidden, "vocab_size": 64}
    return build_model("hf_encoder", num_classes=3, input_shape=(6,), config=config)


def models_for(name: str) -> tuple[torch.nn.Module, torch.nn.Module, Tensor]:
    """Student, teacher and a batch of inputs: small CNNs, or tiny encoders for encoder-only objectives."""
    if name in ENCODER_ONLY:
        ids = torch.randint(1, 64, (BATCH, 6))
        ids[1:, 4:] = 0  # padded texts
        return tiny_encoder(16, 2), tiny_encoder(24, 4), ids
    student = build_model("small_cnn", num_classes=3, input_shape=(1, 8, 8), channels=[4, 8, 8])
    if name in DUAL_HEAD:  # the same network with a second head
        base = {"name": "small_cnn", "params": {"channels": [4, 8, 8]}}
        student = build_model("dual_head", num_classes=3, input_shape=(1, 8, 8), base=base)
    channels = [4, 8, 8] if name == "fsp" else [6, 12, 12]  # FSP compares flows of equal widths
    teacher = build_model("small_cnn", num_classes=3, input_shape=(1, 8, 8), channels=channels)
    return student, teacher, torch.randn(BATCH, 1, 8, 8)


def built(name: str) -> tuple[Any, list[torch.Size], list[torch.Size], dict[str, Tensor]]:
    """The objective bound to a small student / teacher pair's feature taps and built from one probe; with
    the shapes of the features it reads and the padding masks it saw (kept as they are in the sweep)."""
    torch.manual_seed(0)
    student, teacher_model, inputs = models_for(name)
    params = {"negatives": 3} if name == "crd" else ENCODER_PARAMS.get(name, {})
    objective = build_objective(name, params)
    bind_feature_objectives([objective], [name], student, teacher_model)
    teacher = FrozenTeacher(teacher_model)
    teacher.attach("cpu", nullcontext, objective.teacher_layers)
    batch = (inputs, torch.zeros(BATCH, dtype=torch.long))
    probe_and_build([objective], student, teacher, batch, lambda v: v, n_data=10)
    teacher.detach()
    with (
        FeatureHooks(student, objective.student_layers) as s,
        FeatureHooks(teacher_model, objective.teacher_layers) as t,
    ):
        student.eval()(batch[0])
        teacher_model(batch[0])
        masks = {p: f for p, f in {**s.features, **t.features}.items() if p == MASK_TAP}
        return (
            objective,
            [s.features[p].shape for p in objective.student_layers],
            [t.features[p].shape for p in objective.teacher_layers],
            masks,
        )


def features(shapes: list[torch.Size], scenario: str, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=g)
        if scenario == "zeros":
            x = torch.zeros(shape)
        elif scenario == "huge":
            x = 1e4 * x
        out.append(x)
    return out


@pytest.mark.parametrize("name", FEATURE_OBJECTIVES)
def test_feature_objective_stays_finite(name: str) -> None:
    objective, student_shapes, teacher_shapes, masks = built(name)
    problems = []
    for dtype in DTYPES:
        for scenario in SCENARIOS:
            students = features(student_shapes, scenario, 1)
            teachers = features(teacher_shapes, scenario, 2)
            if scenario == "equal" and student_shapes == teacher_shapes:
                teachers = [s.clone() for s in students]
            leaves = [s.to(dtype).requires_grad_(True) for s in students]
            student_features = dict(zip(objective.student_layers, leaves, strict=True))
            teacher_features = {
                p: t.to(dtype) for p, t in zip(objective.teacher_layers, teachers, strict=True)
            }
            logits = features([torch.Size([BATCH, 3])], scenario, 3)[0].to(dtype)
            labels = torch.tensor([0, -100, 2, 1])  # one hidden label (semi-supervised)
            step = StepOutputs(
                torch.zeros(BATCH, 3),
                teacher_logits=logits if name in DUAL_HEAD else None,
                labels=labels if name in DUAL_HEAD else None,
                student_features={**student_features, **masks},  # padding masks stay masks
                teacher_features={**teacher_features, **masks},
                index=torch.arange(BATCH),
            )
            value = objective(step)
            if not torch.isfinite(value):
                problems.append(f"{str(dtype)[6:]} {scenario}: value {value.item()}")
                continue
            value.backward()
            for leaf in leaves:
                if leaf.grad is not None and not torch.isfinite(leaf.grad).all():
                    if dtype == torch.float16 and scenario == "huge":
                        continue  # fp16 gradients of 1e4-scale features overflow: GradScaler skips such steps
                    problems.append(f"{str(dtype)[6:]} {scenario}: non-finite gradient")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_every_feature_objective_is_swept() -> None:
    assert set(FEATURE_OBJECTIVES) >= {"fitnet", "attention_transfer", "similarity_preserving", "pkt", "rkd"}
