"""CIFAR-style networks of the distillation benchmarks, and torchvision / timm models by name.

The architectures follow the tables of "Contrastive Representation Distillation" (Tian et al., ICLR 2020)
and "Decoupled Knowledge Distillation" (Zhao et al., CVPR 2022), i.e. the RepDistiller / mdistiller model
zoo: resnet8x4 ... resnet32x4, WRN-16-2 / WRN-40-2, VGG with batch norm, MobileNetV2 (width 0.5, expansion
6) and ShuffleNetV1 (3 groups). Parameter counts and state-dict keys match those repositories, so their
published CIFAR-100 checkpoints load with `load_state_dict` (read them with `torch.load(weights_only=True)`).

Differences that change no parameter: every ReLU is out of place (a forward hook sees each stage's output
unchanged), pooling before the classifier is adaptive (28x28 and 32x32 inputs both work), and parameter-free
`preact` / `flatten` modules are added so that every feature a feature objective reads is a module output.

Each model's `feature_layers()` names its taps in RepDistiller's order `[f0, f1, ..., pooled]`: the stem
output, the output of each stage, and the pooled vector the classifier reads. `feature_layers(preact=True)`
names the pre-activation versions (before the last ReLU of each stage) that OFD / ReviewKD-style objectives
use. A forward-hook manager reads them by module path; `forward` returns logits only.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UserError
from distill.models.registry import MODELS


def resolve_in_channels(in_channels: int | None, input_shape: Sequence[int] | None) -> int:
    """Input channels from `in_channels` or from a data set's `input_shape` (C, H, W); 3 when neither."""
    from_shape = int(input_shape[0]) if input_shape else None
    if in_channels is not None and from_shape is not None and in_channels != from_shape:
        raise UserError(
            f"model: in_channels={in_channels} disagrees with input_shape={tuple(input_shape or ())}"
        )
    channels = in_channels if in_channels is not None else from_shape if from_shape is not None else 3
    if channels < 1:
        raise UserError(f"model: in_channels must be at least 1, got {channels}")
    return channels


def _check_classes(num_classes: int) -> int:
    if num_classes < 1:
        raise UserError(f"model: num_classes must be at least 1, got {num_classes}")
    return int(num_classes)


class TappedNet(nn.Module):
    """A classifier whose intermediate features are named module outputs (see `feature_layers`)."""

    classifier_name: str = "fc"

    def __init__(self) -> None:
        super().__init__()
        self._feature_taps: list[str] = []
        self._preact_taps: list[str] = []

    def feature_layers(self, preact: bool = False) -> list[str]:
        """Module paths of `[stem, stage 1, ..., stage k, pooled]`; the last one is the classifier's input."""
        return list(self._preact_taps if preact else self._feature_taps)


def _init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal convolutions (fan-out), unit BN scale and zero shift; optional N(0, std) linear weights."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------- ResNet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.preact = nn.Identity()  # the sum before the last ReLU

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + shortcut))


