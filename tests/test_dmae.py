"""S38 DMAE (`distill.objectives.dmae`): the feature distance and the reconstruction loss against float64
maths (and transformers' own MAE loss), the same patches for teacher and student, the teacher stopped at its
block, gradients into the projector, and the quick benchmark."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from bench_helpers import run_benchmark
from data_helpers import require_dataset
from distill.errors import UserError
from distill.objectives import OBJECTIVES, Progress, StepOutputs, build_objective
from distill.objectives.dmae import (
    DMAE,
    OFFICIAL_STUDENT_LAYER,
    OFFICIAL_TEACHER_LAYER,
    MAEMasking,
    MAEReconstruction,
    depth_layer,
    removed_patches,
    restore_mae_positions,
    visible_patch_ids,
)
from distill.objectives.features import FeatureObjective
from distill.teachers import FrozenTeacher, TeacherRequest
from distill.train import Trainer, TrainerConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def vit(
    hidden: int, layers: int, *, mask_ratio: float = 0.75, seed: int = 0, **extra: object
) -> ViTMAEForPreTraining:
    """A tiny ViT-MAE: 8x8 one-channel images, 2x2 patches (16 patches; 4 visible at mask 0.75)."""
    torch.manual_seed(seed)
    config = ViTMAEConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        decoder_hidden_size=8,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=16,
        mask_ratio=mask_ratio,
        **extra,
    )
    return ViTMAEForPreTraining(config)


def images(n: int = 6, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.zeros(n, dtype=torch.long)]


def built_dmae(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], **params: object) -> DMAE:
    objective = build_objective("dmae", params)
    assert isinstance(objective, DMAE)
    objective.bind_layers(["s"], ["t"])
    objective.build([torch.Size(student_shape)], [torch.Size(teacher_shape)], n_data=1)
    return objective


def step(student: Tensor, teacher: Tensor) -> StepOutputs:
    return StepOutputs(torch.zeros(1), student_features={"s": student}, teacher_features={"t": teacher})


# ------------------------------------------------------------------------------------------ the maths


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("normalize", [True, False])
def test_feature_distance_equals_float64_reference(distance: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 6, generator=g)
    objective = built_dmae(student.shape, teacher.shape, distance=distance, normalize=normalize)
    value = objective(step(student, teacher))

    head = objective.projectors[0]
    projected = student.double() @ head.weight.double().T + head.bias.double()
    target = teacher.double()
    if normalize:
        projected = projected / projected.norm(dim=-1, keepdim=True)
        target = target / target.norm(dim=-1, keepdim=True)
    diff = projected - target
    expected = diff.abs().mean() if distance == "l1" else diff.square().mean()
    assert value.dtype == torch.float32
    assert abs(value.item() - expected.item()) < 1e-6
    # The official expression, `nn.L1Loss()(F.normalize(teacher), F.normalize(head(student)))`, in float64.
    if normalize and distance == "l1":
        official = nn.L1Loss()(
            nn.functional.normalize(teacher.double(), dim=-1),
            nn.functional.normalize(head.double()(student.double()), dim=-1),
        )
        assert abs(value.item() - official.item()) < 1e-6


def test_feature_maps_are_read_as_tokens_and_layer_pairs_add_up() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    objective = built_dmae(student.shape, teacher.shape)
    tokens = built_dmae((2, 16, 3), (2, 16, 5))
    tokens.load_state_dict(objective.state_dict())
    as_map = objective(step(student, teacher))
    as_tokens = tokens(step(student.flatten(2).transpose(1, 2), teacher.flatten(2).transpose(1, 2)))
    assert torch.allclose(as_map, as_tokens, atol=1e-7)

    pair = build_objective("dmae", {"student_layer": ["a", "b"], "teacher_layer": ["c", "d"]})
    pair.bind_layers(["a", "b"], ["c", "d"])
    pair.build([torch.Size((2, 16, 3))] * 2, [torch.Size((2, 16, 5))] * 2, n_data=1)
    pair.projectors[1].load_state_dict(pair.projectors[0].state_dict())
    s, t = student.flatten(2).transpose(1, 2), teacher.flatten(2).transpose(1, 2)
    both = pair(
        StepOutputs(torch.zeros(1), student_features={"a": s, "b": s}, teacher_features={"c": t, "d": t})
    )
    tokens.projectors[0].load_state_dict(pair.projectors[0].state_dict())
    assert torch.allclose(both, 2 * tokens(step(s, t)), atol=1e-7)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_equals_transformers_loss_and_float64(norm_pix_loss: bool) -> None:
    student = vit(16, 2, norm_pix_loss=norm_pix_loss)
    batch = MAEMasking()(images(), student, Progress(0, 1, 0.0))
    out = student(**batch["inputs"])
    assert torch.equal(batch["mask"], out.mask.bool())
    value = build_objective("mae_reconstruction")(
        StepOutputs(out.logits, labels=batch["labels"], mask=batch["mask"])
    )
    assert abs(value.item() - out.loss.item()) < 1e-6

    target = student.patchify(batch["inputs"]["pixel_values"]).double()
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (out.logits.double() - target).square().mean(-1)
    expected = (per_patch * out.mask.double()).sum() / out.mask.double().sum()
    assert abs(value.item() - expected.item()) < 1e-6


def test_reconstruction_refuses_batches_without_patch_targets() -> None:
    objective = MAEReconstruction()
    with pytest.raises(UserError, match="MAEMasking"):
        objective(StepOutputs(torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 0])))


# ------------------------------------------------------------------------------------------ same patches


def embedding_outputs(model: ViTMAEForPreTraining, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The mask and ids_restore that the model's embeddings drew."""
    seen: list[tuple[Tensor, Tensor]] = []
    hook = model.vit.embeddings.register_forward_hook(lambda _m, _i, out: seen.append((out[1], out[2])))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen[0]


