"""Errors a user can cause and fix: the CLI prints their message alone, without a traceback."""

from __future__ import annotations

__all__ = ["TrainingDiverged", "UserError"]


class UserError(ValueError):
    """A bad configuration, missing data, or an unreachable peer: the message says what to do."""


class TrainingDiverged(UserError):
    """This peer's own gradient is not finite: the model diverged (an honest peer does not send it: it would be
    banned as a malformed part)."""

    @classmethod
    def in_gradients(cls, peer: int, step: object, names: list[str]) -> "TrainingDiverged":
        """The error for peer ``peer`` whose gradients of parameters ``names`` are not finite at ``step``."""
        where = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") or "the gradients"
        return cls(
            f"BTARD: peer {peer}'s own gradient at step {step} is not finite (NaN or Inf in {where}) or beyond the "
            f"largest part the protocol handles: the model diverged. "
            "An honest peer does not send it (the others would ban it as a malformed part). Lower the learning rate, "
            "clip gradients (Trainer(gradient_clip_val=...)), or train in 16-mixed precision, whose loss scaler skips "
            "such steps."
        )
