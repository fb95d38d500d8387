"""The model registry: `name -> factory(num_classes=..., input_shape=... | in_channels=..., **params)`."""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from distill.errors import UserError, first_line, shown
from distill.registry import Registry, nearest

MODELS: Registry[nn.Module] = Registry("model")


EXTERNAL_ZOOS = ("torchvision", "timm")


def check_widths(model: str, key: str, widths: Any) -> list[int]:
    """Layer widths (hidden sizes, channel counts): a list of positive whole numbers."""
    if not isinstance(widths, list | tuple) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths
    ):
        raise UserError(
            f"model '{model}': {key} must be a list of positive whole numbers, got {shown(widths)}"
        )
    return list(widths)


def check_dropout(model: str, dropout: Any) -> float:
    if (
        not isinstance(dropout, int | float)
        or isinstance(dropout, bool)
        or not math.isfinite(dropout)
        or not 0.0 <= dropout < 1.0
    ):
        raise UserError(f"model '{model}': dropout must be a number in [0, 1), got {shown(dropout)}")
    return float(dropout)


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
                valid = [k for k in accepted if k not in {"num_classes", "input_shape", "in_channels"}]
                hint = nearest(key, valid) if isinstance(key, str) else None
                raise UserError(
                    f"model '{name}' has no parameter {shown(key)}"
                    + (f"; did you mean '{hint}'?" if hint else "")
                )
    shape_args: dict[str, Any] = {"input_shape": tuple(input_shape)} if "input_shape" in accepted else {}
    if "in_channels" in accepted:
        shape_args["in_channels"] = input_shape[0]
    try:
        return factory(num_classes=num_classes, **shape_args, **params)
    except (TypeError, ValueError, OverflowError, IndexError, ZeroDivisionError) as err:
        raise UserError(f"model '{name}': {first_line(err)}") from err
    except RuntimeError as err:  # torch: a negative or impossible size, an allocation that cannot be made
        raise UserError(f"model '{name}' cannot be built with these parameters ({first_line(err)})") from err


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
