"""The attack callbacks of a run, as the strategy uses them: which fire, what they send, how peers collude."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch

from lightning_btard.attacks.base import Attack, AttackContext

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_btard.protocol.round import Behaviour
    from lightning_btard.transports.base import Transport

__all__ = ["attacks_of", "behaviour_of", "count_fired", "give_colluders_a_channel"]


def attacks_of(trainer: Optional["pl.Trainer"]) -> list[Attack]:
    return [cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, Attack)]


def behaviour_of(attacks: Sequence[Attack], ctx: AttackContext) -> "Behaviour":
    """This peer's conduct in the round: honest, unless a protocol attack scripts it."""
    from lightning_btard.protocol.round import Behaviour

    for attack in attacks:
        scripted = attack.behaviour(ctx)
        if scripted is not None:
            return scripted
    return Behaviour()


def give_colluders_a_channel(attacks: Sequence[Attack], transport: "Transport", active: Sequence[int]) -> None:
    """A transport among the active Byzantine peers of each colluding attack, or of all the active peers for an
    omniscient one (a collective: every member calls it)."""
    for attack in attacks:
        colluders = [m for m, peer in enumerate(active) if peer in attack.byzantine]
        if attack.omniscient:
            attack.collusion, attack.members = transport, list(active)
        elif attack.colluding and colluders:
            attack.collusion = transport.subgroup(colluders)


def count_fired(attacks: Sequence[Attack], transport: "Transport", step: int, device: Any) -> dict[str, float]:
    """How many peers fired each attack at ``step`` (one small collective; every peer runs the same callbacks)."""
    if not attacks:
        return {}
    mine = torch.tensor([float(a.fired_at(step)) for a in attacks], device=device)
    counts = transport.all_reduce(mine, "sum").tolist()
    return {f"attack/{a.name}": c for a, c in zip(attacks, counts)}
