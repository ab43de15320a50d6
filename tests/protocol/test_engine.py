"""The peer engine in-process: n peers as threads, each "gradient" a function of (step, peer) that any peer can
recompute (the fake ``recompute``), so validation, bans, retries, regroups and fp16 skips run in seconds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional

import pytest
import torch

from lightning_btard.aggregators import resolve_aggregator
from lightning_btard.groups import InProcessGroup, InProcessRegistry
from lightning_btard.ops.centered_clip import centered_clip
from lightning_btard.protocol.engine import METRIC_KEYS, PeerEngine, round_config_of
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.membership import Membership
from lightning_btard.protocol.round import Behaviour
from lightning_btard.protocol.validation import ValidationCheck
from lightning_btard.transports.in_process import InProcessHub

DIM = 60


def gradient(step: int, peer: int) -> torch.Tensor:
    """Peer ``peer``'s honest gradient of ``step``: what its verifiable batch gives (the same wherever recomputed)."""
    g = torch.Generator().manual_seed(1000 * step + peer)
    return torch.randn(DIM, generator=g) * 0.1 + 1.0


class Peer:
    """One simulated peer: the glue's part of a step (which gradient it computes, what it sends)."""

    def __init__(self, engine: PeerEngine, lie: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                 behaviour: Optional[Behaviour] = None, stop_at: Optional[int] = None) -> None:
        self.engine, self.lie, self.behaviour, self.stop_at = engine, lie, behaviour, stop_at
        self.applied: dict[int, torch.Tensor] = {}
        self.validated: list[tuple[int, int, int]] = []  # (step, target, target's step)
        self.recomputed: list[tuple[int, int]] = []

    def recompute(self, record: Any, peer: int) -> torch.Tensor:
        self.recomputed.append((record.step, peer))
        return gradient(record.step, peer)

    def run(self, steps: int, overflow_at: tuple[int, ...] = (), overflowing: tuple[int, ...] = (1,)) -> "Peer":
        me = self.engine.me
        for step in range(steps):
            if self.stop_at is not None and step == self.stop_at:
                return self  # falls silent: never calls another collective
            task = self.engine.begin_step(step)
            fast = task is not None
            if task is not None:
                self.validated.append((step, task.target, task.record.step))
                computed = gradient(task.record.step, task.target)  # the fast path: the step's gradient is the check
            else:
                computed = gradient(step, me)
            if step in overflow_at and me in overflowing:
                computed = computed.clone()
                computed[0] = float("inf")
            sent = self.lie(step, computed) if self.lie is not None else computed
            out = self.engine.step(sent, step, computed=computed, recompute=self.recompute, behaviour=self.behaviour,
                                   overflow_vote=bool(overflow_at), fast_path=fast)
            if self.engine.left:
                return self
            if out is not None:
                self.applied[step] = out.clone()
        return self


def make_peers(n: int, *, verify: bool = True, validators: int = 1, tau: float = 1.0, window: float = 3.0,
               timeout: float = 20.0, **per_peer: dict[int, Any]) -> list[Peer]:
    hub, registry = InProcessHub(n, timeout), InProcessRegistry()
    identities = [Identity.generate() for _ in range(n)]
    keys = [i.public for i in identities]
    peers = []
    for p in range(n):
        group = InProcessGroup(Membership(peers=list(range(n))), p, hub, registry, window=window)
        engine = PeerEngine(group, resolve_aggregator("centered_clip", tau=tau), verify=verify, identity=identities[p],
                            keys=keys, validators=validators, validation_check=ValidationCheck(rtol=1e-3))
        peers.append(Peer(engine, **{k: v[p] for k, v in per_peer.items() if p in v}))
    return peers


def run(peers: list[Peer], steps: int, timeout: float = 120.0, **kwargs: Any) -> list[Peer]:
    errors: list[BaseException] = []

    def target(peer: Peer) -> None:
        try:
            peer.run(steps, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(p,), daemon=True) for p in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a peer hung"
    if errors:
        raise errors[0]
    return peers


def honest_aggregate(step: int, peers: list[int], tau: float = 1.0, weights: Optional[list[float]] = None) -> torch.Tensor:
    """The aggregate computed independently: CenteredClip of every part of the honest gradients."""
    from lightning_btard.ops.partition import part_sizes

    grads = torch.stack([gradient(step, p) for p in peers])
    sizes = part_sizes(DIM, len(peers))
    w = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
    return torch.cat([centered_clip(part.double(), tau, w, eps=1e-12, max_iters=1000).float()
                      for part in torch.split(grads, sizes, dim=1)])


def assert_same(peers: list[Peer], step: int) -> torch.Tensor:
    first = peers[0].applied[step]
    for p in peers[1:]:
        assert torch.equal(p.applied[step], first)
    return first


