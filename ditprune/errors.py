"""Errors a user can fix. The CLI prints any :class:`UserError` as one line and exits with 2
(a traceback only with ``-v``); the Python API raises them like any exception.

``InputError`` is also a ``ValueError`` and ``InputTypeError`` a ``TypeError``, so code that
catches the built-in kinds keeps working.
"""

from __future__ import annotations

__all__ = ["UserError", "InputError", "InputTypeError", "MissingExtraError"]


class UserError(Exception):
    """Bad input: the message names what is wrong and what to do."""


class InputError(UserError, ValueError):
    pass


class InputTypeError(UserError, TypeError):
    pass


class MissingExtraError(UserError, ImportError):
    """An optional dependency is missing: the message names the extra that installs it."""

    def __init__(self, package: str, extra: str = "demo", needed_by: str = "the shipped reference models") -> None:
        super().__init__(f"{package} is not installed, and {needed_by} need it: pip install 'ditprune[{extra}]'")
