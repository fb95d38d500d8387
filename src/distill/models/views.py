"""A model that reads one region of its input: two "modalities" cut from one data set, for cross-modal
distillation where no paired data sets are at hand (S25, MST-Distill; docs/mst_distill.md).

`left` / `right` are the two halves of the last dimension (an image's columns, a feature vector's halves),
`top` / `bottom` the halves of the one before (an image's rows), `all` the whole input. The wrapped model is
built for the region's shape, so a student that reads the left half never sees the right one, while a teacher
of the right half (cross-modal) or of the whole image (both "modalities", early fusion) gets the same batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from distill.errors import UserError, shown
from distill.models.cifar import feature_layers_of
from distill.models.registry import MODELS, build_model

REGIONS = ("all", "left", "right", "top", "bottom")


def region_slice(size: int, region: str) -> slice:
    """The positions of one half along a dimension of `size` (the left / top half takes the smaller part)."""
    half = size // 2
    return slice(0, half) if region in ("left", "top") else slice(half, size)


def region_of(x: Tensor, region: str) -> Tensor:
    """The region of a batch `x` (..., H, W) or (..., D): the input's own dimensions are the last ones."""
    if region == "all":
        return x
    if region in ("left", "right"):
        return x[..., region_slice(x.shape[-1], region)]
    return x[..., region_slice(x.shape[-2], region), :]


def region_shape(shape: tuple[int, ...], region: str) -> tuple[int, ...]:
    if region == "all":
        return tuple(shape)
    dim = len(shape) - 1 if region in ("left", "right") else len(shape) - 2
    if dim < 0 or shape[dim] < 2:
        raise UserError(
            f"model 'view': region '{region}' needs a dimension of 2 or more to halve, input {shape}"
        )
    part = region_slice(shape[dim], region)
    return tuple(part.stop - part.start if i == dim else s for i, s in enumerate(shape))


@MODELS.register("view", summary="a model of one region of the input (left / right / top / bottom half)")
class View(nn.Module):
    """`model` (a name, or `{name, params}`) built for, and fed, `region` of each input."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        region: str = "all",
        model: str | dict[str, Any] = "mlp",
    ) -> None:
        super().__init__()
        if region not in REGIONS:
            raise UserError(f"model 'view': region must be one of {', '.join(REGIONS)}, got {shown(region)}")
        spec = {"name": model} if isinstance(model, str) else model
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("name"), str)
            or set(spec) - {"name", "params"}
        ):
            raise UserError("model 'view': model is a model name or {name: ..., params: {...}}")
        params = spec.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"model 'view': model params must be a mapping, got {shown(params)}")
        self.region = region
        self.model = build_model(
            spec["name"],
            num_classes=num_classes,
            input_shape=region_shape(tuple(input_shape), region),
            **params,
        )

    def feature_layers(self, preact: bool = False) -> list[str]:
        """The wrapped model's feature taps, under `model.`."""
        return [f"model.{path}" for path in feature_layers_of(self.model)]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(region_of(x, self.region))
