"""Read intermediate outputs of any module by its path (`layer2.0.conv1`) without touching `forward`."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distill.errors import UserError
from distill.registry import nearest


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path, or a UserError naming the nearest valid path."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    hint = nearest(path, [name for name in modules if name])
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    raise UserError(f"{type(model).__name__} has no module '{path}'{suggestion}")


class FeaturesComplete(Exception):
    """Raised by `FeatureHooks` in `stop_when_complete` mode once every named module has run: the rest of the
    forward pass is not needed (a teacher that serves only feature objectives)."""


class FeatureHooks:
    """Collects the outputs of named submodules on every forward pass.

    Use as a context manager (hooks are removed on exit) or call `remove()`. `features` maps each path to
    the latest output; `clear()` drops them so that no step keeps another step's activations alive.
    With `detach=True` (for frozen teachers) stored outputs carry no graph. While `stop_when_complete` is
    True, the hook that records the last missing output raises `FeaturesComplete`.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *, detach: bool = False) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self.detach = detach
        self.stop_when_complete = False
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for path in self.paths:
            module = resolve_module(model, path)
            self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):  # noqa: ANN202 - a hook closure
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            if not isinstance(tensor, Tensor):
                raise UserError(f"module '{path}' returned {type(output).__name__}, not a tensor")
            self.features[path] = tensor.detach() if self.detach else tensor
            if self.stop_when_complete and len(self.features) == len(self.paths):
                raise FeaturesComplete

        return record

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
