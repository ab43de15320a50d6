"""The verified round against an attacker that reads the code: hostile records (wrong types, negative or
out-of-range indices, repeated claims, replayed signatures) ban their author and nobody else, and never raise on
an honest peer. The hypothesis harness draws the colluders' accusation lists from every kind of hostile value."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import run_peers

from lightning_btard.ops.partition import part_sizes
from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.round import Behaviour, RoundConfig, verified_round
from lightning_btard.transports.base import Transport

N, D = 5, 211


def gradients(n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, generator=g) * 0.05 + torch.randn(n, D, generator=g) * 0.05


class Accuser(Behaviour):
    """Publishes ``items`` as its accusation list in the first accusation phase of the round."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.used = items, False

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        if self.used:
            return honest
        self.used = True
        return list(self.items)


def run_round(behaviours: dict[int, Behaviour], n: int = N, peers: list[int] | None = None, context: bytes = b"",
              ids: list[Identity] | None = None, grads: torch.Tensor | None = None, wrap=None) -> list[Any]:
    peers = peers if peers is not None else list(range(n))
    ids = ids or [Identity.generate() for _ in range(max(peers) + 1)]
    grads = grads if grads is not None else gradients(max(peers) + 1)
    keys = [ids[p].public for p in peers]

    def peer(t: Transport) -> Any:
        me = peers[t.rank]
        transport = wrap(me, t) if wrap is not None else t
        return verified_round(grads[me].clone(), transport, ids[me], keys, peers, step=3, config=RoundConfig(tau=1.0),
                              behaviour=behaviours.get(me), context=context)

    return run_peers(len(peers), peer, timeout=30.0)


def banned(outcomes: list[Any], honest: list[int]) -> set[int]:
    views = [{b.peer for b in outcomes[i].bans} for i in honest]
    assert all(v == views[0] for v in views), f"honest peers disagree: {views}"
    return views[0]


@pytest.mark.parametrize("items", [
    [("missing-part", -1, None)],  # Python's negative indexing named the last member
    [("missing-part", i, None) for i in (-1, -2, -3, -5)],
    [("missing-aggregate", 99, None)],  # beyond the group: crashed every peer
    [("missing-part", 2, None)],  # itself
    [1],
    [("bad-part", 0, torch.zeros(3))],
    [("bad-part", True, (torch.zeros(3), b"x" * 64))],
    [("lying-numbers", 0, (torch.zeros(7, 2), b"x" * 64))],  # a wrongly shaped evidence tensor
    [("equivocation", torch.tensor(0), (b"h" * 32, b"s" * 64))],
    [("equivocation", 0, ([1, 2], b"s" * 64))],
    [("no-such-kind", 0, None)],
    "not a list",
    [("missing-part", 0, None)] * 4,  # four copies of one unprovable claim
])
def test_a_hostile_accusation_bans_its_author_only(items: Any) -> None:
    """Member 2 publishes the hostile list (not the last member: -1 named the last one)."""
    outcomes = run_round({2: Accuser(items)})
    assert banned(outcomes, [0, 1, 3, 4]) == {2}


def test_one_unprovable_claim_is_refuted_once_not_four_times() -> None:
    outcomes = run_round({4: Accuser([("missing-part", 0, None)])})
    assert banned(outcomes, [0, 1, 2, 3]) == set()
    assert outcomes[0].refuted == [(4, 0)]


class Spy:
    """The attacker's transport: records the signed parts it receives (what a real attacker keeps)."""

    def __init__(self, inner: Transport, seen: list) -> None:
        self.inner, self.seen = inner, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def exchange(self, sends: Any, recvs: Any) -> Any:
        out = self.inner.exchange(sends, recvs)
        if not self.seen:
            self.seen.extend([[t.clone() for t in r] for r in recvs])
        return out