class CifarResNet(TappedNet):
    """ResNet for 32x32 images ("Deep Residual Learning for Image Recognition", He et al., 2016, sec. 4.2):
    a 3x3 stem and three stages of (depth - 2) / 6 basic blocks at strides 1, 2, 2."""

    def __init__(self, depth: int, widths: Sequence[int], *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise UserError(f"model: a CIFAR ResNet needs depth = 6n + 2 (8, 20, 32, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        stages = []
        for index, (width, stride) in enumerate(zip(widths[1:4], (1, 2, 2), strict=True)):
            layers = [
                ResidualBlock(cin if i == 0 else width, width, stride if i == 0 else 1) for i in range(blocks)
            ]
            stages.append(nn.Sequential(*layers))
            cin = width
            self._preact_taps.append(f"layer{index + 1}.{blocks - 1}.preact")
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, _check_classes(num_classes))
        self._feature_taps = ["relu", "layer1", "layer2", "layer3", "flatten"]
        self._preact_taps = ["relu", *self._preact_taps, "flatten"]
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


# ----------------------------------------------------------------------------------------- Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block of "Wide Residual Networks" (Zagoruyko & Komodakis, 2016): BN-ReLU-conv twice.
    When the width or stride changes, the shortcut is a 1x1 conv of the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = dropout
        self.same_shape = cin == cout and stride == 1
        # the key name matches the reference implementations' checkpoints
        self.convShortcut = (
            None if self.same_shape else nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    def __init__(self, blocks: int, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                for i in range(blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(TappedNet):
    """WRN-depth-k: a 3x3 stem, three stages of (depth - 4) / 6 pre-activation blocks of widths 16k, 32k,
    64k, then BN-ReLU, pooling and a linear classifier."""

    def __init__(
        self, depth: int, widen: int, *, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise UserError(f"model: a wide ResNet needs depth = 6n + 4 (16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = WideStage(blocks, widths[0], widths[1], 1, dropout)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2, dropout)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], _check_classes(num_classes))
        self._feature_taps = ["conv1", "block1", "block2", "block3", "flatten"]
        # the BN that follows each stage, applied to its output (RepDistiller's `preact=True` features)
        self._preact_taps = ["conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1", "flatten"]
        _init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------------------------- VGG

VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class CifarVGG(TappedNet):
    """VGG with batch norm ("Very Deep Convolutional Networks", Simonyan & Zisserman, 2015) for small images:
    five conv-BN-ReLU blocks, max-pooling between the first four (the fourth pool only on inputs of 64 px and
    more), global average pooling and a single linear classifier."""

    classifier_name = "classifier"

    def __init__(self, config: list[list[int]], *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        cin = in_channels
        blocks = []
        for widths in config:
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(cin, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(cin, _check_classes(num_classes))
        self._feature_taps = [f"block{i}" for i in range(5)] + ["flatten"]
        last_bn = [len(block) - 2 for block in blocks]
        self._preact_taps = ["block0"] + [f"block{i}.{last_bn[i]}" for i in range(1, 5)] + ["flatten"]
        _init_conv_bn(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.block3(self.pool2(self.block2(x)))
        if x.shape[-1] >= 8:  # 64-px inputs; 32-px inputs reach block4 at 4x4 without this pool
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(self.flatten(self.pool4(x)))


# ------------------------------------------------------------------------------------------ MobileNetV2


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; identity shortcut when the shape is kept
    ("MobileNetV2: Inverted Residuals and Linear Bottlenecks", Sandler et al., 2018)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_shortcut = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_shortcut else self.conv(x)


class CifarMobileNetV2(TappedNet):
    """The CIFAR MobileNetV2 of the CRD tables (RepDistiller's `mobile_half`): width 0.5, expansion 6, a
    stride-2 stem, seven inverted-residual stages and a 1280-wide 1x1 head before pooling."""

    classifier_name = "classifier"
    STAGES = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )  # (expansion or None for `expansion`, width, blocks, stride)

    def __init__(
        self, *, num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6
    ) -> None:
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        stages = []
        for t, width, count, stride in self.STAGES:
            cout = int(width * width_mult)
            blocks = [
                InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, t or expansion)
                for i in range(count)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.blocks = nn.ModuleList(stages)
        head = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, head, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(head, _check_classes(num_classes)))
        self._feature_taps = ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "flatten"]
        self._preact_taps = list(self._feature_taps)  # no ReLU ends a stage: the outputs are pre-activation
        _init_conv_bn(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.flatten(self.pool(self.conv2(x))))


# ---------------------------------------------------------------------------------------- ShuffleNetV1


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv; with stride 2 the shortcut
    is a 3x3 average pool concatenated to the output ("ShuffleNet", Zhang et al., CVPR 2018)."""

    def __init__(
        self, cin: int, cout: int, stride: int, groups: int, first_groups: int | None = None
    ) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 4
        g = groups if first_groups is None else first_groups
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        merged = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return F.relu(self.preact(merged))


class CifarShuffleNetV1(TappedNet):
    """The CIFAR ShuffleNetV1 of the CRD tables (RepDistiller's `ShuffleV1`): 3 groups, stage widths 240, 480,
    960 with 4, 8, 4 units, a 1x1 stem of 24 channels."""

    classifier_name = "linear"

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (240, 480, 960),
        blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        cin = stem
        stages = []
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            units = []
            for i in range(count):
                # the first unit concatenates its input, so it produces width - cin new channels
                out = width - cin if i == 0 else width
                first_groups = 1 if (index == 0 and i == 0) else None  # the 24-channel stem is not grouped
                units.append(ShuffleUnit(cin, out, 2 if i == 0 else 1, groups, first_groups))
                cin = width
            stages.append(nn.Sequential(*units))
            self._preact_taps.append(f"layer{index + 1}.{count - 1}.preact")
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(cin, _check_classes(num_classes))
        self._feature_taps = ["relu", "layer1", "layer2", "layer3", "flatten"]
        self._preact_taps = ["relu", *self._preact_taps, "flatten"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------------------ registrations

# Published parameter counts at 100 classes, in millions, as quoted in the CRD / DKD / ReviewKD tables.
PUBLISHED_PARAMS_M: dict[str, float] = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
}

_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
_WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
PAPER = "Contrastive Representation Distillation (Tian et al., ICLR 2020)"


def _register_resnet(name: str, depth: int, widths: tuple[int, ...]) -> None:
    def factory(
        *, num_classes: int, in_channels: int | None = None, input_shape: Sequence[int] | None = None
    ) -> nn.Module:
        channels = resolve_in_channels(in_channels, input_shape)
        return CifarResNet(depth, widths, num_classes=num_classes, in_channels=channels)

    factory.__name__ = name
    width = "x4 " if widths[0] == 32 else ""
    MODELS.add(
        name, factory, summary=f"CIFAR ResNet-{depth} {width}(basic blocks, widths {widths})", paper=PAPER
    )


def _register_wrn(name: str, depth: int, widen: int) -> None:
    def factory(
        *,
        num_classes: int,
        in_channels: int | None = None,
        input_shape: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> nn.Module:
        channels = resolve_in_channels(in_channels, input_shape)
        return WideResNet(depth, widen, num_classes=num_classes, in_channels=channels, dropout=dropout)

    factory.__name__ = name
    MODELS.add(name, factory, summary=f"wide ResNet WRN-{depth}-{widen}", paper=PAPER)


def _register_vgg(name: str) -> None:
    def factory(
        *, num_classes: int, in_channels: int | None = None, input_shape: Sequence[int] | None = None
    ) -> nn.Module:
        channels = resolve_in_channels(in_channels, input_shape)
        return CifarVGG(VGG_CONFIGS[name], num_classes=num_classes, in_channels=channels)

    factory.__name__ = name
    MODELS.add(name, factory, summary=f"CIFAR {name.upper()} with batch norm", paper=PAPER)


for _name, (_depth, _widths) in _RESNETS.items():
    _register_resnet(_name, _depth, _widths)
for _name, (_depth, _widen) in _WRNS.items():
    _register_wrn(_name, _depth, _widen)
for _name in VGG_CONFIGS:
    _register_vgg(_name)


@MODELS.register(
    "mobilenetv2", summary="CIFAR MobileNetV2, width 0.5 (the CRD tables' MobileNetV2)", paper=PAPER
)
def mobilenetv2(
    *,
    num_classes: int,
    in_channels: int | None = None,
    input_shape: Sequence[int] | None = None,
    width_mult: float = 0.5,
    expansion: int = 6,
) -> nn.Module:
    channels = resolve_in_channels(in_channels, input_shape)
    return CifarMobileNetV2(
        num_classes=num_classes, in_channels=channels, width_mult=width_mult, expansion=expansion
    )


@MODELS.register(
    "shufflenetv1", summary="CIFAR ShuffleNetV1, 3 groups (the CRD tables' ShuffleNetV1)", paper=PAPER
)
def shufflenetv1(
    *,
    num_classes: int,
    in_channels: int | None = None,
    input_shape: Sequence[int] | None = None,
    groups: int = 3,
) -> nn.Module:
    channels = resolve_in_channels(in_channels, input_shape)
    return CifarShuffleNetV1(num_classes=num_classes, in_channels=channels, groups=groups)


# ---------------------------------------------------------------------------------- torchvision and timm


def _import_optional(package: str, model: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise UserError(
            f"model '{package}:{model}' needs the {package} package ({error}); "
            f"install it with `pip install {package}` or `pip install 'distill[vision]'`"
        ) from None


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                1,
                module.bias is not None,
            )
            with torch.no_grad():  # keep pretrained filters: average them over the original input channels
                mean = module.weight.mean(dim=1, keepdim=True)
                new.weight.copy_(
                    mean.expand(-1, new.weight.shape[1], -1, -1) * module.in_channels / in_channels
                )
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent_path, _, attribute = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attribute, new)
            return
    raise UserError(f"model {type(model).__name__} has no Conv2d whose input channels could be set")


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"model {type(model).__name__} has no Linear classifier to resize to {num_classes} classes"
        )
    path, module = linears[-1]
    if module.out_features == num_classes:
        return
    parent_path, _, attribute = path.rpartition(".")
    setattr(
        model.get_submodule(parent_path) if parent_path else model,
        attribute,
        nn.Linear(module.in_features, num_classes, bias=module.bias is not None),
    )


@MODELS.register(
    "torchvision", summary="a torchvision classifier by name: torchvision:<name> (parameter `arch`)"
)
def torchvision_model(
    *,
    arch: str,
    num_classes: int,
    in_channels: int | None = None,
    input_shape: Sequence[int] | None = None,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`torchvision.models.get_model(arch)`. `weights` (e.g. "DEFAULT") downloads unless torch's cache has
    them: online users only. With weights the classifier is replaced to fit `num_classes`."""
    tv = _import_optional("torchvision", arch)
    channels = resolve_in_channels(in_channels, input_shape)
    try:
        if weights is None:
            model = tv.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        else:
            model = tv.models.get_model(arch, weights=weights, **kwargs)
            _replace_last_linear(model, num_classes)
    except ValueError as error:  # an unknown architecture
        raise UserError(f"model 'torchvision:{arch}': {error}") from None
    if channels != 3:
        _replace_first_conv(model, channels)
    return model


@MODELS.register("timm", summary="any timm model by name: timm:<name> (parameter `arch`)")
def timm_model(
    *,
    arch: str,
    num_classes: int,
    in_channels: int | None = None,
    input_shape: Sequence[int] | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(arch, num_classes=..., in_chans=...)`; `pretrained=True` is for online users."""
    timm = _import_optional("timm", arch)
    channels = resolve_in_channels(in_channels, input_shape)
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=channels, **kwargs
        )
    except RuntimeError as error:  # timm raises RuntimeError("Unknown model ...")
        raise UserError(f"model 'timm:{arch}': {error}") from None


def feature_layers_of(model: nn.Module) -> list[str]:
    """Feature tap paths of any model: the zoo's own `feature_layers()`, timm's `feature_info`, or the stage
    names of torchvision-style ResNets (`layer1` ... `layer4`, then `avgpool`); [] when none is known."""
    method = getattr(model, "feature_layers", None)
    if callable(method):
        return list(method())
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(i, dict) and "module" in i for i in info):
        return [str(i["module"]) for i in info]
    names = dict(model.named_children())
    stages = [f"layer{i}" for i in range(1, 5) if f"layer{i}" in names]
    if stages:
        return stages + (["avgpool"] if "avgpool" in names else [])
    return []


__all__ = [
    "PUBLISHED_PARAMS_M",
    "CifarMobileNetV2",
    "CifarResNet",
    "CifarShuffleNetV1",
    "CifarVGG",
    "TappedNet",
    "WideResNet",
    "feature_layers_of",
    "resolve_in_channels",
]
