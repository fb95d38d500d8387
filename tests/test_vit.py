"""The zoo's ViT (`distill.models.vit`): built from transformers' ViTForImageClassification, its feature taps,
feature objectives on its patch tokens (TRG, FitNets, RKD), a recipe end to end, and the quick benchmark."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset
from transformers import (
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from bench_helpers import run_benchmark
from data_helpers import require_dataset
from distill.errors import UserError
from distill.models import MODELS, build_model, count_parameters
from distill.models.cifar import feature_layers_of
from distill.models.hooks import FeatureHooks
from distill.models.vit import PRESETS, ViTClassifier, transformers_vit_taps
from distill.objectives import build_objective
from distill.train import OptimizerConfig, Trainer, TrainerConfig, fit
from distill.train.feature_taps import bind_feature_objectives

SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def tiny(shape: tuple[int, ...] = (1, 28, 28), **params: object) -> ViTClassifier:
    sizes = {"patch_size": 7 if shape[1] == 28 else 8, "hidden": 16, "depth": 2, "heads": 2} | params
    torch.manual_seed(0)
    return build_model("vit", num_classes=10, input_shape=shape, **sizes)


@pytest.mark.parametrize("data", sorted(SHAPES))
@pytest.mark.parametrize("patch", [4, None])
def test_builds_and_gives_logits_and_token_taps(data: str, patch: int | None) -> None:
    shape = SHAPES[data]
    patch = patch or (7 if data == "fashion_mnist" else 8)
    model = tiny(shape, patch_size=patch, hidden=24, depth=3, heads=4)
    x = torch.randn(5, *shape)
    tokens = 1 + (shape[1] // patch) * (shape[2] // patch)
    taps = feature_layers_of(model)
    assert taps == ["vit.embeddings", "vit.layers.0", "vit.layers.1", "vit.layers.2", "pooled"]
    with FeatureHooks(model, taps) as hooks:
        logits = model(x)
        shapes = {path: tuple(hooks.features[path].shape) for path in taps}
    assert logits.shape == (5, 10)
    assert shapes == {**{p: (5, tokens, 24) for p in taps[:-1]}, "pooled": (5, 24)}


@settings(max_examples=12, deadline=None)
@given(
    channels=st.sampled_from([1, 3]),
    grid=st.integers(1, 4),
    patch=st.sampled_from([2, 4, 7]),
    heads=st.integers(1, 3),
    head_width=st.sampled_from([4, 8]),
    depth=st.integers(1, 3),
)
def test_every_tap_has_one_token_per_patch_plus_cls(
    channels: int, grid: int, patch: int, heads: int, head_width: int, depth: int
) -> None:
    shape = (channels, grid * patch, grid * patch)
    hidden = heads * head_width
    model = build_model(
        "vit", num_classes=3, input_shape=shape, patch_size=patch, hidden=hidden, depth=depth, heads=heads
    )
    taps = feature_layers_of(model)
    assert len(taps) == depth + 2
    with FeatureHooks(model, taps) as hooks:
        assert model(torch.randn(2, *shape)).shape == (2, 3)
        for path in taps[:-1]:
            assert hooks.features[path].shape == (2, 1 + grid * grid, hidden)
        assert hooks.features[taps[-1]].shape == (2, hidden)


def test_equals_transformers_vit_for_image_classification() -> None:
    """The same weights give the same logits as transformers' own class, both ways."""
    model = tiny(hidden=32, depth=2, heads=4).eval()
    x = torch.randn(3, 1, 28, 28)
    reference = model.as_transformers().eval()
    assert isinstance(reference, ViTForImageClassification)
    assert torch.equal(reference(x).logits, model(x))
    config = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
    )  # fmt: skip
    torch.manual_seed(1)
    other = ViTForImageClassification(config).eval()
    model.load_state_dict(other.state_dict())  # a transformers checkpoint's keys are the zoo model's
    assert torch.equal(other(x).logits, model(x))


