"""The model registry: `name -> factory(num_classes=..., input_shape=... | in_channels=..., **params)`."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from distill.errors import UserError
from distill.registry import Registry, nearest

MODELS: Registry[nn.Module] = Registry("model")


EXTERNAL_ZOOS = ("torchvision", "timm")


def split_model_name(spec: str) -> tuple[str, dict[str, str]]:
    """`"torchvision:resnet18"` -> `("torchvision", {"arch": "resnet18"})`; a plain name comes back as is."""
    prefix, sep, arch = spec.partition(":")
    if not sep:
        return spec, {}
    if prefix not in EXTERNAL_ZOOS or not arch:
        raise UserError(f"model: cannot read '{spec}'; write torchvision:<name> or timm:<name>")
    return prefix, {"arch": arch}


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], **params: Any) -> nn.Module:
    """Build a registered model (or `torchvision:<name>` / `timm:<name>`); factories take either the full
    `input_shape` or just `in_channels`."""
    name, external = split_model_name(name)
    params = {**external, **params}
    factory = MODELS.entry(name).factory
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        for key in params:
            if key not in accepted:
                hint = nearest(
                    key, [k for k in accepted if k not in {"num_classes", "input_shape", "in_channels"}]
                )
                raise UserError(
                    f"model '{name}' has no parameter '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
                )
    shape_args: dict[str, Any] = {"input_shape": tuple(input_shape)} if "input_shape" in accepted else {}
    if "in_channels" in accepted:
        shape_args["in_channels"] = input_shape[0]
    try:
        return factory(num_classes=num_classes, **shape_args, **params)
    except (TypeError, ValueError) as err:
        raise UserError(f"model '{name}': {err}") from err


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
