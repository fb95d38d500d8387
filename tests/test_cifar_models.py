"""The CIFAR model zoo: shapes, parameter counts against the published tables, feature taps, adapters."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from distill.errors import UserError
from distill.models import MODELS, build_model, count_parameters, split_model_name
from distill.models.cifar import (
    PUBLISHED_PARAMS_M,
    TappedNet,
    feature_layers_of,
)
from distill.models.hooks import FeatureHooks, resolve_module

# Exact counts at 100 classes, equal to those of RepDistiller's models/ (measured side by side when written).
EXACT_PARAMS_100 = {
    "resnet8": 83892,
    "resnet14": 181108,
    "resnet20": 278324,
    "resnet32": 472756,
    "resnet44": 667188,
    "resnet56": 861620,
    "resnet110": 1736564,
    "resnet8x4": 1233540,
    "resnet32x4": 7433860,
    "wrn_16_1": 180916,
    "wrn_16_2": 703284,
    "wrn_40_1": 569780,
    "wrn_40_2": 2255156,
    "vgg8": 3965028,
    "vgg11": 9277284,
    "vgg13": 9462180,
    "vgg16": 14774436,
    "vgg19": 20086692,
    "mobilenetv2": 812836,
    "shufflenetv1": 949258,
}
ZOO = sorted(EXACT_PARAMS_100)
REQUIRED = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13"]


def test_every_zoo_model_is_registered():
    assert set(ZOO) <= set(MODELS.names())
    assert {"mobilenetv2", "shufflenetv1", "torchvision", "timm", *REQUIRED} <= set(MODELS.names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_the_published_table(name):
    model = build_model(name, num_classes=100, input_shape=(3, 32, 32))
    measured = count_parameters(model)
    assert measured == EXACT_PARAMS_100[name]
    assert abs(measured / 1e6 - PUBLISHED_PARAMS_M[name]) < 0.006, (name, measured)


@pytest.mark.parametrize("name", ZOO)
def test_rgb_32px_and_grey_28px_forward_to_logits(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100, input_shape=(3, 32, 32)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    grey = build_model(name, num_classes=10, input_shape=(1, 28, 28)).eval()
    with torch.no_grad():
        out = grey(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name in EXACT_PARAMS_100:  # only the first conv and the classifier change
        assert count_parameters(grey) < count_parameters(model)


@pytest.mark.parametrize("name", ZOO)
def test_feature_taps_are_module_paths_read_by_hooks(name):
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32)).eval()
    assert isinstance(model, TappedNet)
    taps, preact = model.feature_layers(), model.feature_layers(preact=True)
    assert len(taps) == len(preact) >= 5
    assert feature_layers_of(model) == taps
    for path in {*taps, *preact}:
        resolve_module(model, path)
    x = torch.randn(3, 3, 32, 32)
    with FeatureHooks(model, [*taps, *preact]) as hooks, torch.no_grad():
        logits = model(x)
        features = dict(hooks.features)
    pooled = features[taps[-1]]
    classifier = model.get_submodule(model.classifier_name)
    linear = classifier if isinstance(classifier, nn.Linear) else classifier[-1]
    assert pooled.shape == (3, linear.in_features)
    torch.testing.assert_close(linear(pooled), logits)  # the last tap is exactly the classifier's input
    maps = [features[p] for p in taps[1:-1]]
    assert all(f.ndim == 4 for f in maps)
    assert [f.shape[-1] for f in maps] == sorted((f.shape[-1] for f in maps), reverse=True)


@pytest.mark.parametrize("name", ["resnet8x4", "shufflenetv1"])
def test_preact_taps_hold_the_sum_before_the_last_relu(name):
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32)).eval()
    taps, preact = model.feature_layers(), model.feature_layers(preact=True)
    with FeatureHooks(model, [*taps, *preact]) as hooks, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        for stage, before in zip(taps[1:-1], preact[1:-1], strict=True):
            assert (hooks.features[before] < 0).any()  # not yet rectified ...
            torch.testing.assert_close(
                torch.relu(hooks.features[before]), hooks.features[stage]
            )  # ... untouched


def test_wrn_preact_taps_are_the_bn_after_each_stage():
    model = build_model("wrn_16_2", num_classes=10, input_shape=(3, 32, 32)).eval()
    taps, preact = model.feature_layers(), model.feature_layers(preact=True)
    with FeatureHooks(model, [*taps, *preact]) as hooks, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        bn = model.get_submodule("block2.layer.0.bn1")
        torch.testing.assert_close(hooks.features[preact[1]], bn(hooks.features[taps[1]]))


def test_state_dict_keys_follow_the_reference_checkpoints():
    keys = {
        name: set(build_model(name, num_classes=100, input_shape=(3, 32, 32)).state_dict()) for name in ZOO
    }
    assert "layer3.0.downsample.0.weight" in keys["resnet8x4"] and "fc.weight" in keys["resnet32x4"]
    assert (
        "block1.layer.0.convShortcut.weight" in keys["wrn_40_2"]
        and "block1.layer.1.conv2.weight" in keys["wrn_40_2"]
    )
    assert {"block0.0.weight", "block0.1.running_var", "block0.3.weight", "classifier.weight"} <= keys[
        "vgg13"
    ]
    assert {"conv1.0.weight", "blocks.6.0.conv.7.bias", "conv2.1.weight", "classifier.0.weight"} <= keys[
        "mobilenetv2"
    ]
    assert {"conv1.weight", "layer1.0.conv3.weight", "linear.weight"} <= keys["shufflenetv1"]


def test_models_train_end_to_end():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, input_shape=(1, 28, 28))
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channel_mismatch_and_bad_shapes_are_user_errors():
    factory = MODELS.entry("resnet20").factory
    with pytest.raises(UserError, match="in_channels=1 disagrees"):
        factory(num_classes=10, in_channels=1, input_shape=(3, 32, 32))
    assert factory(num_classes=10).conv1.in_channels == 3
    with pytest.raises(UserError, match="num_classes"):
        factory(num_classes=0)
    with pytest.raises(UserError, match="no parameter 'widen'"):
        build_model("resnet20", num_classes=10, input_shape=(3, 32, 32), widen=2)


def test_model_spec_strings():
    assert split_model_name("torchvision:resnet18") == ("torchvision", {"arch": "resnet18"})
    assert split_model_name("timm:resnet18.a1_in1k") == ("timm", {"arch": "resnet18.a1_in1k"})
    assert split_model_name("resnet8x4") == ("resnet8x4", {})
    with pytest.raises(UserError, match="torchvision:<name>"):
        split_model_name("keras:resnet")


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_missing_vision_package_is_a_user_error(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(UserError, match=f"needs the {package} package"):
        build_model(package, num_classes=10, input_shape=(3, 32, 32), arch="resnet18")


class _TinyNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.layer1(self.conv1(x))).flatten(1))


def test_torchvision_adapter_with_a_stand_in_package(monkeypatch):
    calls = []

    def get_model(name, weights=None, **kwargs):
        calls.append((name, weights, kwargs))
        if name != "tiny":
            raise ValueError(f"Unknown model {name}")
        return _TinyNet(**kwargs)

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    model = build_model("torchvision", num_classes=7, input_shape=(1, 28, 28), arch="tiny")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert model.conv1.in_channels == 1 and calls[-1] == ("tiny", None, {"num_classes": 7})
    pretrained = build_model(
        "torchvision", num_classes=5, input_shape=(3, 32, 32), arch="tiny", weights="DEFAULT"
    )
    assert pretrained.fc.out_features == 5 and calls[-1][1] == "DEFAULT"
    assert feature_layers_of(pretrained) == ["layer1", "avgpool"]
    assert build_model("torchvision:tiny", num_classes=3, input_shape=(3, 8, 8)).fc.out_features == 3
    assert isinstance(build_model("resnet8", num_classes=3, input_shape=(3, 8, 8)), TappedNet)
    with pytest.raises(UserError, match="torchvision:nope"):
        build_model("torchvision", num_classes=5, input_shape=(3, 32, 32), arch="nope")


def test_timm_adapter_with_a_stand_in_package(monkeypatch):
    fake = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3):
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        model = _TinyNet(num_classes)
        model.conv1 = nn.Conv2d(in_chans, 4, 3, padding=1)
        return model

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = build_model("timm", num_classes=3, input_shape=(1, 8, 8), arch="tiny")
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 3)
    with pytest.raises(UserError, match="timm:bad"):
        build_model("timm", num_classes=3, input_shape=(1, 8, 8), arch="bad")
