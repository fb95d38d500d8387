"""One registry (name -> factory) per kind of component, with near-miss suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from distill.errors import UserError

T = TypeVar("T")


def nearest(name: str, choices: list[str] | tuple[str, ...] | Any) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_message(kind: str, name: str, choices: Any) -> str:
    hint = nearest(name, choices)
    suggestion = f"; did you mean '{hint}'?" if hint else f"; known: {', '.join(sorted(choices))}"
    return f"unknown {kind} '{name}'{suggestion}"


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    summary: str = ""
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Maps names to factories. Registering a name twice is a programming error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, summary: str = "", paper: str = "", **extra: Any
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, summary=summary, paper=paper, **extra)
            return factory

        return decorate

    def add(
        self, name: str, factory: Callable[..., T], *, summary: str = "", paper: str = "", **extra: Any
    ) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, factory, summary, paper, dict(extra))

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(unknown_name_message(self.kind, name, self._entries)) from None

    def build(self, name: str, **params: Any) -> T:
        return self.entry(name).factory(**params)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))