def test_teacher_and_student_keep_the_same_patches() -> None:
    student, teacher = vit(16, 2, seed=0), vit(24, 4, seed=1)
    batch = MAEMasking(teacher=teacher)(images(), student, Progress(0, 1, 0.0))
    student_mask, student_restore = embedding_outputs(student, batch["inputs"])
    teacher_mask, teacher_restore = embedding_outputs(teacher, batch["inputs"])
    assert torch.equal(student_mask, teacher_mask) and torch.equal(student_restore, teacher_restore)
    assert torch.equal(student_mask.bool(), batch["mask"])
    assert torch.equal(batch["mask"], removed_patches(batch["inputs"]["noise"], 0.75))
    assert int((~batch["mask"]).sum(1).unique().item()) == 4  # int(16 * 0.25) visible patches each

    # The visible tokens are the same patches in the same order: the patch embeddings of the kept ids.
    kept = visible_patch_ids(batch["inputs"]["noise"], 0.75)
    for model in (student, teacher):
        tokens: list[Tensor] = []
        hook = model.vit.embeddings.register_forward_hook(lambda _m, _i, out, t=tokens: t.append(out[0]))
        with torch.no_grad():
            model(**batch["inputs"])
            every = model.vit.embeddings.patch_embeddings(batch["inputs"]["pixel_values"])
            every = every + model.vit.embeddings.position_embeddings[:, 1:]
        hook.remove()
        gathered = torch.gather(every, 1, kept.unsqueeze(-1).expand(-1, -1, every.shape[-1]))
        assert torch.allclose(tokens[0][:, 1:], gathered, atol=1e-6)


def test_masking_refuses_a_teacher_with_another_mask_ratio() -> None:
    student, teacher = vit(16, 2, mask_ratio=0.75), vit(24, 4, mask_ratio=0.5)
    with pytest.raises(UserError, match="keep different patches"):
        MAEMasking(teacher=teacher)(images(), student, Progress(0, 1, 0.0))
    with pytest.raises(UserError, match="nothing to reconstruct"):
        MAEMasking()(images(), vit(16, 2, mask_ratio=0.0), Progress(0, 1, 0.0))


# ------------------------------------------------------------------------------------------ partial teacher


def counting(model: ViTMAEForPreTraining) -> Counter[str]:
    """Forward calls of each encoder block and of the decoder, counted by hooks."""
    calls: Counter[str] = Counter()
    for i, block in enumerate(model.vit.layers):
        block.register_forward_hook(lambda *_a, name=f"block{i}": calls.update([name]))
    model.decoder.register_forward_hook(lambda *_a: calls.update(["decoder"]))
    return calls


def test_teacher_stops_at_the_requested_layer() -> None:
    teacher = vit(24, 4)
    calls = counting(teacher)
    frozen = FrozenTeacher(teacher)
    frozen.attach("cpu", nullcontext, ["vit.layers.1"])
    frozen.skip_logits()
    batch = MAEMasking()(images(), teacher, Progress(0, 1, 0.0))
    out = frozen.outputs(TeacherRequest(batch["inputs"]))
    assert out.logits is None and out.features["vit.layers.1"].shape == (6, 5, 24)
    assert calls == Counter({"block0": 1, "block1": 1})  # blocks 2, 3 and the decoder never ran
    frozen.detach()


