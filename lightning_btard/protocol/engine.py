"""The peer engine: one optimizer step's aggregation on one peer, with no framework around it.

Given a :class:`~lightning_btard.groups.base.Group`, an aggregator and a ``recompute`` callback, it runs
everything between "this peer's flat gradient is ready" and "here is the agreed aggregate":

1. **validation of the previous step** (protocol steps 8-9): the validators drawn from the previous round's
   seed publish their verdicts, accusations are judged by recomputation (``recompute``), bans applied;
2. the **fp16 overflow vote** (with a loss scale): a step a strict majority of peers overflowed is skipped by every
   peer (their loss scalers back off alike); otherwise the peers that overflowed abstain (weight 0, zeros sent), so
   that a minority's vote costs only itself;
3. the **round**: verified (:func:`~.round.verified_round`) or not (:func:`~.butterfly.butterfly_aggregate`),
   **re-run without banned peers** until one completes (step 7);
4. the **step record** the next step's validators check, and who validates in the next step;
5. **regroups**: a collective that fails because a member fell silent is followed, where the group can
   recover (hivemind, in-process), by a regroup and a new attempt; the regrouped step goes unvalidated.

The glue (``BTARDStrategy``) supplies the gradient, the parameters a validator recomputes from, and
what to do when this peer is banned; everything else about a step is decided here, identically on every
honest peer, and is testable in-process in seconds (``tests/protocol/test_engine.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import Aggregator
from lightning_btard.errors import UserError
from lightning_btard.groups.base import Group, NoMajority
from lightning_btard.ops.finite import all_finite
from lightning_btard.ops.partition import part_sizes
from lightning_btard.ops.workspace import Workspace
from lightning_btard.protocol.agreement import strict_majority
from lightning_btard.protocol.butterfly import ButterflyStats, butterfly_aggregate
from lightning_btard.protocol.digest import digest
from lightning_btard.protocol.events import EventLog
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.membership import Ban
from lightning_btard.protocol.round import Behaviour, RoundConfig, RoundOutcome, verified_round
from lightning_btard.protocol.validation import StepRecord, ValidationCheck, assign_validators, resolve_validations
from lightning_btard.transports.base import TransportError

__all__ = ["MAX_REGROUPS_PER_STEP", "METRIC_KEYS", "PeerEngine", "Recompute", "announced_at", "round_config_of"]

log = logging.getLogger(__name__)

MAX_REGROUPS_PER_STEP = 3
"""A step whose collectives fail more often than this stops the peer (``NoMajority``): every regroup removes the
members reported silent (``groups/silence.py``), so a group that keeps failing is not making progress."""

METRIC_KEYS = ("peers", "banned", "retries", "clipped", "cc_iterations", "cc_residual", "malformed", "mbytes_sent")
"""Logged after every aggregated step on both paths (verified or not), with ``time_<phase>`` for each phase the
path has and, under validation, ``validations``, ``validation_bans``, ``validation_agreed`` (on a validator)."""

Recompute = Callable[[StepRecord, int], Tensor]
"""``recompute(record, peer)``: peer ``peer``'s flat gradient of ``record.step``, as this peer recomputes it."""


def round_config_of(aggregator: Aggregator, directions: int = 2) -> RoundConfig:
    """The verified round's configuration from the aggregator object the unverified path uses: ``tau``, ``eps``
    (absolute residual target) and ``max_iters`` mean the same thing on both paths."""
    missing = [a for a in ("tau", "eps", "max_iters") if not hasattr(aggregator, a)]
    if missing:
        raise ValueError(f"a verified round checks CenteredClip: {aggregator!r} has no {', '.join(missing)}")
    return RoundConfig(
        tau=float(aggregator.tau), eps=float(aggregator.eps), max_iters=int(aggregator.max_iters),  # type: ignore[attr-defined]
        rel_eps=float(getattr(aggregator, "rel_eps", RoundConfig.rel_eps)), directions=int(directions),
    )


def announced_at(step: int) -> Callable[[Any], bool]:
    """Whether a regroup announcement ``(step, stand_in)`` is at ``step`` (a malformed one, or one from another step,
    is left out; exact types: a peer's value is never compared with ``==`` where it could be a tensor)."""

    def accept(state: Any) -> bool:
        return (type(state) in (tuple, list) and len(state) == 2 and type(state[0]) is int and state[0] == int(step)
                and type(state[1]) is bool)

    return accept


