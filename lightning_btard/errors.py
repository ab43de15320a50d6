"""Errors a user can cause and fix: the CLI prints their message alone, without a traceback."""

from __future__ import annotations

__all__ = ["TrainingDiverged", "UserError"]


class UserError(ValueError):
    """A bad configuration, missing data, or an unreachable peer: the message says what to do."""


class TrainingDiverged(UserError):
    """This peer's own gradient is not finite: the model diverged (an honest peer does not send it: it would be
    banned as a malformed part)."""
