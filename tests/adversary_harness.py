"""The adaptive attacker as a property-based harness: colluders replace or mutate any board record of the verified
round (commitments, aggregate hashes, verification numbers, accusations, dispute publications, MPRNG reveals) with
hostile values, and the honest peers' invariants are checked. Used by tests/protocol/test_adversary.py (a bounded
budget, in CI) and benchmarks/adversary.py (a longer soak)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from hypothesis import strategies as st

from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.round import Behaviour, RoundConfig, verified_round

N, D = 5, 211
PHASES = ("accusations", "commit", "aggregate", "numbers", "publication", "reveal")

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.binary(max_size=70), st.text(max_size=5),
    st.sampled_from(["missing-part", "missing-aggregate", "bad-part", "equivocation", "lying-numbers"]),
    st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 60), st.sampled_from([torch.float32, torch.int64, torch.bool])),
    st.lists(st.integers(-3, 3), max_size=3),
)


PLAN = st.tuples(st.lists(st.tuples(st.booleans(), st.integers(0, 1000)), min_size=4, max_size=4), HOSTILE)
"""Where to mutate (at each depth: descend?, which index) and the hostile value put there: drawn in the test's
thread (hypothesis draws only there), applied in the peer's."""


def mutate(record: Any, plan: tuple[list[tuple[bool, int]], Any], depth: int = 0) -> Any:
    """``record`` with one place (at any depth) replaced by the plan's hostile value, or the whole record replaced."""
    path, value = plan
    if type(record) in (list, tuple) and record and depth < len(path) and path[depth][0]:
        i = path[depth][1] % len(record)
        items = list(record)
        items[i] = mutate(items[i], plan, depth + 1)
        return type(record)(items)
    return value


class Mutator(Behaviour):
    """A colluder that, in ``phase``, publishes its honest record mutated by ``plan`` (the reveal: any value)."""

    def __init__(self, phase: str, plan: tuple[list[tuple[bool, int]], Any]) -> None:
        self.phase, self.plan = phase, plan

    def record(self, step: int, phase: str, record: Any) -> Any:
        return mutate(record, self.plan) if phase == self.phase else record

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        return mutate(list(honest), self.plan) if self.phase == "accusations" else honest

    def reveal(self, step: int, secret: bytes) -> Any:
        return mutate(secret, self.plan) if self.phase == "reveal" else secret


def run_round(behaviours: dict[int, Behaviour], runner: Callable[..., list[Any]], seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(D, generator=g) * 0.05 + torch.randn(N, D, generator=g) * 0.05
    ids = [Identity.generate() for _ in range(N)]
    keys = [i.public for i in ids]

    def peer(t: Any) -> Any:
        return verified_round(grads[t.rank].clone(), t, ids[t.rank], keys, list(range(N)), step=3,
                              config=RoundConfig(tau=1.0), behaviour=behaviours.get(t.rank))

    return runner(N, peer, timeout=30.0)


def check_case(data: st.DataObject, runner: Callable[..., list[Any]]) -> tuple[int, set[int]]:
    """One case: 1 or 2 colluders of 5, each mutating one phase's record; asserts the invariants (no honest peer
    banned or raising, honest peers agree on the bans, honest aggregates identical when nobody was banned). Returns
    the number of colluders and who was banned."""
    count = data.draw(st.integers(1, (N - 1) // 2), label="colluders")
    colluders = [4, 3][:count]
    behaviours: dict[int, Behaviour] = {
        c: Mutator(data.draw(st.sampled_from(PHASES), label="phase"), data.draw(PLAN, label="plan")) for c in colluders
    }
    outcomes = run_round(behaviours, runner)
    honest = [p for p in range(N) if p not in colluders]
    views = [{b.peer for b in outcomes[p].bans} for p in honest]
    assert all(v == views[0] for v in views), f"honest peers disagree: {views}"
    assert views[0] <= set(colluders), f"honest peers banned: {views[0] - set(colluders)}"
    if not views[0]:
        assert all(torch.equal(outcomes[p].aggregate, outcomes[honest[0]].aggregate) for p in honest)
    return count, views[0]