def test_round_config_comes_from_the_aggregator() -> None:
    cfg = round_config_of(resolve_aggregator("centered_clip", tau=0.25, eps=1e-9, max_iters=77), directions=3)
    assert (cfg.tau, cfg.eps, cfg.max_iters, cfg.directions) == (0.25, 1e-9, 77, 3)
    with pytest.raises(ValueError):
        round_config_of(resolve_aggregator("mean"))


def test_unverified_steps_give_the_independent_aggregate_and_one_metric_schema() -> None:
    peers = run(make_peers(4, verify=False), 3)
    for step in range(3):
        got = assert_same(peers, step)
        assert torch.allclose(got, honest_aggregate(step, [0, 1, 2, 3]), atol=1e-5)
    assert set(METRIC_KEYS) <= set(peers[0].engine.metrics)


def test_both_paths_log_the_same_metrics_with_the_same_meaning() -> None:
    """Clipped rows summed over every part, the solvers' iterations and residual at their maximum over parts: on the
    verified path from the checked published distances and the aggregators' board records, on every peer alike."""
    tau = 0.2  # each fake part is ~0.4 from the mean of its rows: most rows clipped
    plain = run(make_peers(4, verify=False, tau=tau), 1)
    verified = run(make_peers(4, validators=0, tau=tau), 1)
    expected = plain[0].engine.metrics
    assert expected["clipped"] > 0
    for p in plain + verified:
        got = p.engine.metrics
        assert got["clipped"] == expected["clipped"]
        assert got["cc_iterations"] == expected["cc_iterations"]
        assert got["cc_residual"] == pytest.approx(expected["cc_residual"], rel=1e-3, abs=1e-6)
    # and independently: rows farther than tau from their part's aggregate, over all parts
    from lightning_btard.ops.partition import part_sizes

    grads = torch.stack([gradient(0, p) for p in range(4)]).double()
    aggregate = verified[0].applied[0].double()
    sizes = part_sizes(DIM, 4)
    far = sum(int(((rows - agg).norm(dim=1) > tau).sum())
              for rows, agg in zip(torch.split(grads, sizes, dim=1), torch.split(aggregate, sizes)))
    assert expected["clipped"] == far


def test_verified_steps_rotate_validators_that_weigh_zero_and_recompute_on_their_fast_path() -> None:
    peers = run(make_peers(4, validators=1), 8)
    assert all(not p.engine.membership.bans for p in peers)
    validated = sorted(v for p in peers for v in p.validated)
    # from step 1 on, exactly one validator per step, checking a step-(t-1) target other than itself
    assert [v[0] for v in validated] == list(range(1, 8))
    assert all(target_step == step - 1 for step, _, target_step in validated)
    validators = {step: next(p.engine.me for p in peers if any(v[0] == step for v in p.validated)) for step in range(1, 8)}
    assert len(set(validators.values())) > 1  # the role moves around
    for step in range(8):
        got = assert_same(peers, step)
        weights = [0.0 if step in validators and p == validators[step] else 1.0 for p in range(4)]
        assert torch.allclose(got, honest_aggregate(step, [0, 1, 2, 3], weights=weights), atol=1e-4)
    assert set(METRIC_KEYS) | {"validations", "validation_bans"} <= set(peers[0].engine.metrics)
    assert peers[0].engine.metrics["validations"] == 1.0


def test_a_gradient_liar_is_banned_by_its_validator_and_the_rest_retrain_without_it() -> None:
    def flip(step: int, g: torch.Tensor) -> torch.Tensor:
        return -10 * g if step >= 2 else g

    # peer 3 escapes a step's draw with probability ~0.69 (a validator itself, or not picked by either validator; the
    # exact chain over assign_validators): over the steps to 30, ~4e-5 (14 steps: 1.6%)
    peers = run(make_peers(5, validators=2, lie={3: flip}), 30)
    honest = [p for p in peers if p.engine.me != 3]
    for p in honest:
        assert [b.peer for b in p.engine.membership.bans] == [3]
        assert p.engine.membership.bans[0].evidence == "recomputation"
    assert peers[3].engine.left
    ban_step = honest[0].engine.membership.bans[0].step
    for step in range(ban_step + 1, 30):
        assert_same(honest, step)
    # every honest peer recomputed the accused once, at the accusation
    assert all((ban_step - 1, 3) in p.recomputed for p in honest)


class WrongAggregate(Behaviour):
    def published_aggregate(self, step: int, aggregate: torch.Tensor) -> torch.Tensor:
        return aggregate + 5.0 if step == 2 else aggregate


def test_a_protocol_cheat_is_banned_and_the_step_is_retried_in_the_same_call() -> None:
    peers = run(make_peers(4, validators=0, behaviour={1: WrongAggregate()}), 4)
    honest = [p for p in peers if p.engine.me != 1]
    for p in honest:
        assert [(b.peer, b.step) for b in p.engine.membership.bans] == [(1, 2)]
        assert p.engine.metrics["retries"] == 0.0  # the last step needed none
    got = assert_same(honest, 2)  # step 2 was re-run among the three and applied
    assert torch.allclose(got, honest_aggregate(2, [0, 2, 3]), atol=1e-4)


