"""Errors a user can cause. The CLI turns each into one line on stderr and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a recipe, a path, or the data: reported in one line, never as a traceback."""


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; the message names the step and the term."""


ECHO_LIMIT = 80  # an error line quotes at most this much of a value the user wrote


def clipped(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` on one line (control characters escaped, `\\n` for a line break) and cut to `limit`
    characters: an error line never echoes unbounded input, nor breaks in two."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)`, clipped."""
    return clipped(repr(value), limit)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (a library's), clipped; its type when it has none."""
    return clipped((str(err).strip().splitlines() or [type(err).__name__])[0], limit)
