"""The CRD tables' mobile networks for CIFAR: MobileNetV2 (width 0.5, expansion 6) and ShuffleNetV1
(3 groups), as RepDistiller's `mobile_half` and `ShuffleV1` (see `distill.models.cifar` for what the zoo
shares)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.cifar import PAPER, TappedNet, check_classes, init_conv_bn, resolve_in_channels
from distill.models.registry import MODELS

# ------------------------------------------------------------------------------------------- MobileNetV2


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
        self.classifier = nn.Sequential(nn.Linear(head, check_classes(num_classes)))
        self._feature_taps = ["conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "flatten"]
        self._preact_taps = list(self._feature_taps)  # no ReLU ends a stage: the outputs are pre-activation
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.flatten(self.pool(self.conv2(x))))


# ------------------------------------------------------------------------------------------ ShuffleNetV1


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
        self.linear = nn.Linear(cin, check_classes(num_classes))
        self._feature_taps = ["relu", "layer1", "layer2", "layer3", "flatten"]
        self._preact_taps = ["relu", *self._preact_taps, "flatten"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


# ----------------------------------------------------------------------------------------- registrations


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