def test_presets_and_parameters() -> None:
    assert {"vit", *PRESETS} <= set(MODELS.names())
    student = build_model("vit_tiny", num_classes=10, input_shape=(1, 28, 28), patch_size=7)
    teacher = build_model("vit_small", num_classes=10, input_shape=(1, 28, 28), patch_size=7)
    assert (student.depth, student.config.hidden_size) == (3, 64)
    assert (teacher.depth, teacher.config.hidden_size, teacher.config.num_attention_heads) == (6, 128, 4)
    assert count_parameters(teacher) > 7 * count_parameters(student)
    deeper = build_model("vit_tiny", num_classes=3, input_shape=(3, 32, 32), depth=4, dropout=0.1)
    assert deeper.depth == 4 and deeper.config.hidden_dropout_prob == 0.1


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"patch_size": 5}, "patch_size 5 does not divide the 28x28 images"),
        ({"hidden": 30, "heads": 4}, r"hidden \(30\) must be a multiple of heads \(4\)"),
        ({"depth": 0}, "depth must be a positive whole number"),
        ({"heads": 2.0}, "heads must be a positive whole number"),
        ({"dropout": 1.5}, "dropout must be a number in"),
        ({"patch": 4}, "did you mean 'patch_size'"),
    ],
)
def test_bad_parameters_are_one_line(params: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        build_model("vit", num_classes=10, input_shape=(1, 28, 28), **params)


def test_refuses_inputs_that_are_not_images() -> None:
    with pytest.raises(UserError, match=r"reads images \(C, H, W\)"):
        build_model("vit", num_classes=10, input_shape=(64,))


def test_transformers_vits_have_taps_too() -> None:
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=16, num_labels=3,
    )  # fmt: skip
    blocks = ["vit.layers.0", "vit.layers.1", "vit.layers.2"]
    assert feature_layers_of(ViTForImageClassification(config)) == [
        "vit.embeddings",
        *blocks,
        "vit.layernorm",
    ]
    mae = ViTMAEForPreTraining(
        ViTMAEConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=16, decoder_hidden_size=8,
            decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=16,
        )
    )  # fmt: skip
    assert feature_layers_of(mae) == ["vit.embeddings", "vit.layers.0", "vit.layers.1", "vit.layernorm"]
    assert transformers_vit_taps(mae.vit) == ["embeddings", "layers.0", "layers.1", "layernorm"]
    assert transformers_vit_taps(torch.nn.Linear(2, 2)) == []


def test_feature_objectives_bind_to_vit_tokens_by_tap_index() -> None:
    student, teacher = tiny(hidden=16, depth=2), tiny(hidden=32, depth=4, heads=4)
    names = ["trg", "fitnet", "rkd"]
    objectives = [build_objective(name, {}) for name in names]
    bind_feature_objectives(objectives, names, student, teacher)
    trg, fitnet, rkd = objectives
    assert (trg.student_layers, trg.teacher_layers) == (("vit.layers.1",), ("vit.layers.3",))
    assert (fitnet.student_layers, fitnet.teacher_layers) == (("vit.layers.0",), ("vit.layers.2",))
    assert (rkd.student_layers, rkd.teacher_layers) == (("pooled",), ("pooled",))
    with pytest.raises(UserError, match="did you mean 'vit.layers.1'"):
        bind_feature_objectives(
            [build_objective("trg", {"student_layer": "vit.layer.1"})], ["trg"], student, teacher
        )


def _data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=generator), torch.arange(n) % 10)


