"""Who takes part: the active peers and the ban list, with reasons and evidence kinds.

Bans are final for the run. Every honest peer derives the same ban list from the same public
evidence, so membership never needs a vote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Ban", "Membership"]


@dataclass(frozen=True)
class Ban:
    """One ban: who, at which step, why, and what kind of evidence proved it."""

    peer: int
    step: int
    reason: str
    evidence: str
    """``signed-message`` (the culprit's own signed words contradict each other), ``missing-record``
    (nothing published by the deadline), ``recomputation`` (validators recomputed its gradient), ..."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Membership:
    """The peers of the run (stable ids), the banned ones, and a generation counter bumped on every change."""

    peers: list[int]
    bans: list[Ban] = field(default_factory=list)
    generation: int = 0
    max_refuted_claims: int = 3
    """Unprovable claims ("you sent me nothing valid") one peer may raise against another that the accused then
    refutes by publishing a valid copy; one more bans *both*: either may be the Byzantine one (a claimant that
    keeps the board busy, or a sender that keeps sending garbage and then publishing), and banning the pair
    keeps the honest majority."""
    refuted_window: int = 100
    """Refuted claims count for this many steps, then are forgotten: an honest peer's occasional lost message is not
    held against it for the rest of the run."""
    refuted: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """``(claimant, accused)`` -> the steps of its refuted claims still counted."""
    departed: dict[int, int] = field(default_factory=dict)
    """Peers that stopped answering (crashed or disconnected) -> the step: out for the rest of the run, not banned."""

    @property
    def banned(self) -> set[int]:
        return {b.peer for b in self.bans}

    @property
    def active(self) -> list[int]:
        """Peers still in, sorted: the order every aggregation round uses."""
        return sorted(p for p in self.peers if self.is_active(p))

    def is_active(self, peer: int) -> bool:
        return peer in self.peers and peer not in self.banned and peer not in self.departed

    def admit(self, count: int) -> list[int]:
        """``count`` new peers (joining a running group): their ids, the next free ones."""
        new = list(range(len(self.peers), len(self.peers) + int(count)))
        self.peers.extend(new)
        if new:
            self.generation += 1
        return new

    def depart(self, peer: int, step: int) -> bool:
        """``peer`` stopped answering at ``step``; returns False if it was not active."""
        if not self.is_active(peer):
            return False
        self.departed[peer] = step
        self.generation += 1
        return True

    def ban(self, peer: int, step: int, reason: str, evidence: str) -> bool:
        """Ban ``peer``; returns False (and changes nothing) if it was already banned or is unknown. A departed peer can
        be banned (a validation resolved after it left): the ban, unlike a departure, refuses it for good."""
        if peer not in self.peers or peer in self.banned:
            return False
        self.departed.pop(peer, None)
        self.bans.append(Ban(peer, step, reason, evidence))
        self.generation += 1
        return True

    def count_refuted_claim(self, claimant: int, accused: int, step: int) -> list[Ban]:
        """Record that ``claimant``'s unprovable claim against ``accused`` was refuted. Returns the bans this
        calls for (both peers, past the limit), for the caller to apply with :meth:`ban` like any other."""
        key = (claimant, accused)
        recent = [t for t in self.refuted.get(key, []) if t > step - self.refuted_window] + [step]
        self.refuted[key] = recent
        if len(recent) <= self.max_refuted_claims:
            return []
        reason = (f"{len(recent)} unprovable claims by peer {claimant} against peer {accused} within "
                  f"{self.refuted_window} steps, each refuted: both banned")
        return [Ban(p, step, reason, "missing-record") for p in (claimant, accused) if self.is_active(p)]
