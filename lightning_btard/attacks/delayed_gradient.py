"""Delayed gradient: the attacker sends the honest gradient it computed ``delay`` steps earlier.

From the released BTARD code (``DelayedGradientAttacker``): a stale but genuine gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine

__all__ = ["DelayedGradient"]

log = logging.getLogger("lightning_btard.attacks")


class DelayedGradient(Attack):
    """At its scheduled steps within ``[attack_start, attack_start + attack_length * attack_every)``, send the gradient of step ``t - delay``.

    The attacker keeps a float32 CPU copy of its honest gradient at every step ``s`` such that
    ``s + delay`` is an attack step, and frees it once sent. Memory: up to
    ``min(attack_length, ceil(delay / attack_every))`` flat gradients at once, i.e. up to
    ``attack_length`` times the model size in float32 (500 x 45 MB = 22 GB for ResNet18 with the
    defaults) in CPU RAM on each attacker. Stored gradients are not checkpointed: an attack step
    whose old gradient was never recorded (before step ``delay``, or after a resume) sends the
    honest gradient instead, with a warning.

    Args:
        delay: how many steps old the sent gradient is.
        attack_length: number of attack steps, after which the attack stops.
    """

    def __init__(
        self,
        byzantine: Byzantine,
        delay: int = 1000,
        attack_length: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        if delay < 0 or attack_length < 0:
            raise ValueError(f"delay and attack_length must be >= 0, got delay={delay}, attack_length={attack_length}")
        self.delay = int(delay)
        self.attack_length = int(attack_length)
        self.attack_end = self.attack_start + self.attack_length * self.attack_every
        self._stored: dict[int, Tensor] = {}
        self._warned = False

    def scheduled(self, step: int) -> bool:
        """Like the base schedule, but only within the attack window."""
        return step < self.attack_end and super().scheduled(step)

    def on_before_aggregate(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        if ctx.rank not in self.byzantine or self.caught:
            self._stored.clear()
            return gradient
        for old in [s for s in self._stored if s + self.delay < ctx.step]:
            del self._stored[old]
        if self.scheduled(ctx.step + self.delay):
            self._stored[ctx.step] = gradient.detach().to(device="cpu", dtype=torch.float32, copy=True)
        if self.scheduled(ctx.step) and ctx.step - self.delay not in self._stored:
            if not self._warned:
                log.warning(
                    "peer %d: %s has no gradient from step %d to send at step %d (not recorded before the run "
                    "started or resumed): sending the honest gradient instead",
                    ctx.rank, self.name, ctx.step - self.delay, ctx.step,
                )
                self._warned = True
            return gradient
        return super().on_before_aggregate(gradient, ctx)

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        old = self._stored.pop(ctx.step - self.delay)
        return old.to(device=gradient.device, dtype=gradient.dtype).view_as(gradient)
