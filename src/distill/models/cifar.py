"""CIFAR-style networks of the distillation benchmarks: what the zoo shares. The networks are registered by
family in `distill.models.resnets` (ResNets, WRNs), `distill.models.vgg` and `distill.models.mobile`
(MobileNetV2, ShuffleNetV1); torchvision / timm models by name in `distill.models.external`.

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

from collections.abc import Sequence

from torch import nn

from distill.errors import UserError

PAPER = "Contrastive Representation Distillation (Tian et al., ICLR 2020)"

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


def check_classes(num_classes: int) -> int:
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


def init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
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


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def feature_layers_of(model: nn.Module) -> list[str]:
    """Feature tap paths of any model: the zoo's own `feature_layers()`, timm's `feature_info`, or the stage
    names of torchvision-style ResNets (`layer1` ... `layer4`, then `avgpool`), a transformers ViT's blocks
    (`distill.models.vit.transformers_vit_taps`); [] when none is known."""
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
    from distill.models.vit import transformers_vit_taps  # here: vit imports this module

    return transformers_vit_taps(model)  # a transformers ViT's blocks; [] for any other model


__all__ = [
    "PAPER",
    "PUBLISHED_PARAMS_M",
    "TappedNet",
    "check_classes",
    "conv3x3",
    "feature_layers_of",
    "init_conv_bn",
    "resolve_in_channels",
]