def test_trg_on_vit_tokens_trains_its_projector_and_the_student() -> None:
    student, teacher = tiny(hidden=16, depth=2), tiny(hidden=32, depth=4, heads=4)
    objectives = [("cross_entropy", 0.1), ("hinton_kd", 0.9, {"temperature": 4.0})]
    run = Trainer(
        student,
        _data(),
        teacher=teacher,
        objectives=[*objectives, ("trg", 1.0, {"tokens_per_sample": 8})],
        optimizer=OptimizerConfig(name="adamw", lr=1e-3),
        config=TrainerConfig(epochs=1, batch_size=8, device="cpu", progress=False, tensorboard=False),
    )
    trg = run.objectives[2]
    assert isinstance(trg.projector, torch.nn.Linear) and trg.projector.weight.shape == (32, 16)
    own = trg.projector.weight.detach().clone()
    blocks = student.vit.layers[1].mlp.fc2.weight.detach().clone()
    result = run.fit()
    assert result.completed and result.steps == 4 and math.isfinite(result.history[-1]["train_loss"])
    assert not torch.equal(own, trg.projector.weight) and not torch.equal(
        blocks, student.vit.layers[1].mlp.fc2.weight
    )


def test_a_teacher_read_only_at_a_block_stops_there() -> None:
    """TRG without KD: the teacher's forward ends after the block TRG reads (no final LayerNorm, no head)."""
    student, teacher = tiny(hidden=16, depth=2), tiny(hidden=32, depth=4, heads=4)
    ran: list[str] = []
    for name in ("vit.layers.2", "vit.layers.3", "vit.layernorm", "classifier"):
        teacher.get_submodule(name).register_forward_hook(lambda *_, name=name: ran.append(name))
    trg = {"teacher_layer": "vit.layers.2", "tokens_per_sample": 4}
    fit(
        student,
        _data(16),
        teacher=teacher,
        objectives=[("cross_entropy", 1.0), ("trg", 1.0, trg)],
        epochs=1,
        batch_size=8,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    assert "vit.layers.2" in ran and not {"vit.layers.3", "vit.layernorm", "classifier"} & set(ran)


def _recipe(tmp_path: Path) -> dict:
    """Digits (8x8, patch 4: 4 patches + [CLS]) with a ViT teacher and student, TRG + KD on block tokens."""
    vit = {"patch_size": 4, "heads": 2}
    return {
        "name": "vit-trg",
        "data": {"name": "digits", "params": {"test_fraction": 0.3}, "batch_size": 32},
        "teacher": {
            "name": "vit",
            "params": {**vit, "hidden": 32, "depth": 3},
            "train": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}},
        },
        "student": {"name": "vit", "params": {**vit, "hidden": 16, "depth": 2}},
        "methods": [
            {
                "name": "TRG + KD",
                "objectives": [
                    {"name": "cross_entropy", "weight": 0.1},
                    {"name": "hinton_kd", "weight": 0.9, "params": {"temperature": 4.0}},
                    {"name": "trg", "weight": 1.0, "params": {"student_layer": -2, "teacher_layer": -2}},
                ],
            }
        ],
        "optimizer": {"name": "adamw", "lr": 0.003},
        "trainer": {"epochs": 1, "threads": 1},
        "seeds": [0],
        "evaluation": {"latency": False},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }


def test_a_misspelt_vit_layer_is_refused_before_the_teacher_trains(tmp_path: Path) -> None:
    from distill.experiment import run_recipe
    from distill.recipe.load import recipe_from_dict

    recipe = _recipe(tmp_path)
    recipe["methods"][0]["objectives"][2]["params"]["teacher_layer"] = "vit.layer.2"
    with pytest.raises(UserError, match="did you mean 'vit.layers.2'"):
        run_recipe(recipe_from_dict(recipe), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_distill_run_with_trg_on_vit_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    from cli_helpers import distill

    recipe = _recipe(tmp_path)
    recipe["data"]["params"]["labelled_per_class"] = 20  # the student: 200 images
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = distill(monkeypatch, capsys, "run", path, "--no-progress")
    assert code == 0, err[-2000:]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| TRG + KD |" in report


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path: Path) -> None:
    require_dataset("fashion_mnist")
    out = tmp_path / "vit_tokens_quick.md"
    assert run_benchmark("vit_tokens", ["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for fragment in ("## Students: test accuracy", "## Verdict", "| TRG + KD |", "S13 TRG's claim"):
        assert fragment in text
    assert out.with_suffix(".png").is_file()
