"""Malformed parts: non-finite values (NaN, Inf), or on transports that carry them, a wrong shape or dtype.

Caught at the scatter phase: the part is signed by its sender, so the aggregator's accusation carries
the proof. torch.distributed cannot carry a message of another size or dtype (the receive is posted
with the expected one), so ``kind="oversized"`` and ``"dtype"`` are for the in-process and hivemind transports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_btard.attacks.base import AttackContext, Byzantine, ProtocolAttack
from lightning_btard.protocol.round import Behaviour

__all__ = ["MalformedPart"]

_KINDS = ("nan", "inf", "oversized", "dtype")


class MalformedPart(ProtocolAttack):
    """Peers among ``byzantine`` send malformed parts of the given ``kind`` (``nan | inf | oversized | dtype``)."""

    def __init__(
        self,
        byzantine: Byzantine,
        kind: str = "nan",
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        if kind not in _KINDS:
            raise ValueError(f"MalformedPart kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind

    def conduct(self, ctx: AttackContext) -> Behaviour:
        kind = self.kind

        class Malformed(Behaviour):
            def part(self, step: int, receiver: int, part: Tensor) -> Tensor:
                if kind == "nan":
                    return torch.full_like(part, float("nan"))
                if kind == "inf":
                    return torch.full_like(part, float("inf"))
                if kind == "oversized":
                    return torch.cat([part, part])
                return part.double()

        return Malformed()
