"""Validation by recomputation (steps 8-9 of ``docs/design.md``).

After step ``t``'s round, its shared seed ``zeta_t`` picks ``m`` validators and, for each, a target
peer. In step ``t+1`` a validator skips its own gradient (it joins the round with weight 0) and
instead recomputes its target's gradient of step ``t``: from a kept copy of the parameters ``x_t``,
on the target's verifiable batch, with the target's step seed. It compares the recomputation with the
projections ``p_target^j = <z^j, g_target^j>`` the target published in step ``t``'s round, on
directions drawn after every gradient was committed. A mismatch is an accusation on the board; every
remaining peer then recomputes the target's gradient itself, and bans the target if the accusation
holds, the accuser if it does not.

**[ours]** The paper compares hashes, which needs bit-exact recomputation. Projections tolerate float
non-determinism across machines: a recomputation error ``e`` with ``||e|| <= rtol ||g||`` moves
``<z, g>`` by ``N(0, ||e||^2)``, so ``7 rtol ||g^j||`` errs with probability ~3e-12 per direction, while
a gradient that differs from the honest one by ``delta`` escapes a direction with probability about
``7 rtol ||g|| / ||delta||`` — and there are ``k`` directions in each of ``n`` parts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lightning_btard.ops.finite import all_finite
from lightning_btard.ops.norms import rounding_floor, safe_norm
from lightning_btard.ops.projection import accurate_dots, clipped_projections, random_directions
from lightning_btard.ops.workspace import SCRATCH
from lightning_btard.protocol import records
from lightning_btard.protocol.digest import digest
from lightning_btard.protocol.membership import Ban
from lightning_btard.protocol.round import RoundConfig
from lightning_btard.transports.base import Transport

__all__ = ["Assignment", "RecomputationDisagrees", "StepRecord", "ValidationCheck", "assign_validators", "resolve_validations"]



@dataclass(frozen=True)
class Assignment:
    validator: int
    target: int


@dataclass
class StepRecord:
    """What a completed round leaves for validating its step: who took part and what they published."""

    step: int
    peers: list[int]
    sizes: list[int]
    seed: bytes
    projections: dict[int, list[list[float]]]
    """Per peer, per part: the published ``p = <z^j, g^j>`` on the step's ``k`` directions."""
    contributors: list[int]
    """Peers whose gradient counted (weight > 0): the possible targets."""
    batch_idx: int = 0
    """Lightning's ``batch_idx`` of the step's first micro-batch (the same on every peer)."""
    directions: int = 2
    micro_batches: int = 1
    """Micro-batches the step had (an epoch's last step may have fewer than the accumulation)."""
    grad_scale: Optional[float] = None
    """The fp16 loss scale of the step, if any (a recomputation scales its loss the same way)."""
    assignments: list[Assignment] = field(default_factory=list)
    """The validators of the *next* step, drawn from this step's seed."""
    numbers: dict[int, list[list]] = field(default_factory=dict)
    """Per peer, per part: everything it published, ``[s, ||g - G||, p, ||g||]`` (empty: only ``p`` is checked)."""
    aggregate: Optional[Tensor] = None
    """The step's aggregate ``G`` (all parts), against which ``s`` and ``||g - G||`` are recomputed."""
    tau: float = 1.0
    """The round's CenteredClip radius (``s = min(1, tau / ||g - G||) <z, g - G>``)."""

    def direction(self, j: int, device: torch.device) -> Tensor:
        """Part ``j``'s ``[k, size]`` directions, drawn again from the seed (a round holds one part's at a time)."""
        shape = (self.directions, self.sizes[j])
        return random_directions(self.seed, j, self.sizes[j], self.directions, device,
                                 out=SCRATCH.view("vector", shape, torch.float32, device))


def assign_validators(seed: bytes, peers: Sequence[int], count: int, targets: Sequence[int]) -> list[Assignment]:
    """``count`` distinct validators among ``peers``, each with a target among ``targets`` other than itself.

    The same on every peer for the same seed, and unpredictable before the seed (the last MPRNG reveal).
    At most ``len(peers) - 1`` validators: somebody's gradient must count in the next step."""
    rng = random.Random(int.from_bytes(digest("validators", seed), "little"))
    chosen = rng.sample(sorted(peers), min(max(count, 0), len(peers) - 1))
    out = []
    for v in chosen:
        candidates = sorted(t for t in targets if t != v)
        if candidates:
            out.append(Assignment(v, rng.choice(candidates)))
    return out


