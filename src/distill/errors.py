"""Errors a user can cause. The CLI turns each into one line on stderr and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a recipe, a path, or the data: reported in one line, never as a traceback."""


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; the message names the step and the term."""
