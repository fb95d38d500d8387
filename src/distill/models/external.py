"""torchvision and timm classifiers by name (`torchvision:<name>`, `timm:<name>`), resized to a data set's
classes and input channels. The packages are optional; a missing one is a `UserError` naming it."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distill.errors import UserError
from distill.models.cifar import resolve_in_channels
from distill.models.registry import MODELS


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