@dataclass(frozen=True)
class ValidationCheck:
    """Every number a peer published about each of its parts, against the recomputed part ``g^j`` (error ``e``,
    ``||e|| <= rtol ||g^j||`` across machines), each direction's with ``sigmas`` standard deviations of ``<z, e>``
    and float32's resolution near zero (``floor``):

    - ``|p - <z, g>| <= sigmas rtol ||g|| + floor``;
    - ``||g||`` and ``||g - G||`` within ``sigmas rtol ||g|| + floor`` (each moves by at most ``||e||``);
    - ``s = c <z, g - G>`` (``c = min(1, tau / ||g - G||)``) within ``sigmas rtol ||g|| (c + |s| / ||g - G||) + floor``
      (``<z, g - G>`` moves by ``<z, e>``, and ``c`` by at most ``c ||e|| / ||g - G||``);
    - and ``||g - G||`` and ``s`` also within the float error they carry on their own scale, ``number_rtol ||g - G||``
      and ``number_rtol (|s| + c ||g - G||)``: what the round's recheck of the same numbers allows. Both are computed
      against the aggregate, so they are as large as ``||g - G||`` even where ``||g||`` is 0 (a part whose parameters
      had no gradient that step), and their rounding is not covered by a tolerance relative to ``||g||``: an honest
      peer with such a part was banned by its own recomputation (its two computations summed in different orders).

    ``s`` and the norms are checked when the record keeps them and the step's aggregate: so an aggregator's numbers
    for its own part, and a sender's for a part whose aggregator colludes with it, are checked whenever their
    author is validated."""

    rtol: float = 1e-3
    sigmas: float = 7.0
    number_rtol: float = RoundConfig.number_rtol
    """The float error of a published number on its own scale (the round's :attr:`RoundConfig.number_rtol`)."""

    def agrees(self, record: StepRecord, peer: int, recomputed: Tensor) -> bool:
        published = record.projections.get(peer)
        full = record.numbers.get(peer) if record.aggregate is not None else None
        if published is None or len(published) != len(record.sizes) or recomputed.numel() != sum(record.sizes):
            return False
        if full is not None and len(full) != len(record.sizes):
            return False
        aggregates = torch.split(record.aggregate, record.sizes) if record.aggregate is not None else None
        for j, part in enumerate(torch.split(recomputed, record.sizes)):
            z = record.direction(j, part.device)
            try:
                theirs = torch.tensor([float(v) for v in published[j]], dtype=torch.float64)
            except (TypeError, ValueError):
                return False
            if theirs.shape != (z.shape[0],) or not bool(torch.isfinite(theirs).all()):
                return False
            norm = float(safe_norm(part))
            floor = rounding_floor(part.numel())
            tol = self.sigmas * self.rtol * norm + floor
            if not math.isfinite(tol):
                return False
            if full is None or aggregates is None:
                if bool(((theirs - accurate_dots(z, part.float()).cpu()).abs() > tol).any()):
                    return False
                continue
            s, dist, p = clipped_projections(z, part, aggregates[j].to(part.device), record.tau)
            if bool(((theirs - p.cpu()).abs() > tol).any()) or not self._numbers_agree(full[j], s.cpu(), dist, norm, tol, floor, record.tau):
                return False
        return True

    def _numbers_agree(self, published: list, s: Tensor, dist: float, norm: float, tol: float, floor: float, tau: float) -> bool:
        pub_s, pub_dist, _, pub_norm = published  # well formed: the round checked every member's numbers
        if abs(pub_norm - norm) > tol or abs(pub_dist - dist) > tol + self.number_rtol * dist:
            return False
        c = min(1.0, tau / dist) if dist > 0 else 1.0
        s_tol = (self.sigmas * self.rtol * norm * (c + s.abs() / max(dist, 1e-300)) + self.number_rtol * (s.abs() + c * dist)
                 + floor)
        return not bool(((torch.tensor(pub_s, dtype=torch.float64) - s).abs() > s_tol).any())


