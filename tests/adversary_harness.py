"""The adaptive attacker as a property-based harness: colluders replace or mutate any board record of the verified
round (commitments, aggregate hashes, verification numbers, accusations, dispute publications, MPRNG reveals) with
hostile values, mangle the messages they send (parts, own parts for checkers, aggregates: dropped, added, retyped,
replaced, perturbed tensors), or steer their own part with numbers computed from everything they hold after the
reveal; the honest peers' invariants are checked. Used by tests/protocol/test_adversary.py (a bounded
budget, in CI) and benchmarks/adversary.py (a longer soak)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from hypothesis import strategies as st

from lightning_btard.protocol.identity import Identity
from lightning_btard.protocol.round import Behaviour, RoundConfig, verified_round

N, D = 5, 211
PHASES = ("accusations", "commit", "aggregate", "numbers", "publication", "reveal")
MESSAGE_PHASES = ("scatter", "gather")

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.binary(max_size=70), st.text(max_size=5),
    st.sampled_from(["missing-part", "missing-aggregate", "bad-part", "equivocation", "lying-numbers"]),
    st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 60), st.sampled_from([torch.float32, torch.int64, torch.bool])),
    st.lists(st.integers(-3, 3), max_size=3),
)


TENSOR = st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 60),
                   st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]))
MESSAGE_PLAN = st.tuples(
    st.one_of(st.none(), st.integers(0, N - 1)),  # to one receiver, or to all
    st.one_of(
        st.tuples(st.just("drop"), st.integers(0, 3)),
        st.tuples(st.just("append"), TENSOR),
        st.tuples(st.just("replace"), st.integers(0, 3), TENSOR),
        st.tuples(st.just("perturb"), st.integers(0, 3), st.integers(0, 1000),
                  st.floats(allow_nan=True, allow_infinity=True, width=32)),
        st.tuples(st.just("retype"), st.integers(0, 3), st.sampled_from([torch.int64, torch.float64, torch.uint8, torch.float16])),
    ),
)
"""How a colluder mangles the tensors of one message kind it sends (always tensors: what a transport carries)."""


def mangle(message: list[torch.Tensor], op: tuple) -> list[torch.Tensor]:
    out = list(message)
    if not out and op[0] != "append":
        return out
    kind = op[0]
    if kind == "drop":
        del out[op[1] % len(out)]
    elif kind == "append":
        out.append(op[1])
    elif kind == "replace":
        out[op[1] % len(out)] = op[2]
    elif kind == "perturb":
        k = op[1] % len(out)
        t = out[k].clone().flatten()
        if t.numel():
            value = op[3] if t.is_floating_point() else (int(op[3]) % 256 if op[3] == op[3] and abs(op[3]) < 1e9 else 7)
            t[op[2] % t.numel()] = value
        out[k] = t
    else:
        k = op[1] % len(out)
        out[k] = out[k].to(op[2])
    return out


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


class MessageMangler(Behaviour):
    """A colluder that mangles what it sends in ``phase`` (``scatter``: parts and its own part for its checkers;
    ``gather``: its aggregate)."""

    def __init__(self, phase: str, plan: tuple) -> None:
        self.phase, (self.to, self.op) = phase, plan

    def message(self, step: int, phase: str, receiver: int, message: list[torch.Tensor]) -> list[torch.Tensor]:
        return mangle(message, self.op) if phase == self.phase and self.to in (None, receiver) else message


class Steerer(Behaviour):
    """An aggregator that publishes ``G + shift`` for its part and, after the reveal, numbers for its own contribution
    that cancel every other term of the CenteredClip check (it holds every sender's part and knows the directions)."""

    def __init__(self, shift: float) -> None:
        self.shift, self.r = shift, None

    def observe(self, state: Any) -> None:
        self.r = state

    def published_aggregate(self, step: int, aggregate: torch.Tensor) -> torch.Tensor:
        return aggregate + self.shift

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        return [a for a in honest if a[1] != self.r.me]

    def numbers(self, step: int, part: int, s: list, norm: float, p: list) -> tuple:
        r = self.r
        return (cancelling(r, r, part), norm, p) if part == r.me else (s, norm, p)


def cancelling(liar: Any, holder: Any, part: int) -> list[float]:
    """The ``s`` that member ``liar.me`` publishes for ``part`` to cancel every other member's term of the CenteredClip
    check, computed from the parts ``holder`` (its aggregator: the liar itself, or a colluder) received and the revealed
    directions."""
    from lightning_btard.ops.projection import clipped_projections

    terms, _, _ = clipped_projections(liar.directions[part], holder.received, liar.aggregates[part], liar.config.tau)
    w = liar.weights.to(terms.dtype)
    others = [i for i in range(liar.n) if i != liar.me]
    return (-(w[others][:, None] * terms[[holder.row[i] for i in others]]).sum(0) / float(w[liar.me])).tolist()


def clip_bound(honest: torch.Tensor, byzantine: int, tau: float) -> float:
    """How far CenteredClip's fixed point of ``honest`` rows and ``byzantine`` arbitrary ones can be from the honest
    mean ``m``: with ``r = max ||x_h - m||``, each honest term pulls the fixed point ``v`` back along ``m - v`` by at
    least ``min(1, tau / (D + r)) (D - r)`` at distance ``D``, each Byzantine term pushes by at most ``tau``, so
    ``D <= max(r + b tau / (n - b), r n / (n - 2 b))``."""
    mean = honest.double().mean(0)
    r = float((honest.double() - mean).norm(dim=1).max())
    h = honest.shape[0]
    return max(r + byzantine * tau / h, r * (h + byzantine) / (h - byzantine))

def gradients(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, generator=g) * 0.05 + torch.randn(N, D, generator=g) * 0.05


def run_round(behaviours: dict[int, Behaviour], runner: Callable[..., list[Any]], seed: int = 0) -> list[Any]:
    grads = gradients(seed)
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
    behaviours: dict[int, Behaviour] = {}
    for c in colluders:
        phase = data.draw(st.sampled_from(PHASES + MESSAGE_PHASES + ("steer",)), label="phase")
        if phase in MESSAGE_PHASES:
            behaviours[c] = MessageMangler(phase, data.draw(MESSAGE_PLAN, label="message plan"))
        elif phase == "steer":
            behaviours[c] = Steerer(data.draw(st.floats(-1e4, 1e4), label="shift"))
        else:
            behaviours[c] = Mutator(phase, data.draw(PLAN, label="plan"))
    grads = gradients()
    outcomes = run_round(behaviours, runner)
    honest = [p for p in range(N) if p not in colluders]
    views = [{b.peer for b in outcomes[p].bans} for p in honest]
    assert all(v == views[0] for v in views), f"honest peers disagree: {views}"
    assert views[0] <= set(colluders), f"honest peers banned: {views[0] - set(colluders)}"
    if not views[0]:
        assert all(torch.equal(outcomes[p].aggregate, outcomes[honest[0]].aggregate) for p in honest)
        # every part, whoever aggregated it, within CenteredClip's bound of the honest inputs
        sizes = outcomes[honest[0]].sizes
        for j, (part, rows) in enumerate(zip(torch.split(outcomes[honest[0]].aggregate, sizes),
                                             torch.split(grads[honest], sizes, dim=1))):
            mean = rows.double().mean(0)
            distance = float((part.double() - mean).norm())
            assert distance <= clip_bound(rows, count, 1.0) * (1 + 1e-3) + 1e-5, f"part {j} steered {distance:.3g} from the honest mean"
    return count, views[0]
