"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) and wide ResNets (WRN-16-1 ... WRN-40-2) of
the CRD / DKD tables (RepDistiller's model zoo; see `distill.models.cifar` for what the zoo shares)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import UserError
from distill.models.cifar import PAPER, TappedNet, check_classes, conv3x3, init_conv_bn, resolve_in_channels
from distill.models.registry import MODELS

# ------------------------------------------------------------------------------------------------ ResNet


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or 1x1 conv-BN) shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(cout, cout)
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
        self.conv1 = conv3x3(in_channels, widths[0])
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
        self.fc = nn.Linear(cin, check_classes(num_classes))
        self._feature_taps = ["relu", "layer1", "layer2", "layer3", "flatten"]
        self._preact_taps = ["relu", *self._preact_taps, "flatten"]
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------------------- Wide ResNet


class WideBlock(nn.Module):
    """Pre-activation block of "Wide Residual Networks" (Zagoruyko & Komodakis, 2016): BN-ReLU-conv twice.
    When the width or stride changes, the shortcut is a 1x1 conv of the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(cout, cout)
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
        self.conv1 = conv3x3(in_channels, widths[0])
        self.block1 = WideStage(blocks, widths[0], widths[1], 1, dropout)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2, dropout)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], check_classes(num_classes))
        self._feature_taps = ["conv1", "block1", "block2", "block3", "flatten"]
        # the BN that follows each stage, applied to its output (RepDistiller's `preact=True` features)
        self._preact_taps = ["conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1", "flatten"]
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.pool(x)))


# ----------------------------------------------------------------------------------------- registrations

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


for _name, (_depth, _widths) in _RESNETS.items():
    _register_resnet(_name, _depth, _widths)
for _name, (_depth, _widen) in _WRNS.items():
    _register_wrn(_name, _depth, _widen)