def test_parts_signed_in_an_earlier_attempt_are_no_evidence_in_a_later_one() -> None:
    """Attempt 1 among 5 peers; attempt 2 of the same step among 4 (peer 2 was banned): the attacker replays the part
    peer 0 signed for it in attempt 1, which no longer matches anything peer 0 committed. The signature binds the
    attempt and the group, so the replay bans the replayer (it banned peer 0 before)."""
    ids = [Identity.generate() for _ in range(N)]
    grads = gradients()
    seen: list = []
    run_round({}, ids=ids, grads=grads, context=b"attempt 1", wrap=lambda me, t: Spy(t, seen) if me == 4 else t)
    part, sig = seen[0][0], bytes(seen[0][1].tolist())
    assert part.numel() == part_sizes(D, N)[4]
    replay = Accuser([("bad-part", 0, (part, sig))])
    outcomes = run_round({4: replay}, peers=[0, 1, 3, 4], ids=ids, grads=grads, context=b"attempt 2")
    assert banned(outcomes, [0, 1, 2]) == {4}


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True), st.binary(max_size=70),
    st.text(max_size=5), st.sampled_from(["missing-part", "missing-aggregate", "bad-part", "equivocation", "lying-numbers"]),
    st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 60), st.sampled_from([torch.float32, torch.int64, torch.bool])),
)
ITEM = st.one_of(
    HOSTILE,
    st.tuples(st.sampled_from(["missing-part", "missing-aggregate", "bad-part", "equivocation", "lying-numbers"]),
              st.one_of(st.integers(-6, 6), HOSTILE), st.one_of(HOSTILE, st.tuples(HOSTILE, HOSTILE))),
    st.lists(HOSTILE, max_size=4),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(lists=st.lists(st.lists(ITEM, max_size=5), min_size=1, max_size=2))
def test_colluders_publishing_any_hostile_accusations_ban_nobody_honest(lists: list[list[Any]]) -> None:
    """1 or 2 colluders (of 5) each publish a hostile accusation list: no honest peer is banned or raises, every
    honest peer reaches the same verdict, and where nobody was banned the honest aggregates are identical."""
    colluders = [4, 3][: len(lists)]
    outcomes = run_round({c: Accuser(items) for c, items in zip(colluders, lists)})
    honest = [p for p in range(N) if p not in colluders]
    out = banned(outcomes, honest)
    assert out <= set(colluders)
    if not out:
        assert all(torch.equal(outcomes[p].aggregate, outcomes[honest[0]].aggregate) for p in honest)


class Publishes(Behaviour):
    """Publishes ``value`` instead of its record in ``phase``."""

    def __init__(self, phase: str, value: Any) -> None:
        self.phase, self.value = phase, value

    def record(self, step: int, phase: str, record: Any) -> Any:
        return self.value(record) if phase == self.phase else record


@pytest.mark.parametrize("phase, value", [
    ("commit", lambda r: ((torch.tensor(3), r[0][1], r[0][2], r[0][3]), r[1])),  # a tensor where the step is
    ("commit", lambda r: ((True, r[0][1], r[0][2], r[0][3]), r[1])),
    ("commit", lambda r: ((3, r[0][1], r[0][2][:2], r[0][3]), r[1])),  # too few hashes
    ("commit", lambda r: ((3, r[0][1], [[1]] * N, r[0][3]), r[1])),
    ("commit", lambda r: [1]),
    ("aggregate", lambda r: ([1, 2], r[1])),  # a list where a digest is
    ("aggregate", lambda r: (r[0], torch.zeros(64))),
    ("aggregate", lambda r: None),
    ("reveal", lambda r: None),
    ("reveal", lambda r: [r[0]]),  # the accusations left out
    ("reveal", lambda r: [r[0], r[1], r[1]]),
    ("reveal", lambda r: [bytes(32), r[1]]),  # not the committed secret
    ("reveal", lambda r: [r[0], "accuse"]),
    ("reveal", lambda r: [r[0], [("equivocation", 0, None)]]),  # evidence missing
    ("reveal", lambda r: [r[0], [("equivocation", 0, (bytes(32), bytes(64)))]]),  # a false accusation
    ("numbers", lambda r: (r[0][:1], r[1])),
    ("numbers", lambda r: ([[[float("nan")] * 2, 1.0, [0.0] * 2, 1.0]] * N, r[1])),
])
def test_a_malformed_board_record_bans_its_author_only(phase: str, value: Any) -> None:
    outcomes = run_round({2: Publishes(phase, value)})
    assert banned(outcomes, [0, 1, 3, 4]) == {2}


def test_a_disputed_peer_publishing_garbage_is_banned_and_nobody_crashes() -> None:
    """Peer 0 claims peer 2 sent it nothing; peer 2 (the attacker) answers with ill-typed copies."""
    class Claims(Behaviour):
        def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
            return [("missing-part", 2, None)]

    for garbage in ([1], "x", [(0, "missing-part")], [(-1, "missing-part", torch.zeros(3))], [(0, "missing-part", [1.0])]):
        outcomes = run_round({0: Claims(), 2: Publishes("publication", lambda r, g=garbage: g)})
        assert banned(outcomes, [1, 3, 4]) == {2}


@pytest.mark.parametrize("scale", [1e30, 1.9e37, 3.0e38])
def test_a_committed_gradient_beyond_the_largest_part_bans_its_sender_alone(scale: float) -> None:
    """A finite gradient too large for the checks' float32 sums (it got every honest aggregator banned: above about
    1e19 per element) is malformed like a NaN: its signed part bans the sender, and only it."""
    from lightning_btard.ops.finite import MAX_PART_NORM

    d = 20003
    grads = torch.randn(N, d, generator=torch.Generator().manual_seed(0)) * 0.05
    grads[4] = torch.full((d,), scale)
    assert float(grads[4][: d // N].double().norm()) > MAX_PART_NORM
    outcomes = run_round({}, grads=grads)
    assert banned(outcomes, [0, 1, 2, 3]) == {4}


def test_a_large_gradient_within_the_bound_is_clipped_not_a_ban() -> None:
    from lightning_btard.ops.finite import MAX_PART_NORM

    d = 20003
    grads = torch.randn(N, d, generator=torch.Generator().manual_seed(0)) * 0.05
    grads[4] = torch.full((d,), 0.9 * MAX_PART_NORM / (d // N + 1) ** 0.5)
    outcomes = run_round({}, grads=grads)
    assert banned(outcomes, [0, 1, 2, 3, 4]) == set()
    assert float(outcomes[0].aggregate.norm()) < 10  # CenteredClip kept it to its radius


def test_an_aggregator_cannot_steer_its_own_part_with_numbers_nobody_checks() -> None:
    """A shift of 20,000 tau passed with no ban at 245906c: the aggregator's own numbers for its own part cancelled
    the others' in the check. Now its checkers (``own_part_checkers``) hold that contribution and recompute them."""
    from adversary_harness import Steerer

    outcomes = run_round({2: Steerer(shift=20_000.0)})
    assert banned(outcomes, [0, 1, 3, 4]) == {2}


class OwnPartLiar(Behaviour):
    """An aggregator that sends its checkers another own part than it committed to (``bad``), or nothing signed
    (withholds; ``publish`` says whether it then publishes a valid copy when disputed)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def own_part(self, step: int, checker: int, part: torch.Tensor) -> torch.Tensor:
        return part + 1.0 if self.mode == "bad" else part

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        return honest

    def republish(self, step: int, kind: str, receiver: int, content: torch.Tensor) -> Any:
        return None if self.mode == "withhold" and kind == "missing-own-part" else content


class Mangler:
    """The attacker's transport: rewrites the messages it sends (``fn(destination, message) -> message``)."""

    def __init__(self, inner: Transport, fn: Any) -> None:
        self.inner, self.fn, self.calls = inner, fn, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def exchange(self, sends: Any, recvs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:  # the scatter
            sends = [self.fn(j, list(m)) if j != self.inner.rank else m for j, m in enumerate(sends)]
        return self.inner.exchange(sends, recvs)


def test_the_checkers_of_an_aggregators_own_part_are_the_next_members() -> None:
    from lightning_btard.protocol.round import own_part_checkers

    assert own_part_checkers([1.0] * 5) == [[1, 2], [2, 3], [3, 4], [4, 0], [0, 1]]
    assert own_part_checkers([1.0, 0.0, 1.0, 1.0]) == [[1], [], [3], [0]]
    assert own_part_checkers([1.0, 1.0]) == [[], []]  # two peers: no Byzantine member is tolerated


def test_an_aggregator_sending_its_checkers_another_own_part_is_banned() -> None:
    outcomes = run_round({2: OwnPartLiar("bad")})
    assert banned(outcomes, [0, 1, 3, 4]) == {2}
    assert any("bad-own-part" in b.reason for b in outcomes[0].bans)


@pytest.mark.parametrize("publish", [True, False])
def test_an_aggregator_withholding_its_own_part_must_publish_it(publish: bool) -> None:
    """Its own part arrives unsigned at its checkers: they dispute; a valid copy on the board settles it (the round
    stands and the numbers are checked against the copy), none bans the aggregator."""
    def unsigned(j: int, message: list) -> list:
        return message[:2] + [message[2], torch.zeros(64, dtype=torch.uint8)] if len(message) == 4 else message

    outcomes = run_round({2: OwnPartLiar("publish" if publish else "withhold")},
                         wrap=lambda me, t: Mangler(t, unsigned) if me == 2 else t)
    assert banned(outcomes, [0, 1, 3, 4]) == (set() if publish else {2})
    if publish:
        assert sorted(outcomes[0].refuted) == [(3, 2), (4, 2)]
        assert all(torch.equal(o.aggregate, outcomes[0].aggregate) for o in outcomes)


def test_a_dispute_over_an_own_part_by_a_non_checker_bans_the_claimant() -> None:
    outcomes = run_round({4: Accuser([("missing-own-part", 1, None)])})  # peer 1's checkers are 2 and 3
    assert banned(outcomes, [0, 1, 2, 3]) == {4}


@pytest.mark.parametrize("mangle", ["int64 signature", "trailing tensor"])
def test_a_valid_part_in_a_malformed_message_frames_nobody(mangle: str) -> None:
    """The signature as int64 (its values intact) or an extra tensor: the message is malformed, the part in it is the
    committed one. It stands (or is disputed and republished); accusing it as a bad part would ban its honest
    receiver for a false accusation."""
    def fn(j: int, message: list) -> list:
        if mangle == "int64 signature":
            return [message[0], message[1].to(torch.int64)] + message[2:]
        return message + [torch.zeros(3)]

    outcomes = run_round({}, wrap=lambda me, t: Mangler(t, fn) if me == 2 else t)
    assert banned(outcomes, [0, 1, 2, 3, 4]) == set()
    assert all(torch.equal(o.aggregate, outcomes[0].aggregate) for o in outcomes)


class Framer(Behaviour):
    """Sends its honest gradient at 10x the honest scale (legal) and lies in its published ``s`` for every part by
    just under what the aggregators' recheck accepts: the old recheck took ``number_rtol (|s| + ||g-G|| + ||g||)``,
    which the CenteredClip check did not allow for, and every honest aggregator failed its check."""

    def __init__(self, old_rule: bool) -> None:
        self.old_rule, self.r = old_rule, None

    def observe(self, state: Any) -> None:
        self.r = state

    def numbers(self, step: int, part: int, s: list, norm: float, p: list) -> tuple:
        r = self.r
        part_norm = float(r.parts[part].double().norm())
        scale = norm + part_norm if self.old_rule else min(1.0, r.config.tau / norm) * norm
        lie = 0.95 * r.config.number_rtol * (scale + max(abs(x) for x in s))
        return [x + lie for x in s], norm, p


@pytest.mark.parametrize("old_rule", [True, False])
def test_a_sender_lying_within_the_recheck_cannot_frame_honest_aggregators(old_rule: bool) -> None:
    grads = gradients()
    grads[2] = grads[2] * 10.0
    outcomes = run_round({2: Framer(old_rule)}, grads=grads)
    assert banned(outcomes, [0, 1, 3, 4]) <= {2}  # the framer itself may be caught, nobody honest


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_colluders_mutating_any_board_record_ban_nobody_honest(data: st.DataObject) -> None:
    """The harness over every record kind, on the in-process transport (hivemind's: the next test)."""
    from adversary_harness import check_case

    check_case(data, run_peers)


@pytest.mark.timeout(300)
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_colluders_mutating_any_board_record_on_hivemind(hivemind_swarm, data: st.DataObject) -> None:
    from adversary_harness import check_case

    check_case(data, lambda n, fn, timeout=30.0: hivemind_swarm.run(n, fn, timeout=timeout))


def test_a_huge_signature_tensor_is_refused_before_it_is_converted() -> None:
    """A signature is 64 bytes: a 50M-element "signature" used to be turned into a Python list (~9x its size in
    memory) before its length was looked at."""
    from unittest import mock

    from lightning_btard.protocol.round import _unpack

    with mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("converted")):
        content, sig = _unpack([torch.zeros(3), torch.zeros(50_000_000, dtype=torch.uint8)])
    assert content is not None and sig == b""


class DisputedLiar(Behaviour):
    """Sends aggregator 0 its part unsigned (disputed: it publishes a valid copy, so the claim is refuted), then lies
    in its published numbers for that part: aggregator 0's only evidence is the published copy, which its signed
    commitment names."""

    def numbers(self, step: int, part: int, s: list, norm: float, p: list) -> tuple:
        return ([x + 1.0 for x in s], norm, p) if part == 0 else (s, norm, p)

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        return honest


def test_a_liar_whose_part_came_by_a_refuted_dispute_is_still_caught_and_frames_nobody() -> None:
    def unsigned(j: int, message: list) -> list:
        return [message[0], torch.zeros(64, dtype=torch.uint8)] + message[2:] if j == 0 else message

    outcomes = run_round({4: DisputedLiar()}, wrap=lambda me, t: Mangler(t, unsigned) if me == 4 else t)
    assert banned(outcomes, [0, 1, 2, 3]) == {4}


class EarlyLyingAccusation(Behaviour):
    """Accuses a sender of lying numbers on a board before any numbers exist (the scatter board, or the reveal board
    with gather's accusations), with that sender's real committed part as the evidence: it digests right."""

    def __init__(self, board: int) -> None:
        self.board, self.calls = board, 0

    def observe(self, state: Any) -> None:
        self.r = state

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        self.calls += 1
        if self.calls != self.board:
            return honest
        r, sender = self.r, 0
        return honest + [("lying-numbers", sender, (r.received[r.row[sender]].clone(), r.part_sigs[sender]))]


@pytest.mark.parametrize("board", [1, 2], ids=["scatter-board", "reveal-board"])
def test_a_lying_numbers_accusation_before_the_numbers_bans_the_accuser_and_crashes_nobody(board: int) -> None:
    outcomes = run_round({2: EarlyLyingAccusation(board)})
    assert banned(outcomes, [0, 1, 3, 4]) == {2}