def dmae_trainer(student: ViTMAEForPreTraining, teacher: ViTMAEForPreTraining, **params: object) -> Trainer:
    data = torch.utils.data.TensorDataset(*images(8))
    layers = {"student_layer": depth_layer(student), "teacher_layer": "vit.layers.1"}
    return Trainer(
        student,
        data,
        teacher=teacher,
        objectives=[("mae_reconstruction", 1.0), ("dmae", 1.0, layers | params)],
        batch_transform=MAEMasking(teacher=teacher),
        config=TrainerConfig(epochs=1, batch_size=4, device="cpu", progress=False, tensorboard=False),
    )


@pytest.mark.parametrize("partial", [True, False])
def test_trainer_runs_the_teacher_partially_unless_asked(partial: bool) -> None:
    student, teacher = vit(16, 2), vit(24, 4, seed=1)
    calls = counting(teacher)
    result = dmae_trainer(student, teacher, partial_teacher=partial).fit()
    runs = result.steps + 1  # the probe that builds the projector is one more forward
    if partial:
        assert calls == Counter({"block0": runs, "block1": runs})
    else:  # the full-teacher baseline: every block and the decoder, every step
        assert calls == Counter({f"block{i}": runs for i in range(4)} | {"decoder": runs})


# ------------------------------------------------------------------------------------------ gradients


def test_projector_gets_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    objective = built_dmae((2, 5, 4), (2, 5, 6))
    objective(step(student, torch.randn(2, 5, 6, generator=g))).backward()
    head = objective.projectors[0]
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert head.bias.grad is not None and student.grad is not None and student.grad.abs().sum() > 0


def test_projector_and_student_train_under_the_trainer() -> None:
    student, teacher = vit(16, 2), vit(24, 4, seed=1)
    trainer = dmae_trainer(student, teacher)
    projector = trainer.objectives[1].projectors[0]
    assert projector.in_features == 16 and projector.out_features == 24
    before = projector.weight.detach().clone(), student.vit.layers[0].mlp.fc1.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before[0], projector.weight)
    assert not torch.equal(before[1], student.vit.layers[0].mlp.fc1.weight)


def test_position_tables_are_restored_after_a_config_build() -> None:
    model = vit(16, 2)
    restore_mae_positions(model)
    encoder, decoder = model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed
    assert encoder.abs().sum() > 0 and decoder.abs().sum() > 0 and model.decoder.mask_token.abs().sum() > 0
    assert torch.equal(encoder[0, 0], torch.zeros(16))  # the CLS row stays zero
    # The 4x4 grid's rows: transformers' layout [sin_w | cos_w | sin_h | cos_h], frequencies 10000^(-k/4).
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    h, w = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    eh, ew = h.flatten().double().outer(omega), w.flatten().double().outer(omega)
    expected = torch.cat([ew.sin(), ew.cos(), eh.sin(), eh.cos()], dim=1)
    assert torch.allclose(encoder[0, 1:].double(), expected, atol=1e-6)
    assert not decoder.requires_grad and not encoder.requires_grad


# ------------------------------------------------------------------------------------------ registry


def test_registration_defaults_and_parameters() -> None:
    assert OBJECTIVES.entry("dmae").extra.get("kind") == "feature"
    assert isinstance(build_objective("dmae"), FeatureObjective)
    assert OBJECTIVES.entry("mae_reconstruction").extra.get("kind") != "feature"
    assert OBJECTIVES.entry("mae_reconstruction").extra.get("classification") is False
    assert build_objective("dmae", {"partial_teacher": False}).needs_teacher_logits
    assert not build_objective("dmae").needs_teacher_logits
    for bad in ({"distance": "cosine"}, {"projector": "conv"}, {"normalize": 1}, {"student_layer": []}):
        with pytest.raises(UserError):
            build_objective("dmae", bad)
    with pytest.raises(UserError, match="did you mean 'distance'"):
        build_objective("dmae", {"distanse": "l1"})
    # 3/4 of the depth: the official ViT-B (12 blocks) and ViT-L (24 blocks) layers.
    for blocks, official in ((12, OFFICIAL_STUDENT_LAYER), (24, OFFICIAL_TEACHER_LAYER)):
        model = nn.Module()
        model.vit = nn.Module()
        model.vit.layers = nn.ModuleList([nn.Identity() for _ in range(blocks)])
        assert depth_layer(model, 0.75) == official


# ------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path: Path) -> None:
    require_dataset("fashion_mnist")
    out = tmp_path / "dmae_quick.md"
    assert run_benchmark("dmae", ["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in (
        "## Students",
        "## DMAE against the mask ratio",
        "## Teacher compute per step",
        "## Verdict",
    ):
        assert heading in text
    assert "(c) full-teacher feature KD" in text and "blocks run" in text
