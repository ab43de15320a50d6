"""Withholding: send nothing to some peers in a phase of the round (hivemind backend only).

The victims' collective fails at its deadline; everybody regroups. On hivemind the survivors' reports of silence
(``groups/silence.py``) remove the withholder: alone when it withheld from a majority, with its one victim when it
withheld from a minority (a dispute nobody can settle). It comes back only through a capped admission.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.errors import UserError
from lightning_btard.protocol.round import Behaviour

__all__ = ["Withholding"]


class Withholding(ProtocolAttack):
    """Peers among ``byzantine`` send nothing to ``victims`` (peer ids; default: every other peer) in ``phase``
    (``"scatter"`` or ``"gather"``) when the attack fires."""

    def __init__(self, byzantine: Byzantine, victims: Optional[Sequence[int]] = None, phase: str = "scatter",
                 **kwargs: Any) -> None:
        super().__init__(byzantine, **kwargs)
        if phase not in ("scatter", "gather"):
            raise ValueError(f"phase must be 'scatter' or 'gather', got {phase!r}")
        self.victims = None if victims is None else {int(v) for v in victims}
        self.phase = phase

    def conduct(self, ctx: AttackContext) -> Behaviour:
        strategy = getattr(ctx.trainer, "strategy", None)
        if getattr(strategy, "backend", "hivemind") != "hivemind":
            raise UserError("Withholding needs backend='hivemind' (torch.distributed has no per-destination sends)")
        victims, phase, me = self.victims, self.phase, ctx.rank

        class Withhold(Behaviour):
            def message(self, step: int, at: str, receiver: int, message: list[Tensor]) -> Any:
                if at == phase and receiver != me and (victims is None or receiver in victims):
                    return None  # nothing is sent to this receiver
                return message

        return Withhold()