@dataclass
class _Validating:
    record: StepRecord
    target: int


class PeerEngine:
    """One peer's side of every step's aggregation (see the module doc).

    Args:
        group: the members and the transport over them.
        aggregator: the rule every aggregator applies to its part (CenteredClip under ``verify``).
        verify: run the verified round (commitments, MPRNG, projection checks, accusations, bans).
        identity, keys: this peer's signing key and every peer's public key, by peer id (with ``verify``).
        validators: validators per step (with ``verify``); 0 turns validation off.
        validation_check: how a validator compares a recomputation with the published projections.
        directions: secret directions per part for the projection check.
        on_banned: called with this peer's ban when it is banned; it may end the process. If it returns, this
            peer runs no more collectives (:attr:`left`).
        on_group_change: called (on the active peers) after the group changed: a ban, a regroup or an admission.
        events: where bans and regroups are reported.
    """

    def __init__(
        self,
        group: Group,
        aggregator: Aggregator,
        *,
        verify: bool = False,
        identity: Optional[Identity] = None,
        keys: Sequence[bytes] = (),
        run_nonce: bytes = b"",
        validators: int = 0,
        validation_check: ValidationCheck = ValidationCheck(),
        directions: int = 2,
        topology: str = "butterfly",
        on_banned: Callable[[Ban], None] = lambda ban: None,
        on_group_change: Callable[[], None] = lambda: None,
        events: Optional[EventLog] = None,
    ) -> None:
        if verify and identity is None:
            raise ValueError("a verified engine needs this peer's identity and every peer's key")
        if verify and topology != "butterfly":
            raise ValueError("the verified round is a butterfly: topology='server' needs verify=False")
        self.group, self.aggregator, self.verify, self.topology = group, aggregator, bool(verify), topology
        self.identity, self.keys = identity, list(keys)
        self.run_nonce = run_nonce or digest("run", *self.keys)
        """Unique to the run (its peers' fresh keys): bound into every signature, with the attempt."""
        self._tries: tuple[int, int] = (-1, 0)  # (step, verified rounds tried in it)
        self.validators = int(validators) if verify else 0
        self.validation_check = validation_check
        self.round_config = round_config_of(aggregator, directions) if verify else RoundConfig(directions=directions)
        self.on_banned, self.on_group_change = on_banned, on_group_change
        self.events = events if events is not None else EventLog()
        self.record: Optional[StepRecord] = None
        """The last completed round's record, which the next step's validators check."""
        self.validating: Optional[_Validating] = None
        """This step's validation task (this peer validates ``target``'s gradient of ``record.step``)."""
        self.left = False
        """Banned, and finishing without the others: no more collectives."""
        self.broken: Optional[TransportError] = None
        """A failed collective, not yet followed by a regroup."""
        self.unvalidated_step: Optional[int] = None
        """The step of the last regroup: nobody validates it (its gradients may be validators' recomputations)."""
        self.stand_ins: set[int] = set()
        self._resolved_step: Optional[int] = None
        """The step whose validation was last resolved (kept across a regroup until then)."""
        """In the regrouped step: the peers whose gradient was a recomputation (they contribute weight 0)."""
        self.metrics: dict[str, float] = {}
        """The last aggregated step's metrics (:data:`METRIC_KEYS` and phase times); empty after a skipped step."""
        self._validation_metrics: dict[str, float] = {}
        self._work = Workspace()

    # ------------------------------------------------------------------ who is who
    @property
    def membership(self) -> Any:
        return self.group.membership

    @property
    def transport(self) -> Any:
        return self.group.transport

    @property
    def me(self) -> int:
        return self.group.peer

    # ------------------------------------------------------------------ the validator schedule
    def previous_record(self, step: int) -> Optional[StepRecord]:
        """The record of step ``step - 1``, which ``step``'s validators check (none after a skipped step, a regroup,
        an admission or a resume)."""
        return self.record if self.record is not None and self.record.step == step - 1 else None

    def begin_step(self, step: int, kept: Callable[[int], bool] = lambda step: True) -> Optional[_Validating]:
        """Whether this peer validates in ``step``, and whom: it does if the previous step's seed assigned it and
        ``kept(record.step)`` (it still holds the parameters of that step to recompute from)."""
        self.validating = None
        record = self.previous_record(step)
        if record is not None and kept(record.step):
            mine = [a.target for a in record.assignments if a.validator == self.me]
            if mine:
                self.validating = _Validating(record, mine[0])
        return self.validating

    def validators_now(self, step: int) -> set[int]:
        """The peers that validate (and contribute weight 0) in ``step``: public, from the previous step's seed."""
        if step == self.unvalidated_step:
            return set(self.stand_ins)
        record = self.previous_record(step)
        return {a.validator for a in record.assignments} if record is not None else set()

    # ------------------------------------------------------------------ one step
    def step(
        self,
        sent: Tensor,
        step: int,
        *,
        computed: Optional[Tensor] = None,
        recompute: Optional[Recompute] = None,
        behaviour: Optional[Behaviour] = None,
        overflow_vote: bool = False,
        fast_path: bool = False,
        batch_idx: int = 0,
        micro_batches: int = 1,
        grad_scale: Optional[float] = None,
        after: Optional[Callable[[], Any]] = None,
    ) -> Optional[Tensor]:
        """Aggregate ``sent`` (this peer's flat gradient as it sends it) over the group at ``step``.

        ``computed`` is the gradient this peer computed (``sent`` before any attack; on a validator's fast path, its
        recomputation of its target's gradient). Returns the aggregate (a buffer reused by the next step), ``None``
        when the step is skipped by every peer (``overflow_vote``: a majority's gradients were not finite), or ``sent``
        itself once this peer has left. ``after()`` runs inside the step's attempt (a collective of the glue's).
        The aggregate is read-only: the next step's validators read it as this step's record."""
        computed = sent if computed is None else computed
        self.metrics = {}
        started = time.perf_counter()
        out = self._with_regroup(step, fast_path, lambda: self._attempt(
            sent, computed, step, recompute, behaviour or Behaviour(), overflow_vote, fast_path,
            batch_idx, micro_batches, grad_scale, after))
        if self.metrics:
            self.metrics["time_aggregation"] = time.perf_counter() - started
        return out

    def _attempt(self, sent: Tensor, computed: Tensor, step: int, recompute: Optional[Recompute], behaviour: Behaviour,
                 overflow_vote: bool, fast_path: bool, batch_idx: int, micro_batches: int, grad_scale: Optional[float],
                 after: Optional[Callable[[], Any]]) -> Optional[Tensor]:
        if self.left:
            return sent
        abstaining: set[int] = set()
        if overflow_vote:
            voted = self._overflow_votes(computed)
            if voted is None:
                return None
            abstaining = voted
            if self.me in abstaining:
                sent = torch.zeros_like(sent)  # weighs 0: anything finite does
        if self.verify:
            aggregate = self._verified(sent, computed, step, recompute, behaviour, fast_path, batch_idx, micro_batches,
                                       grad_scale, abstaining)
        else:
            # where a failed try is retried after regrouping, keep the gradient and aggregate elsewhere
            out = self._work.get("aggregate", (sent.numel(),), sent.dtype, sent.device) if self.group.recoverable else sent
            active = self.membership.active
            weights = torch.tensor([0.0 if p in abstaining else 1.0 for p in active]) if abstaining else None
            aggregate, stats = butterfly_aggregate(sent, self.transport, self.aggregator, weights=weights, out=out,
                                                   topology=self.topology)
            self.metrics = self._unverified_metrics(stats)
        if self.metrics:
            self.metrics["abstained"] = float(len(abstaining))
        if after is not None and not self.left:
            after()
        return aggregate

    def _overflow_votes(self, flat: Tensor) -> Optional[set[int]]:
        """The peers whose gradient overflowed (``True`` on the board; anything else counts as no overflow), or
        ``None`` when they are a strict majority: then every peer skips the step."""
        votes = self.transport.all_gather_object(not all_finite(flat))
        active = self.membership.active
        voters = {active[i] for i, v in enumerate(votes) if v is True}
        return None if 2 * len(voters) > len(votes) else voters

    def _verified(self, sent: Tensor, computed: Tensor, step: int, recompute: Optional[Recompute], behaviour: Behaviour,
                  fast_path: bool, batch_idx: int, micro_batches: int, grad_scale: Optional[float],
                  abstaining: set[int]) -> Tensor:
        """Validation of the previous step, then verified rounds among the active peers until one completes (banned
        peers are dropped between tries)."""
        assert self.identity is not None
        self._validate(computed, step, recompute, behaviour, fast_path)
        if self.left:
            return sent
        validating = self.validators_now(step)
        retries = 0
        while True:
            active = self.membership.active
            own = [0.0 if p in validating or p in abstaining else 1.0 for p in active]  # who sent its own gradient
            weights = own if any(own) else [1.0] * len(active)  # nobody else left (a ban): the stand-ins count
            outcome = verified_round(
                sent, self.transport, self.identity, [self.keys[p] for p in active], active, step, self.round_config,
                behaviour, weights, out=self._work.get("aggregate", (sent.numel(),), torch.float32, sent.device),
                context=self._next_attempt(step),
            )
            # the limit on unprovable claims between two peers: past it both are banned (the round itself stands)
            limited = [b for c, a in outcome.refuted for b in self.membership.count_refuted_claim(c, a, step)]
            if outcome.aggregate is not None:
                if limited:
                    self.apply_bans(limited)
                self.metrics = self._verified_metrics(outcome, active, retries, sent.numel())
                self._remember(step, active, own, outcome, batch_idx, micro_batches, grad_scale)
                return outcome.aggregate.to(sent.device)
            retries += 1
            self.apply_bans(outcome.bans + limited)
            if self.left:
                return sent

    def _next_attempt(self, step: int) -> bytes:
        """The context of the next verified round of ``step``: run nonce, group generation and attempt number (a
        retry after a ban, or the redo after a regroup, is a new attempt: nothing signed in another counts)."""
        last_step, tries = self._tries
        self._tries = (step, tries + 1 if last_step == step else 1)
        return digest("attempt", self.run_nonce, self.membership.generation, self._tries[1])

    def _validate(self, computed: Tensor, step: int, recompute: Optional[Recompute], behaviour: Behaviour,
                  fast_path: bool) -> None:
        """Publish this validator's verdict and judge every accusation (by recomputing); apply the bans."""
        self._validation_metrics = {}
        record = self.previous_record(step)
        if not self.validators or record is None or not record.assignments or record.step == self._resolved_step:
            return
        if recompute is None:
            raise ValueError("validation needs a recompute callback")
        started = time.perf_counter()

        def recompute_accused(peer: int) -> Tensor:
            log.warning("BTARD: step %d: recomputing peer %d's gradient of step %d (accused by its validator)",
                        step, peer, record.step)
            return recompute(record, peer)

        claims: list[int] = []
        if self.validating is not None:
            target = self.validating.target
            # on the fast path (no accumulation) this step's own gradient is the recomputation
            mine = computed if fast_path else recompute(record, target)
            agrees = self.validation_check.agrees(record, target, mine) if all_finite(mine) else True
            claims = behaviour.validation_claims(step, target, agrees)
            self._validation_metrics["validation_agreed"] = float(agrees)
        bans = resolve_validations(self.transport, self.membership.active, claims, record, recompute_accused,
                                   self.validation_check, step)
        self._resolved_step = record.step  # a redo of this step after a regroup does not judge it again
        self._validation_metrics["validations"] = float(len(record.assignments))
        self._validation_metrics["time_validation"] = time.perf_counter() - started
        self._validation_metrics["validation_bans"] = float(len(bans))
        if bans:
            self.apply_bans(bans)

    def _remember(self, step: int, active: list[int], weights: list[float], outcome: RoundOutcome, batch_idx: int,
                  micro_batches: int, grad_scale: Optional[float]) -> None:
        """What the next step's validators check: this round's published projections and the next validators, whose
        targets are the peers that sent their own gradient (``weights`` > 0: never a validator's stand-in, which is a
        recomputation of another peer's gradient)."""
        if not self.validators or step == self.unvalidated_step:
            return
        assert outcome.seed is not None
        contributors = [p for p, w in zip(active, weights) if w > 0]
        record = StepRecord(
            step=step, peers=list(active), sizes=list(outcome.sizes), seed=outcome.seed,
            projections={p: [list(nums[2]) for nums in outcome.numbers[i]] for i, p in enumerate(active)},
            numbers={p: outcome.numbers[i] for i, p in enumerate(active)},
            aggregate=self._kept_aggregate(outcome.aggregate),
            tau=self.round_config.tau,
            contributors=contributors, batch_idx=int(batch_idx), directions=self.round_config.directions,
            micro_batches=int(micro_batches), grad_scale=grad_scale,
        )
        record.assignments = assign_validators(outcome.seed, active, self.validators, contributors)
        self.record = record

    def _kept_aggregate(self, aggregate: Optional[Tensor]) -> Optional[Tensor]:
        """The aggregate the next step's validators check. Where a failed collective is fatal (a static group), the
        round's own output buffer: the next step's round writes it only after the next step's validation has read it
        (callers treat the returned aggregate as read-only). Where a group regroups and redoes a step, that redo judges
        the previous step again after a round of the step began writing the buffer: then a copy."""
        if aggregate is None or not self.group.recoverable:
            return aggregate
        return self._work.get("validated_aggregate", tuple(aggregate.shape), aggregate.dtype, aggregate.device).copy_(aggregate)

    # ------------------------------------------------------------------ metrics (one schema on both paths)
    def _unverified_metrics(self, stats: ButterflyStats) -> dict[str, float]:
        summary = stats.summary()
        return {
            "peers": float(self.transport.world_size), "banned": float(len(self.membership.bans)), "retries": 0.0,
            "clipped": summary["clipped"], "cc_iterations": summary["iterations"], "cc_residual": summary["residual"],
            "malformed": summary["malformed"], "mbytes_sent": stats.bytes_sent / 2**20,
            **{k: v for k, v in summary.items() if k.startswith("time_")},
        }

    def _verified_metrics(self, outcome: RoundOutcome, active: list[int], retries: int, numel: int) -> dict[str, float]:
        n = len(active)
        sizes = part_sizes(numel, n)
        me = active.index(self.me)
        # parts out, my aggregate out (as unverified), my own part to its checkers
        sent_bytes = 4 * ((numel - sizes[me]) + (n - 1) * sizes[me] + (len(outcome.checkers) * sizes[me]))
        return {
            "peers": float(n), "banned": float(len(self.membership.bans)), "retries": float(retries),
            "clipped": outcome.stats.get("clipped", 0.0), "cc_iterations": outcome.stats.get("iterations", 0.0),
            "cc_residual": outcome.stats.get("residual", 0.0), "malformed": 0.0, "mbytes_sent": sent_bytes / 2**20,
            **{k: v for k, v in outcome.stats.items() if k.startswith("time_")},
            **self._validation_metrics,
        }

    # ------------------------------------------------------------------ bans and regroups
    def apply_bans(self, bans: Sequence[Ban]) -> None:
        """Record bans; a banned peer leaves (``on_banned``), the others continue in a group of the remaining peers."""
        new = [b for b in bans if self.membership.ban(b.peer, b.step, b.reason, b.evidence)]
        for ban in new:
            self.events.emit("ban", ban.step, [ban.peer], ban.reason, ban.evidence, self.membership.active)
        mine = next((b for b in self.membership.bans if b.peer == self.me), None) if self.me in self.membership.banned else None
        if mine is not None:
            self.events.emit("left", mine.step, [mine.peer], mine.reason, mine.evidence)
            self.left = True
            self.group.leave()
            self.on_banned(mine)
            return
        if new:
            self.group.rebuild()
            self.on_group_change()

    def _with_regroup(self, step: int, fast_path: bool, attempt: Callable[[], Any]) -> Any:
        """``attempt()``; where the group can recover, a collective that fails (a member stopped answering) is
        followed by a regroup among the members still there, and the attempt is made again in the new group; at most
        :data:`MAX_REGROUPS_PER_STEP` times per step (each regroup removes whoever was silent: more means no progress)."""
        regroups = 0
        while True:
            if self.broken is not None:
                regroups += 1
                if regroups > MAX_REGROUPS_PER_STEP:
                    raise NoMajority(f"BTARD: step {step}: the group failed {regroups} times in this step (at most "
                                     f"{MAX_REGROUPS_PER_STEP} regroups per step); last failure: {self.broken}")
                self._regroup(step, fast_path)
            try:
                return attempt()
            except TransportError as err:
                if not self.group.recoverable:
                    raise
                log.warning("BTARD: step %d: a collective failed: %s", step, err)
                self.broken = err

    def tolerant(self, attempt: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """A collective outside the aggregation (logging, barriers, broadcasts): after a failure where the group can
        recover, this peer stops calling collectives (``fallback()``) until the next aggregation regroups."""
        if self.broken is not None or self.left:
            return fallback()
        try:
            return attempt()
        except TransportError as err:
            if not self.group.recoverable:
                raise
            log.warning("BTARD: a collective failed (%s); regrouping at the next aggregation", err)
            self.broken = err
            return fallback()

    def _regroup(self, step: int, fast_path: bool) -> None:
        """Continue with the members still answering; the others leave the run (departed, not banned)."""
        failure, self.broken = self.broken, None
        assert failure is not None
        active = self.membership.active
        stand_in = bool(fast_path and self.validating is not None)  # my gradient is a recomputation

        recovery = self.group.recover(step, (int(step), stand_in), failure, announced_at(step))
        # the previous step is validated in the new group unless that was done before the failure (a peer that
        # withholds to escape its validation is judged all the same); this step's gradients go unvalidated: a peer on
        # the validators' fast path holds a recomputation, not its own gradient (it contributes weight 0)
        if self.record is not None and self.record.step == self._resolved_step:
            self.record = None
        self.unvalidated_step = step
        self.stand_ins = {p for p, state in recovery.states.items() if state[1]}
        self.on_group_change()
        members = self.membership.active
        if recovery.gone:
            self.events.emit("departure", step, recovery.gone, "stopped answering (crashed or disconnected)", members=members)
        else:
            self.events.emit("regroup", step, (), f"a collective failed: {failure}", members=members)
        assert all(p in active for p in members)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run's membership: the ban list and the departed peers (plain data)."""
        return {"bans": [b.as_dict() for b in self.membership.bans],
                "departed": [[p, t] for p, t in self.membership.departed.items()]}

    def load_state_dict(self, state: Any) -> None:
        """A resumed run's bans and departures: a banned peer leaves again, the others continue without it."""
        if not isinstance(state, dict):
            return
        bans = [Ban(int(b["peer"]), int(b["step"]), str(b["reason"]), str(b["evidence"])) for b in state.get("bans", [])]
        departed = [p for p, t in state.get("departed", []) if self.membership.depart(int(p), int(t))]
        rebuilt = any(self.membership.is_active(b.peer) for b in bans)  # apply_bans rebuilds the group then
        self.apply_bans(bans)
        if departed and not rebuilt and not self.left:
            self.group.rebuild()
            self.on_group_change()

    # ------------------------------------------------------------------ start-up agreement
    def agree(self, what: str, mine: str, advice: str) -> int:
        """Every member's fingerprint of ``what`` (its data, its initial state) on the board; a strict majority's
        decides. A member whose fingerprint differs leaves the run (departed): on its own side this raises
        :class:`~lightning_btard.errors.UserError` saying what differs and ``advice``; with no strict majority every
        member raises. Returns the first member (index) holding the majority's value."""
        values = self.transport.all_gather_object(mine)
        top = strict_majority(values)
        active = self.membership.active
        differing = [active[i] for i, v in enumerate(values) if v != top]
        if top is None:
            raise UserError(f"BTARD: the peers' {what} differ and no majority of them agrees (peers {active}: "
                            f"{len(differing)} differ from any majority). {advice}")
        if mine != top:
            raise UserError(f"BTARD: this peer's {what} differs from the majority's (peers {differing} differ). {advice}")
        if differing:
            log.warning("BTARD: peers %s have different %s from the majority's: they leave the run", differing, what)
            for peer in differing:
                self.membership.depart(peer, -1)
            self.events.emit("departure", -1, differing, f"their {what} differ from the majority's",
                             members=self.membership.active)
            self.group.rebuild()
            self.on_group_change()
        return values.index(top)

    # ------------------------------------------------------------------ parameters in sync
    def compare_digests(self, mine: str) -> Optional[list[int]]:
        """Every member's parameter digest against the majority's: the members (peer ids) that differ, ``None`` when
        nothing was compared (a member stopped answering). Raises on this peer if it is the one that differs."""
        digests = self.tolerant(lambda: self.transport.all_gather_object(mine), lambda: None)
        if digests is None:
            return None
        majority = strict_majority(digests)
        active = self.membership.active
        differing = [active[i] for i, d in enumerate(digests) if d != majority]
        if majority is None:
            raise RuntimeError(f"BTARD: the peers' parameters differ and no majority of them agrees (peers {active}): "
                               "every peer must apply the same aggregate with the same optimizer")
        if mine != majority:
            raise RuntimeError(
                f"BTARD: this peer's parameters differ from the majority's (peers out of sync: {differing}). "
                "Every peer must apply the same aggregate with the same optimizer: check for non-deterministic "
                "optimizer code or per-rank parameter changes outside the optimizer."
            )
        return differing
