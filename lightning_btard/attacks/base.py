"""The attack interface: simulated Byzantine peers as Lightning Callbacks.

An attack names its Byzantine peers (ranks), when it starts and how often it fires. The strategy
calls :meth:`Attack.on_before_aggregate` on every peer once per optimizer step, just before the
flat gradient is aggregated (not in ``on_after_backward``, which fires once per micro-batch under
gradient accumulation); attacks on the data use the ordinary Callback hooks. ``ban_prob`` is the
released BTARD code's cheap detection *simulation*: after each attack the attacker is caught with
this probability and from then on behaves honestly (as if replaced by an honest peer).

Knowledge: a plain attack knows its own gradient; a ``colluding`` one also its fellow attackers' (a channel among
them); an ``omniscient`` one every peer's gradient of the step. A real attacker gets the latter by recomputing
each honest peer's gradient from its verifiable batch (every peer can: ``verifiable_batches.py``); the simulation
hands them over instead, over a channel of all the step's peers that the honest peers' code joins for that purpose
only (an all-gather per attacked step, not a protocol message).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_btard.lightning_package import pl

if TYPE_CHECKING:
    from lightning_btard.protocol.round import Behaviour
    from lightning_btard.transports.base import Transport

__all__ = ["Attack", "AttackContext", "Byzantine", "ProtocolAttack", "byzantine_ranks", "draw_byzantine", "honest_norm", "seeded_direction"]

Byzantine = Union[Sequence[int], Mapping[str, int]]
"""Who attacks: a list of ranks, or ``{"sample": k, "peers": n, "seed": s}`` for the released code's draw
(:func:`draw_byzantine`)."""


def draw_byzantine(sample: int, peers: int, seed: int) -> list[int]:
    """The released code's attackers: ``random.Random(seed).sample(range(1, peers), sample)`` (peer 0, which evaluated,
    never attacks), sorted."""
    if not 0 <= sample < peers:
        raise ValueError(f"cannot draw {sample} attackers among peers 1..{peers - 1}")
    return sorted(random.Random(seed).sample(range(1, peers), sample))


def byzantine_ranks(byzantine: Byzantine) -> list[int]:
    """The attacking ranks a ``byzantine`` argument names (a list, or a draw)."""
    if isinstance(byzantine, Mapping):
        keys = {"sample", "peers", "seed"}
        if set(byzantine) != keys:
            raise ValueError(f"byzantine as a draw needs exactly the keys {sorted(keys)}, got {sorted(byzantine)}")
        return draw_byzantine(int(byzantine["sample"]), int(byzantine["peers"]), int(byzantine["seed"]))
    return sorted({int(r) for r in byzantine})

log = logging.getLogger("lightning_btard.attacks")


@dataclass
class AttackContext:
    """What an attack may know when it fires: the step, who it is, and the run."""

    step: int
    """Optimizer step about to be taken (``trainer.global_step``)."""
    rank: int
    """This peer's id (its global rank on torch.distributed)."""
    world_size: int
    """Peers taking part in this step's aggregation."""
    trainer: Optional["pl.Trainer"] = None
    pl_module: Optional["pl.LightningModule"] = None