def test_an_fp16_overflow_on_a_minority_makes_it_abstain_and_on_a_majority_skips_the_step() -> None:
    """One peer of three overflows at step 2: it abstains (weight 0) and the step goes on with the others' gradients,
    so a Byzantine peer's "overflow" costs only itself; two of three overflow at step 3: every peer skips it."""
    peers = make_peers(3, validators=0)
    run(peers, 4, overflow_at=(2,), overflowing=(1,))
    got = assert_same(peers, 2)
    assert torch.allclose(got, honest_aggregate(2, [0, 1, 2], weights=[1.0, 0.0, 1.0]), atol=1e-4)
    assert peers[0].engine.metrics["abstained"] == 0.0 and not peers[0].engine.membership.bans
    peers = make_peers(3, validators=0)
    run(peers, 4, overflow_at=(3,), overflowing=(0, 1))
    for p in peers:
        assert sorted(p.applied) == [0, 1, 2]
        assert not p.engine.membership.bans


def test_a_silent_peer_departs_the_survivors_regroup_and_stay_identical() -> None:
    peers = run(make_peers(4, validators=1, window=4.0, timeout=3.0, stop_at={2: 3}), 7)
    survivors = [p for p in peers if p.engine.me != 2]
    for p in survivors:
        assert p.engine.membership.departed == {2: 3}
        assert not p.engine.membership.bans
        assert p.engine.unvalidated_step == 3
    for step in range(3, 7):
        assert_same(survivors, step)
    assert any(e.kind == "departure" for e in survivors[0].engine.events.events)


def test_a_validator_that_accuses_falsely_is_banned() -> None:
    claims: list[tuple[int, int, bool]] = []

    class FalseAccuser(Behaviour):
        def validation_claims(self, step: int, target: int, agrees: bool) -> list[int]:
            claims.append((step, target, agrees))
            return [target]

    peers = run(make_peers(4, validators=3, behaviour={0: FalseAccuser()}), 16)
    honest = [p for p in peers if p.engine.me != 0]
    assert claims, "peer 0 was never a validator with a target (3 of 4 validate each step: p ~ (7/16)^15)"
    first = claims[0][0]
    assert claims[0][2], claims  # its own recomputation agreed: the claim is false
    for p in honest:
        assert [(b.peer, b.step) for b in p.engine.membership.bans] == [(0, first)], (claims, p.engine.membership.bans)
        assert p.engine.membership.bans[0].reason.startswith("false accusation")


class SteeringPair:
    """Two colluders: aggregator ``A`` publishes ``G + shift`` for its part, with honest numbers for its own
    contribution (its checkers would catch any other); sender ``S`` publishes numbers for that part that cancel every
    other term of the CenteredClip check (computed from the parts ``A`` holds, which it shares), and ``A`` does not
    accuse it. Nobody honest holds ``S``'s part of ``A``'s part: only ``S``'s validator can catch the lie."""

    def __init__(self, aggregator: int, sender: int, shift: float) -> None:
        self.a, self.s, self.shift = aggregator, sender, shift
        self.rounds: dict[int, Any] = {}
        pair = self

        class Aggregator(Behaviour):
            def observe(self, state: Any) -> None:
                pair.rounds[pair.a] = state

            def published_aggregate(self, step: int, aggregate: torch.Tensor) -> torch.Tensor:
                # only while its partner's numbers count (a member of weight > 0), else it would fail its check
                r = pair.rounds[pair.a]
                partner = r.peers.index(pair.s) if pair.s in r.peers else None
                return aggregate + pair.shift if partner is not None and float(r.weights[partner]) > 0 else aggregate

            def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
                r = pair.rounds[pair.a]
                return [x for x in honest if r.peers[x[1]] != pair.s]

        class Sender(Behaviour):
            def observe(self, state: Any) -> None:
                pair.rounds[pair.s] = state

            def numbers(self, step: int, part: int, s: list, norm: float, p: list) -> tuple:
                from adversary_harness import cancelling

                mine, agg = pair.rounds[pair.s], pair.rounds[pair.a]
                if pair.a not in mine.peers or mine.peers[part] != pair.a or not float(mine.weights[mine.me]) > 0:
                    return s, norm, p
                return cancelling(mine, agg, part), norm, p

        self.aggregator, self.sender = Aggregator(), Sender()