class RecomputationDisagrees(RuntimeError):
    """This peer's recomputation of an accused gradient contradicts the verdict of the majority of peers."""


def resolve_validations(
    transport: Transport,
    peers: Sequence[int],
    claims: list[int],
    record: StepRecord,
    recompute: Callable[[int], Tensor],
    check: ValidationCheck,
    step: int,
) -> list[Ban]:
    """Publish my accusations (targets whose recomputation disagreed) and judge everybody's.

    ``peers[i]`` is the transport's member ``i``; ``recompute(peer)`` returns that peer's gradient of
    ``record.step`` as this peer recomputes it. Only assigned validators may accuse (anything else is a
    protocol violation and bans its author); each accused target is recomputed once by every peer, and the peers
    vote (one more board round, only when somebody accused): the strict majority's verdict bans the target or the
    accuser on every peer alike. A peer whose own verdict contradicts the majority's raises
    :class:`RecomputationDisagrees` (its data or ``training_step`` is not deterministic like the others')."""
    board = transport.all_gather_object(list(claims))
    assigned = set(record.assignments)
    bans: dict[int, Ban] = {}

    def ban(peer: int, reason: str, evidence: str) -> None:
        bans.setdefault(peer, Ban(peer, step, reason, evidence))

    accusations: list[tuple[int, int]] = []  # (accuser, target)
    for member, items in enumerate(board):
        accuser = peers[member]
        targets = records.validation_claims(items, max_items=len(peers))
        if targets is None:
            ban(accuser, "malformed validation record", "signed-message")
            continue
        for target in targets:
            if Assignment(accuser, target) not in assigned:
                ban(accuser, f"accusation outside its validation assignment (target {target!r})", "signed-message")
            elif target in record.peers:  # a target that left since (withheld, crashed) is judged all the same
                accusations.append((accuser, target))
    if not accusations:
        return list(bans.values())
    mine: dict[int, int] = {}  # target -> 1 (recomputes as published), 0 (differs), -1 (overflowed: no verdict)
    for _, target in accusations:
        if target not in mine:
            recomputed = recompute(target)
            mine[target] = (int(check.agrees(record, target, recomputed)) if all_finite(recomputed) else -1)
    votes = transport.all_gather_object(sorted([t, v] for t, v in mine.items()))
    for accuser, target in accusations:
        tally = [_vote(v, target) for v in votes]
        honest_target, guilty = tally.count(1), tally.count(0)
        verdict = 1 if 2 * honest_target > len(votes) else 0 if 2 * guilty > len(votes) else None
        if verdict is None:
            continue  # no majority either way (e.g. the recomputations overflowed): nobody is banned for it
        if mine[target] in (0, 1) and mine[target] != verdict:
            raise RecomputationDisagrees(
                f"BTARD: step {step}: this peer's recomputation of peer {target}'s gradient of step {record.step} "
                f"{'differs from' if mine[target] == 0 else 'matches'} what it published, but the majority of peers found "
                f"the opposite ({honest_target} as published, {guilty} not, of {len(votes)}). This peer's data or "
                "training_step is not deterministic like the others' (a different dataset or data order, an unseeded "
                "random draw, rank-dependent code, different library versions or hardware): it stops rather than train "
                "on alone."
            )
        if verdict:
            ban(accuser, f"false accusation: peer {target}'s gradient of step {record.step} recomputes as published", "recomputation")
        else:
            ban(target, f"its gradient of step {record.step} is not the one its batch gives (validated by peer {accuser}, "
                        "recomputed by every peer)", "recomputation")
    return list(bans.values())


def _vote(votes: object, target: int) -> int:
    """A member's verdict on ``target`` from its vote record (``[[target, verdict], ...]``): -1 if none or malformed."""
    if type(votes) is not list:
        return -1
    for entry in votes:
        if type(entry) is list and len(entry) == 2 and type(entry[0]) is int and entry[0] == target and type(entry[1]) is int:
            return entry[1] if entry[1] in (0, 1) else -1
    return -1
