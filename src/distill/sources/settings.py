"""Source settings from a recipe's `source.params`: dataclasses filled key by key, every mistake one line."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from distill.errors import UserError
from distill.registry import nearest

T = TypeVar("T")


def from_params(cls: type[T], params: dict[str, Any], where: str) -> T:
    """`cls(**params)`, refusing unknown keys (naming the nearest valid one) and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in params:
        if key not in fields:
            hint = nearest(key, list(fields))
            suggestion = f"did you mean '{hint}'?" if hint else f"valid: {', '.join(fields)}"
            raise UserError(f"{where}: unknown setting '{key}'; {suggestion}")
    refuse_nonfinite(params, where)
    try:
        settings = cls(**params)
    except (TypeError, ValueError, OverflowError) as err:
        raise UserError(f"{where}: {err}") from err
    check = getattr(settings, "check", None)
    if check is not None:
        try:
            check()
        except (TypeError, ValueError, OverflowError) as err:
            raise UserError(f"{where}: {err}") from err
    return settings


def refuse_nonfinite(params: dict[str, Any], where: str) -> None:
    """A setting given as NaN or infinity (`.inf` in YAML) is refused by name: no count or rate is one."""
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: {key} must be a finite number, got {value}")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
