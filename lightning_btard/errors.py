"""Errors a user can cause and fix: the CLI prints their message alone, without a traceback."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A bad configuration, missing data, or an unreachable peer: the message says what to do."""