def test_a_sender_and_aggregator_colluding_to_steer_a_part_are_caught_when_the_sender_is_validated() -> None:
    """The residual the round cannot close without sending every part to more peers: the pair's lie passes the
    round's check (the aggregator steers only in rounds where its partner's numbers count), and the sender's
    validator, which now checks ``s`` and both norms against the step's aggregate (not only ``p``), bans it. (With
    ``p`` alone, the sender was never banned.)"""
    pair = SteeringPair(aggregator=3, sender=4, shift=50.0)
    peers = run(make_peers(5, validators=2, behaviour={3: pair.aggregator, 4: pair.sender}), 40)
    honest = [p for p in peers if p.engine.me not in (3, 4)]
    bans = {b.peer: b for b in honest[0].engine.membership.bans}
    for p in honest:
        assert {b.peer: (b.step, b.evidence) for b in p.engine.membership.bans} == {k: (b.step, b.evidence) for k, b in bans.items()}
    assert set(bans) <= {3, 4} and 4 in bans
    assert bans[4].evidence == "recomputation"
    last = max(b.step for b in bans.values())
    for step in range(last + 1, 40):
        assert_same(honest, step)


def test_a_step_whose_group_keeps_failing_stops_after_the_regroup_cap() -> None:
    """Review: regroups per step were unlimited (a withholder could keep a step from ever finishing). Each regroup
    removes whoever was reported silent; a step that fails more than MAX_REGROUPS_PER_STEP times stops the peer."""
    from lightning_btard.groups.base import NoMajority
    from lightning_btard.protocol.engine import MAX_REGROUPS_PER_STEP
    from lightning_btard.transports.base import TransportError

    engine = make_peers(2)[0].engine
    regroups: list[int] = []
    engine._regroup = lambda step, fast_path: regroups.append(step)  # type: ignore[method-assign]

    def attempt() -> None:
        raise TransportError("a member withheld its message")

    with pytest.raises(NoMajority, match=f"failed {MAX_REGROUPS_PER_STEP + 1} times"):
        engine._with_regroup(7, False, attempt)
    assert regroups == [7] * MAX_REGROUPS_PER_STEP


def test_a_ban_that_leaves_only_validators_does_not_validate_their_stand_ins() -> None:
    """Found in a hivemind run (4 peers, 2 validators; a crash, then a ban left peers 0 and 1, both validators of that
    step): their vectors that step were recomputations of their targets' gradients (the fast path), counted with weight
    1 because nobody else was left; the next step validated them as their own gradients and banned an honest peer.
    Stand-ins are never validation targets, whatever weight they were given. (The draws are random: peer 2 contributes,
    and so can be caught, in about a third of the steps; over 23 lying steps it escapes with probability < 1e-4.)"""
    peers = run(make_peers(3, validators=2, lie={2: lambda step, g: -g if step >= 1 else g}), 24)
    honest = [p for p in peers if p.engine.me != 2]
    for p in honest:
        assert [b.peer for b in p.engine.membership.bans] == [2], p.engine.membership.bans
        assert not p.engine.left
    assert_same(honest, 23)


def test_a_peer_that_falls_silent_to_escape_its_validation_is_judged_in_the_new_group() -> None:
    """Review: the regrouped step and the one before went unvalidated, so a peer that saw it would be validated could
    withhold and escape. Peer 2 lies at every step and, the moment the public assignments show a validator drew it,
    falls silent. The survivors regroup and validate that step in the new group: peer 2 is banned (not merely
    departed), and cannot come back. (The draws are random: with 4 peers and 2 validators a given peer is a target in
    a step with probability about 0.36, so it is drawn within the run's 23 assignments but with probability 3.5e-5;
    12 steps left it undrawn 0.7% of the time, which a CI run met.)"""

    class Escaper(Peer):
        escaped_at = -1

        def run(self, steps: int, **kwargs: Any) -> "Peer":
            me = self.engine.me
            for step in range(steps):
                record = self.engine.previous_record(step)
                if record is not None and any(a.target == me for a in record.assignments):
                    self.escaped_at = step
                    return self  # it will be validated this step: it never calls another collective
                task = self.engine.begin_step(step)
                computed = gradient(task.record.step, task.target) if task is not None else gradient(step, me)
                sent = computed if task is not None else -computed  # its own gradient is a lie
                self.engine.step(sent, step, computed=computed, recompute=self.recompute, fast_path=task is not None)
            return self

    peers = make_peers(4, validators=2, window=3.0, timeout=2.0)
    escaper = Escaper(peers[2].engine)
    peers[2] = escaper
    run(peers, 24)
    survivors = [p for i, p in enumerate(peers) if i != 2]
    step = escaper.escaped_at
    assert step >= 0, "no validator drew peer 2 in 23 assignments (probability ~3.5e-5): nothing was tested"
    for p in survivors:
        assert [(b.peer, b.step, b.evidence) for b in p.engine.membership.bans] == [(2, step, "recomputation")]
        assert 2 not in p.engine.membership.departed
    assert_same(survivors, 23)