class Attack(pl.Callback):
    """Base class of every attack. Subclasses override :meth:`attack_gradient` and/or Callback hooks.

    Args:
        byzantine: ranks of the attacking peers (the same list on every peer).
        attack_start: first step at which the attack fires.
        attack_every: fire every this many steps from ``attack_start``.
        ban_prob: the released code's simulated detection (``None``: no simulation); ``"released"``: the released
            ResNet runs' value, ``1/N * (N - B)/N`` for ``N`` peers and ``B`` attackers (the chance that the one
            validator of a step is honest and checks this attacker).
        seed: seed of the simulation's coin flips and of any shared random choice of the colluders.
        schedule: ``"ours"``: fire at ``attack_start, attack_start + attack_every, ...``; ``"released"``: as the
            released code, at steps ``t > attack_start`` with ``t % attack_every == 0``.
    """

    colluding: ClassVar[bool] = False
    """Whether the attackers exchange their honest gradients among themselves (set up by the strategy)."""
    omniscient: bool = False
    """Whether the attackers know every peer's honest gradient of the step (:attr:`honest_gradients`)."""

    def __init__(
        self,
        byzantine: Byzantine,
        attack_start: int = 0,
        attack_every: int = 1,
        ban_prob: Union[float, Literal["released"], None] = None,
        seed: int = 0,
        schedule: Literal["ours", "released"] = "ours",
    ) -> None:
        super().__init__()
        if attack_every < 1:
            raise ValueError(f"attack_every must be >= 1, got {attack_every}")
        if ban_prob is not None and ban_prob != "released" and not 0.0 <= float(ban_prob) <= 1.0:
            raise ValueError(f"ban_prob must be in [0, 1], 'released' or None, got {ban_prob}")
        if schedule not in ("ours", "released"):
            raise ValueError(f"schedule must be 'ours' or 'released', got {schedule!r}")
        self.byzantine = byzantine_ranks(byzantine)
        self.schedule = schedule
        self.attack_start = int(attack_start)
        self.attack_every = int(attack_every)
        self.ban_prob = ban_prob
        self.seed = int(seed)
        self.caught = False
        self.fired_steps: list[int] = []
        self.collusion: Optional["Transport"] = None
        self.colluders_gradients: Optional[Tensor] = None
        """``[k, d]``: the k colluders' honest gradients of the current step (colluding attacks only)."""
        self.honest_gradients: Optional[Tensor] = None
        """``[h, d]``: the honest peers' gradients of the current step (omniscient attacks only)."""
        self.members: list[int] = []
        """The peers of the step, in the collusion channel's order (set by the strategy)."""
        self._coin: Optional[random.Random] = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def scheduled(self, step: int) -> bool:
        """Whether the schedule fires at ``step`` (for any attacker, caught or not)."""
        if self.schedule == "released":
            return step > self.attack_start and step % self.attack_every == 0
        return step >= self.attack_start and (step - self.attack_start) % self.attack_every == 0

    def is_attacking(self, step: int, rank: int) -> bool:
        """Whether peer ``rank`` attacks at ``step``."""
        return rank in self.byzantine and not self.caught and self.scheduled(step)

    def on_before_aggregate(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        """Called by the strategy on every peer, once per step; returns the gradient this peer sends."""
        if self.ban_prob == "released":  # fixed at the first step this peer takes part in, from the run's peers
            n = ctx.world_size
            self.ban_prob = 1.0 / n * (n - len(self.byzantine)) / n
        if self.omniscient and self.scheduled(ctx.step):  # the same decision on every peer
            self._learn_every_gradient(gradient)  # a collective of every peer of the step
        if ctx.rank not in self.byzantine or not self.scheduled(ctx.step):
            return gradient
        if self.colluding and not self.omniscient:
            if self.collusion is None:
                raise RuntimeError(f"{self.name} is a colluding attack but the strategy gave it no collusion channel")
            k, d = self.collusion.world_size, gradient.numel()
            peers = self.collusion.gather_parts(gradient, [d] * k).view(k, d)
            self.colluders_gradients = peers
        if self.caught:
            return gradient
        out = self.attack_gradient(gradient, ctx)
        self._record(ctx)
        return out

    def _learn_every_gradient(self, gradient: Tensor) -> None:
        if self.collusion is None:
            raise RuntimeError(f"{self.name} is omniscient but the strategy gave it no channel of all peers")
        n, d = self.collusion.world_size, gradient.numel()
        every = self.collusion.gather_parts(gradient.reshape(-1), [d] * n).view(n, d)
        members = self.members or list(range(n))
        byz = [m for m, peer in enumerate(members) if peer in self.byzantine]
        honest = [m for m, peer in enumerate(members) if peer not in self.byzantine]
        self.honest_gradients = every[honest]
        self.colluders_gradients = every[byz]

    def behaviour(self, ctx: AttackContext) -> Optional["Behaviour"]:
        """This peer's conduct in a verified round when the attack fires (protocol attacks), else ``None``."""
        return None

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        """The malicious gradient to send instead of ``gradient`` (default: unchanged, for data attacks)."""
        return gradient

    def _record(self, ctx: AttackContext) -> None:
        self.fired_steps.append(ctx.step)
        if len(self.fired_steps) == 1 or len(self.fired_steps) % 100 == 0:
            log.warning("peer %d: %s fired at step %d (%d times so far)", ctx.rank, self.name, ctx.step, len(self.fired_steps))
        if self.ban_prob is not None:
            if self._coin is None:
                self._coin = random.Random(f"{self.seed}/{ctx.rank}/{self.name}")
            if self._coin.random() < float(self.ban_prob):
                self.caught = True
                log.warning("peer %d: %s simulated ban at step %d (ban_prob=%s): honest from now on", ctx.rank, self.name, ctx.step, self.ban_prob)

    def fired_at(self, step: int) -> bool:
        """Whether this peer fired the attack at ``step`` (the strategy logs it once per step)."""
        return bool(self.fired_steps) and self.fired_steps[-1] == step

    def state_dict(self) -> dict[str, Any]:
        return {"caught": self.caught, "fired_steps": list(self.fired_steps), "coin": self._coin.getstate() if self._coin else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.caught = state_dict["caught"]
        self.fired_steps = list(state_dict["fired_steps"])
        if state_dict.get("coin") is not None:
            self._coin = random.Random()
            self._coin.setstate(state_dict["coin"])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(byzantine=tuple(self.byzantine), start=self.attack_start)

    def __repr__(self) -> str:
        return f"{self.name}(byzantine={self.byzantine}, attack_start={self.attack_start}, attack_every={self.attack_every}, ban_prob={self.ban_prob})"


def honest_norm(gradient: Tensor) -> Tensor:
    """Norm of this peer's honest gradient, in float64 (what scaled attacks measure against)."""
    return gradient.double().norm().to(gradient.dtype)


def seeded_direction(numel: int, seed: int, like: Tensor) -> Tensor:
    """A unit random direction that every colluder derives identically from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(numel, generator=gen, dtype=torch.float64)
    return (z / z.norm()).to(dtype=like.dtype, device=like.device)


class ProtocolAttack(Attack):
    """An attack on the verification protocol (needs ``BTARDStrategy(verify=True)``): when it fires, the
    peer's conduct in the round is :meth:`conduct`'s :class:`~lightning_btard.protocol.round.Behaviour`."""

    def conduct(self, ctx: AttackContext) -> "Behaviour":
        raise NotImplementedError

    def behaviour(self, ctx: AttackContext) -> Optional["Behaviour"]:
        return self.conduct(ctx) if self.is_attacking(ctx.step, ctx.rank) else None
