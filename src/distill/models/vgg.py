"""CIFAR VGG with batch norm (vgg8 ... vgg19) of the CRD / DKD tables (RepDistiller's model zoo; see
`distill.models.cifar` for what the zoo shares)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distill.models.cifar import PAPER, TappedNet, check_classes, init_conv_bn, resolve_in_channels
from distill.models.registry import MODELS

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
        self.classifier = nn.Linear(cin, check_classes(num_classes))
        self._feature_taps = [f"block{i}" for i in range(5)] + ["flatten"]
        last_bn = [len(block) - 2 for block in blocks]
        self._preact_taps = ["block0"] + [f"block{i}.{last_bn[i]}" for i in range(1, 5)] + ["flatten"]
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.block3(self.pool2(self.block2(x)))
        if x.shape[-1] >= 8:  # 64-px inputs; 32-px inputs reach block4 at 4x4 without this pool
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(self.flatten(self.pool4(x)))


def _register_vgg(name: str) -> None:
    def factory(
        *, num_classes: int, in_channels: int | None = None, input_shape: Sequence[int] | None = None
    ) -> nn.Module:
        channels = resolve_in_channels(in_channels, input_shape)
        return CifarVGG(VGG_CONFIGS[name], num_classes=num_classes, in_channels=channels)

    factory.__name__ = name
    MODELS.add(name, factory, summary=f"CIFAR {name.upper()} with batch norm", paper=PAPER)


for _name in VGG_CONFIGS:
    _register_vgg(_name)
