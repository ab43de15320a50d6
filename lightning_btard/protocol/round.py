"""One verified BTARD aggregation round (steps 2-7 of ``docs/design.md``), over a transport.

Phases, each closed by a board round (``all_gather_object``: every peer sees the same records):

1. **commit** — signed hashes of every part of my gradient and my MPRNG commitment;
2. **scatter** — part ``j`` to aggregator ``j``, with my signature over its hash;
3. **aggregate** — CenteredClip of my part; its hash published, signed;
4. **gather** — my aggregate to every peer, signed (its accusations go on the reveal board);
5. **reveal** — MPRNG secrets, checked against the commitments, and the gather accusations; the shared seed;
6. **verify** — every peer publishes its projections of every part on the secret directions; the
   aggregator of each part recomputes its senders' numbers from the parts it holds; everybody runs
   the CenteredClip check, and a failed part whose aggregator raised no valid accusation bans it.

What a peer receives is checked against the sender's own signed records. A contradiction is an
accusation carrying the sender's signature as evidence (a part that is not what was committed or is
not finite, an aggregate that is not the published one, numbers that do not match the signed part):
every peer re-checks the evidence itself and bans the accused if it holds, the accuser if it does
not. A message that arrives malformed or unsigned proves nothing about its sender; the sender must
then publish it on the board, and is banned if it does not publish a valid copy. A round with a ban
returns no aggregate: the caller re-runs it without the banned peers (step 7). Validation by
recomputation (steps 8-9) is in ``validation.py``: it reads the projections ``p`` a round publishes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.ops.centered_clip import centered_clip_with_stats, clip_coefficients
from lightning_btard.ops.finite import well_formed_part
from lightning_btard.ops.norms import redo_unsure_norms, rounding_floor, safe_norm
from lightning_btard.ops.partition import part_sizes
from lightning_btard.ops.projection import LazyDirections, ProjectionCheck, aggregate_norm_bound, clipped_projections
from lightning_btard.ops.workspace import SCRATCH, Workspace
from lightning_btard.protocol import records
from lightning_btard.protocol.digest import digest
from lightning_btard.protocol.identity import Identity, verify_signature
from lightning_btard.protocol.membership import Ban
from lightning_btard.protocol.mprng import MPRNGSecret, check_reveal, shared_seed
from lightning_btard.transports.base import Transport

__all__ = ["Behaviour", "RoundConfig", "RoundOutcome", "verified_round"]

_SIG = 64  # bytes in an Ed25519 signature
_WORK = Workspace()  # received parts: tens of MB, the same shapes every round


@dataclass(frozen=True)
class RoundConfig:
    """The round's CenteredClip and its checks (built from the aggregator object: ``engine.round_config_of``)."""

    tau: float = 1.0
    eps: float = 0.0
    """CenteredClip's absolute residual target (the aggregator's ``eps``); the solver stops at
    ``max(eps, rel_eps * ||G||)`` and the check allows twice that."""
    rel_eps: float = 5e-7
    """CenteredClip's residual target relative to ``||G||``; the check allows twice that, and never relative to more
    than twice the norm the senders' parts bound an honest aggregate by (:func:`aggregate_norm_bound`)."""
    directions: int = 2
    max_iters: int = 500
    number_rtol: float = 1e-5
    """How far published projections may be from the aggregator's recomputation (relative)."""


class Behaviour:
    """What a peer sends at each point of the round. Honest by default; protocol attacks override one method."""

    def part(self, step: int, receiver: int, part: Tensor) -> Tensor:
        return part

    def own_part(self, step: int, checker: int, part: Tensor) -> Tensor:
        """What this aggregator sends ``checker`` as its own contribution to its own part."""
        return part

    def published_aggregate(self, step: int, aggregate: Tensor) -> Tensor:
        return aggregate

    def aggregate(self, step: int, receiver: int, aggregate: Tensor) -> Tensor:
        return aggregate

    def reveal(self, step: int, secret: bytes) -> Optional[bytes]:
        return secret

    def numbers(self, step: int, part: int, s: list[float], norm: float, p: list[float]) -> tuple[list[float], float, list[float]]:
        return s, norm, p

    def accusations(self, step: int, honest: list[tuple]) -> list[tuple]:
        return honest

    def republish(self, step: int, kind: str, receiver: int, content: Tensor) -> Optional[Tensor]:
        return content

    def observe(self, state: Any) -> None:
        """Called once at the start of the round with the round's state: everything this peer knows (the parts it
        receives, the directions once revealed, the aggregates), for attacks that compute their lies from it."""

    def message(self, step: int, phase: str, receiver: int, message: list[Tensor]) -> list[Tensor]:
        """The tensors this peer sends ``receiver`` in ``phase`` (``scatter``, ``gather``), signatures included."""
        return message

    def record(self, step: int, phase: str, record: Any) -> Any:
        """What this peer publishes on the board in ``phase`` (``commit``, ``aggregate``, ``reveal``: the MPRNG reveal
        and the gather accusations, ``numbers``, ``publication``), signature included where the phase signs it (an
        attacker may publish anything)."""
        return record

    def validation_claims(self, step: int, target: int, agrees: bool) -> list[int]:
        """The targets this validator accuses (honest: its target, if the recomputation disagreed)."""
        return [] if agrees else [target]


@dataclass
class RoundOutcome:
    aggregate: Optional[Tensor]
    """The agreed aggregate, or ``None`` when somebody was banned (re-run the round without them)."""
    bans: list[Ban] = field(default_factory=list)
    seed: Optional[bytes] = None
    stats: dict[str, float] = field(default_factory=dict)
    numbers: list[list] = field(default_factory=list)
    """Every member's published ``[s, ||g - G||, p]`` per part (the projections validators check later)."""
    sizes: list[int] = field(default_factory=list)
    refuted: list[tuple[int, int]] = field(default_factory=list)
    """``(claimant, accused)`` for every unprovable claim the accused refuted with a valid copy."""
    checkers: list[int] = field(default_factory=list)
    """The members to which this peer sent its own contribution to its own part."""


def _sig_tensor(sig: bytes) -> Tensor:
    return torch.frombuffer(bytearray(sig), dtype=torch.uint8)


def _part_statement(context: bytes, sender: int, receiver: int, h: bytes) -> bytes:
    return digest("part", context, sender, receiver, h)


def _aggregate_statement(context: bytes, aggregator: int, h: bytes) -> bytes:
    return digest("aggregate", context, aggregator, h)


def _numbers_statement(context: bytes, peer: int, numbers: list) -> bytes:
    return digest("numbers", context, peer, repr(numbers))


def _commit_statement(context: bytes, peer: int, hashes: Sequence[bytes], commitment: bytes) -> bytes:
    return digest("commit", context, peer, *hashes, commitment)


def _unpack(message: Optional[list[Any]], length: int = 2, at: int = 0) -> tuple[Optional[Tensor], bytes]:
    """The (content, signature) pair at ``at`` of a malformed message of ``length`` tensors, as far as it can be
    read."""
    if message is None or len(message) != length or not all(isinstance(x, Tensor) for x in message[at: at + 2]):
        return None, b""
    sig = message[at + 1]
    return message[at], bytes(sig.to(torch.uint8).flatten().tolist()) if sig.numel() == _SIG else b""


def own_part_checkers(weights: Sequence[float]) -> list[list[int]]:
    """Per member ``j``: the members that check ``j``'s numbers for its own contribution to its own part, which
    nobody else holds (an aggregator that published them unchecked could cancel everybody else's terms in the
    CenteredClip check and shift its part without limit). The next ``(n - 1) // 2`` members after ``j``: with at
    most ``(n - 1) // 2`` Byzantine members in all, ``j`` and they are never all Byzantine. A member of weight 0
    contributes nothing to its part: nobody checks it."""
    n = len(weights)
    return [[(j + k) % n for k in range(1, (n - 1) // 2 + 1)] if weights[j] > 0 else [] for j in range(n)]


def _well_formed_numbers(nums: Any, n: int, k: int) -> bool:
    """``n`` entries of ``[s (k finite floats), ||g - G|| (finite float), p (k finite floats), ||g|| (finite, >= 0)]``."""

    def floats(xs: Any, count: int) -> bool:
        return isinstance(xs, list) and len(xs) == count and all(isinstance(x, float) and math.isfinite(x) for x in xs)

    return isinstance(nums, list) and len(nums) == n and all(
        isinstance(e, list) and len(e) == 4 and floats(e[0], k) and floats([e[1]], 1) and floats(e[2], k)
        and floats([e[3]], 1) and e[3] >= 0 for e in nums
    )


def _close(published: Sequence[float], recomputed: Sequence[float], rtol: float, scale: float, floor: float) -> bool:
    return len(published) == len(recomputed) and all(
        abs(a - b) <= rtol * (abs(b) + scale) + floor for a, b in zip(published, recomputed)
    )


class _Round:
    """The state one peer keeps through a round; bans are decided identically on every honest peer."""

    def __init__(self, flat: Tensor, transport: Transport, identity: Identity, keys: Sequence[bytes],
                 peers: Sequence[int], step: int, config: RoundConfig, behaviour: Behaviour,
                 weights: Optional[Sequence[float]] = None, out: Optional[Tensor] = None, context: bytes = b"") -> None:
        self.t, self.identity, self.keys, self.peers = transport, identity, list(keys), list(peers)
        self.step, self.config, self.behaviour = step, config, behaviour
        self.context = digest("round", context, step, *self.peers)
        """What every signature of this round binds: the caller's context (run nonce, attempt), the step, the group."""
        self.n, self.me = transport.world_size, transport.rank
        self.weights = torch.ones(self.n, dtype=torch.float64) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
        if self.weights.shape != (self.n,) or bool((self.weights < 0).any()) or not float(self.weights.sum()) > 0:
            raise ValueError(f"a round needs one non-negative weight per member, not all zero; got {weights}")
        # received parts are stored contributors first, so that CenteredClip reads a view of the rows that count
        self.order = sorted(range(self.n), key=lambda i: (bool(self.weights[i] == 0), i))
        self.row = {member: r for r, member in enumerate(self.order)}
        self.contributing = int((self.weights > 0).sum())
        self.checkers = own_part_checkers(self.weights.tolist())
        self.own_parts: dict[int, Tensor] = {}
        """Member ``i``'s own contribution to its own part, for the ``i`` whose numbers for it I check."""
        self.own_sigs: dict[int, bytes] = {}
        self.sizes = part_sizes(flat.numel(), self.n)
        self.parts = list(torch.split(flat, self.sizes))
        self.flat = flat
        self.bans: dict[int, Ban] = {}
        self.committed: list[list[bytes]] = []
        self.commitments: list[bytes] = []
        self.agg_hashes: list[bytes] = []
        self.received = torch.empty(0)
        self.part_sigs: list[bytes] = []
        self.out = out if out is not None else torch.empty_like(flat)
        self.aggregates: list[Tensor] = list(torch.split(self.out, self.sizes))
        self.part_hashes: list[bytes] = []
        self.numbers: list[list] = []
        self.directions: Sequence[Tensor] = []
        """The round's secret directions per part, once the seed is known (drawn on demand: see ``LazyDirections``)."""
        self.refuted: list[tuple[int, int]] = []
        self.gather_accusations: list[tuple] = []
        self.sent_myself_my_part = False

    # ------------------------------------------------------------------ helpers
    def ban(self, member: int, reason: str, evidence: str) -> None:
        peer = self.peers[member]
        if peer not in self.bans:
            self.bans[peer] = Ban(peer, self.step, reason, evidence)

    def signed_board(self, phase: str, record: Any, statement: bytes) -> list[Any]:
        """Publish ``record`` with my signature of ``statement``; return every member's (record, signature)."""
        return self.t.all_gather_object(self.behaviour.record(self.step, phase, (record, self.identity.sign(statement))))

    def outcome(self, stats: dict[str, float], aggregate: Optional[Tensor] = None, seed: Optional[bytes] = None) -> RoundOutcome:
        return RoundOutcome(
            None if self.bans else aggregate, list(self.bans.values()), seed, dict(stats),
            numbers=self.numbers, sizes=self.sizes, refuted=list(self.refuted),
            checkers=list(self.checkers[self.me]),
        )

    # ------------------------------------------------------------------ phases
    def commit(self) -> None:
        self.part_hashes = hashes = [digest(p) for p in self.parts]
        self.secret = MPRNGSecret.fresh(self.peers[self.me], self.step)
        record = (self.step, self.peers[self.me], hashes, self.secret.commitment)
        board = self.signed_board("commit", record, _commit_statement(self.context, self.peers[self.me], hashes, self.secret.commitment))
        for i, entry in enumerate(board):
            parsed = records.commitment(entry, self.step, self.peers[i], self.n)
            ok = parsed is not None and verify_signature(
                self.keys[i], _commit_statement(self.context, self.peers[i], parsed[0], parsed[1]), parsed[2])
            r_hashes, r_commit = (parsed[0], parsed[1]) if parsed is not None else ([b""] * self.n, b"")
            self.committed.append(list(r_hashes))
            self.commitments.append(r_commit)
            if not ok:
                self.ban(i, "malformed or missing commitment", "missing-record")

    def signed(self, content: Tensor, receiver: int, h: Optional[bytes] = None) -> list[Tensor]:
        """``[content, my signature of (me -> receiver, its hash)]``: a part as sent."""
        h = digest(content) if h is None else h
        return [content, _sig_tensor(self.identity.sign(_part_statement(self.context, self.peers[self.me], self.peers[receiver], h)))]

    def scatter(self) -> None:
        """Part ``j`` to aggregator ``j``; my own part, in the same message, to the members that check it."""
        sends = []
        for j in range(self.n):
            content = self.behaviour.part(self.step, self.peers[j], self.parts[j])
            if j == self.me:
                self.sent_myself_my_part = content is self.parts[j]  # then its row of `received` is my part itself
            message = self.signed(content, j, self.part_hashes[j] if content is self.parts[j] else None)
            if j in self.checkers[self.me]:
                mine = self.behaviour.own_part(self.step, self.peers[j], self.parts[self.me])
                message += self.signed(mine, self.me, self.part_hashes[self.me] if mine is self.parts[self.me] else None)
            sends.append(self.behaviour.message(self.step, "scatter", self.peers[j], message))
        self.received = _WORK.get("received", (self.n, self.sizes[self.me]), self.flat.dtype, self.flat.device)
        checked = [i for i in range(self.n) if self.me in self.checkers[i]]
        own_buf = _WORK.get("own", (max(len(checked), 1), max(self.sizes)), self.flat.dtype, self.flat.device)
        self.own_parts = {i: own_buf[k, : self.sizes[i]] for k, i in enumerate(checked)}
        sigs = torch.zeros(self.n, _SIG, dtype=torch.uint8)
        own_sigs = torch.zeros(self.n, _SIG, dtype=torch.uint8)
        recvs = [[self.received[self.row[i]], sigs[i]] + ([self.own_parts[i], own_sigs[i]] if i in self.own_parts else [])
                 for i in range(self.n)]
        malformed = self.t.exchange(sends, recvs)
        self.part_sigs = [bytes(s.tolist()) for s in sigs]
        self.own_sigs = {i: bytes(own_sigs[i].tolist()) for i in checked}
        self.received_norms = safe_norm(self.received, dim=1)  # float64; the verify phase reuses them
        accusations: list[tuple[str, int, Any]] = []
        for i in range(self.n):
            row = self.received[self.row[i]]
            accusation, self.part_sigs[i] = self.take(i, self.me, malformed[i], len(recvs[i]), 0, row, self.part_sigs[i],
                                                      float(self.received_norms[self.row[i]]))
            if accusation is None and malformed[i] is not None:
                self.received_norms[self.row[i]] = safe_norm(row)  # the part taken from the malformed message
            accusations += [accusation] if accusation is not None else []
            if i in self.own_parts:
                accusation, self.own_sigs[i] = self.take(i, i, malformed[i], len(recvs[i]), 2, self.own_parts[i], self.own_sigs[i])
                accusations += [accusation] if accusation is not None else []
        self.resolve(accusations)

    def take(self, sender: int, index: int, malformed: Optional[list[Any]], length: int, at: int, slot: Tensor, sig: bytes,
             norm: Optional[float] = None) -> tuple[Optional[tuple], bytes]:
        """Judge ``sender``'s part ``index`` as received into ``slot`` with ``sig`` (or, from a ``malformed`` message of
        ``length`` tensors, the pair at ``at``): the accusation (``None``: it is the committed part, copied into
        ``slot`` if it came in a malformed message, where it stands) and the signature that came with it."""
        got: Optional[Tensor] = slot
        if malformed is not None:
            got, sig = _unpack(malformed, length, at)
            norm = None
        accusation = self.judge_part(sender, index, got, sig, norm)
        if accusation is None and got is not None and got is not slot:
            slot.copy_(got)
        return accusation, sig

    def judge_part(self, sender: int, index: int, got: Optional[Tensor], sig: bytes, norm: Optional[float] = None) -> Optional[tuple]:
        """``None`` when ``got`` is ``sender``'s part ``index`` as it committed to it (``index == sender``: its own
        contribution, sent to a checker), else the accusation: a dispute when nothing signed arrived, else the
        signed bad part as evidence."""
        own = index == sender and sender != self.me
        if got is None:
            return ("missing-own-part" if own else "missing-part", sender, None)
        h = digest(got)
        if not verify_signature(self.keys[sender], _part_statement(self.context, self.peers[sender], self.peers[index], h), sig):
            return ("missing-own-part" if own else "missing-part", sender, None)
        if (h != self.committed[sender][index] or tuple(got.shape) != (self.sizes[index],) or got.dtype != self.flat.dtype
                or not well_formed_part(got, norm)):
            return ("bad-own-part" if own else "bad-part", sender, (got.clone(), sig))
        return None

    def aggregate(self) -> None:
        rows = self.received[: self.contributing]
        weights = self.weights[self.order[: self.contributing]]
        uniform = bool((weights == weights[0]).all())
        slot = self.aggregates[self.me]  # my part of the output: no fresh buffer each round (gather copies it onto itself)
        self.result = result = centered_clip_with_stats(
            rows, self.config.tau, weights=None if uniform else weights.to(rows.dtype),
            max_iters=self.config.max_iters, eps=self.config.eps, rel_eps=self.config.rel_eps,
            out=slot if slot.dtype == rows.dtype else None,
        )
        self.mine = self.behaviour.published_aggregate(self.step, result.value)
        self.mine_hash = h = digest(self.mine)
        # the hash, signed, and the solver's iterations and residual (metrics only: the check does not trust them)
        residual = float(result.residual) if math.isfinite(result.residual) else 1e300  # never a malformed record of mine
        record = [h, int(result.iterations), residual]
        board = self.signed_board("aggregate", record, _aggregate_statement(self.context, self.peers[self.me], h))
        self.solver_stats: list[tuple[int, float]] = []
        for i, entry in enumerate(board):
            parsed = records.aggregate_record(entry)
            h_i = parsed[0] if parsed is not None else b""
            ok = parsed is not None and verify_signature(self.keys[i], _aggregate_statement(self.context, self.peers[i], h_i), parsed[2])
            self.agg_hashes.append(h_i)
            self.solver_stats.append(parsed[1] if parsed is not None else (0, 0.0))
            if not ok:
                self.ban(i, "malformed or missing aggregate hash", "missing-record")

    def gather(self) -> None:
        sends = []
        for j in range(self.n):
            content = self.behaviour.aggregate(self.step, self.peers[j], self.mine)
            h = self.mine_hash if content is self.mine else digest(content)
            sig = self.identity.sign(_aggregate_statement(self.context, self.peers[self.me], h))
            sends.append(self.behaviour.message(self.step, "gather", self.peers[j], [content, _sig_tensor(sig)]))
        sigs = torch.zeros(self.n, _SIG, dtype=torch.uint8)
        malformed = self.t.exchange(sends, [[self.aggregates[i], sigs[i]] for i in range(self.n)])
        accusations: list[tuple[str, int, Any]] = []
        for i in range(self.n):
            got, sig = (self.aggregates[i], bytes(sigs[i].tolist())) if malformed[i] is None else _unpack(malformed[i])
            if got is None:
                accusations.append(("missing-aggregate", i, None))
                continue
            h = digest(got)
            if not verify_signature(self.keys[i], _aggregate_statement(self.context, self.peers[i], h), sig):
                accusations.append(("missing-aggregate", i, None))
            elif h != self.agg_hashes[i]:
                accusations.append(("equivocation", i, (h, sig)))
            elif malformed[i] is not None:
                if tuple(got.shape) == (self.sizes[i],) and got.dtype == self.flat.dtype:
                    self.aggregates[i].copy_(got)  # the published aggregate in a malformed message: it stands
                else:
                    accusations.append(("missing-aggregate", i, None))  # its published copy must have the right shape
        self.gather_accusations = accusations  # published with the reveals: one board round for both

    def reveal(self) -> Optional[bytes]:
        """The MPRNG reveals and, on the same board, the gather phase's accusations. Knowing the seed cannot change
        what those accusations are about: every aggregate was bound by its signed hash on the aggregate board before
        the first reveal, so an accuser that waits for the others' reveals learns nothing it can use against them."""
        mine = [self.behaviour.reveal(self.step, self.secret.secret), self.behaviour.accusations(self.step, self.gather_accusations)]
        board = self.t.all_gather_object(self.behaviour.record(self.step, "reveal", mine))
        valid: dict[int, bytes] = {}
        published: list[Any] = []
        for i, entry in enumerate(board):
            reveal: Any = None
            items: Any = None
            if type(entry) in (tuple, list) and len(entry) == 2:
                reveal, items = entry
            published.append(items)
            if check_reveal(self.commitments[i], reveal, self.peers[i], self.step):
                valid[self.peers[i]] = reveal
            else:
                self.ban(i, "withheld or wrong MPRNG reveal", "missing-record")
        self.judge(published)
        return shared_seed(self.step, valid) if not self.bans else None

    def my_numbers(self, part_index: int, part: Tensor) -> tuple[list, float]:
        """The numbers a holder of ``part`` (part ``part_index``) publishes, ``[s, ||g - G||, p]``, and ``||g||``."""
        s, norm, p = clipped_projections(self.directions[part_index], part, self.aggregates[part_index], self.config.tau)
        return [s.tolist(), norm, p.tolist()], float(safe_norm(part))

    def verify(self, seed: bytes) -> None:
        k, device = self.config.directions, self.flat.device
        self.directions = LazyDirections(seed, self.sizes, k, device,
                                         SCRATCH.view("vector", (k * max(self.sizes),), torch.float32, device))
        # one pass over the parts, each part's directions drawn once: my numbers for it, and where I hold other
        # members' copies of it (as its aggregator, or as a checker of its aggregator's own part) their recomputation
        mine: list[list] = []
        recomputed: Any = None
        own_recomputed: dict[int, tuple[list, float]] = {}
        for j in range(self.n):
            if j == self.me:  # every sender's part I aggregated, all at once
                recomputed = clipped_projections(self.directions[j], self.received, self.aggregates[j], self.config.tau)
            if j == self.me and self.sent_myself_my_part:  # my own part is one of those rows: its numbers are there
                r = self.row[self.me]
                numbers, part_norm = [recomputed[0][r].tolist(), float(recomputed[1][r]), recomputed[2][r].tolist()], float(self.received_norms[r])
            else:
                numbers, part_norm = self.my_numbers(j, self.parts[j])
            mine.append(list(self.behaviour.numbers(self.step, j, *numbers)) + [part_norm])
            if j in self.own_parts:
                own_recomputed[j] = self.my_numbers(j, self.own_parts[j])
        board = self.signed_board("numbers", mine, _numbers_statement(self.context, self.peers[self.me], mine))
        for i, entry in enumerate(board):
            try:
                nums, sig = entry
                ok = _well_formed_numbers(nums, self.n, self.config.directions)
                ok = ok and verify_signature(self.keys[i], _numbers_statement(self.context, self.peers[i], nums), sig)
            except (TypeError, ValueError):
                ok, nums = False, None
            self.numbers.append(nums)
            if not ok:
                self.ban(i, "malformed or missing verification numbers", "missing-record")
        if self.bans:
            return
        # as aggregator of part `me`, I hold every sender's signed part: their numbers, recomputed above
        s_all, norms, p_all = recomputed
        part_norms = self.received_norms
        accusations = []
        for i in range(self.n):
            if i == self.me:
                continue  # my own numbers are mine: nobody accuses itself
            r = self.row[i]
            if not self.numbers_agree(i, self.me, [s_all[r].tolist(), float(norms[r]), p_all[r].tolist()], float(part_norms[r])):
                accusations.append(("lying-numbers", i, (self.received[r].clone(), self.part_sigs[i])))
        # as a checker of another aggregator's own part, I recomputed its numbers for it too
        for i, own in self.own_parts.items():
            if not self.numbers_agree(i, i, *own_recomputed[i]):
                accusations.append(("lying-own-numbers", i, (own.clone(), self.own_sigs.get(i, bytes(_SIG)))))
        accusers = self.resolve(accusations)
        check = ProjectionCheck(tau=self.config.tau)
        weights = self.weights
        for j in range(self.n):
            s = torch.tensor([self.numbers[i][j][0] for i in range(self.n)], dtype=torch.float64)
            norms = torch.tensor([float(self.numbers[i][j][1]) for i in range(self.n)], dtype=torch.float64)
            # CenteredClip's stated residual, and never below what float32 resolves near zero; an aggregate beyond
            # float32's range (its float32 norm overflows) fails the check (tolerance not finite)
            # and relative to no more than the senders' parts allow an honest aggregate (a huge one passed otherwise)
            g_norm = torch.linalg.vector_norm(self.aggregates[j]).double()
            part_norms = torch.tensor([float(self.numbers[i][j][3]) for i in range(self.n)], dtype=torch.float64)
            scale = min(float(redo_unsure_norms(self.aggregates[j], g_norm)), 2 * aggregate_norm_bound(part_norms, weights, self.config.tau))
            target = max(self.config.eps, self.config.rel_eps * scale)  # the solver's stopping residual
            bound = math.inf if not bool(torch.isfinite(g_norm)) else 2 * target + rounding_floor(self.sizes[j])
            # what the aggregator's recheck of each published s accepts (numbers_agree), allowed for here
            slack = self.config.number_rtol * (weights[:, None] * (s.abs() + (clip_coefficients(norms, self.config.tau) * norms)[:, None])).sum(0)
            if not check.passes(weights, s, norms, bound, slack) and j not in accusers:
                self.ban(j, "its aggregate failed the CenteredClip check", "projection-check")

    def totals(self) -> dict[str, float]:
        """The unverified path's metrics over all parts: parts farther than tau from their aggregate (from the checked
        published distances), the solvers' iterations and residuals at their maximum (as their aggregators report)."""
        if self.bans:  # the round is re-run: its numbers are not all there
            return {"clipped": 0.0, "iterations": 0.0, "residual": 0.0}
        contributing = [i for i in range(self.n) if self.weights[i] > 0]
        clipped = sum(float(self.numbers[i][j][1]) > self.config.tau for i in contributing for j in range(self.n))
        return {"clipped": float(clipped), "iterations": float(max(it for it, _ in self.solver_stats)),
                "residual": max(res for _, res in self.solver_stats)}

    def numbers_match(self, member: int, part_index: int, part: Tensor) -> bool:
        return self.numbers_agree(member, part_index, *self.my_numbers(part_index, part))

    def numbers_agree(self, member: int, part_index: int, recomputed: list, part_norm: float) -> bool:
        """Whether ``member``'s published numbers for a part match ``recomputed`` ``[s, norm, p]`` and the part's norm
        (relative)."""
        published = self.numbers[member][part_index]
        s, norm, p = recomputed
        floor = rounding_floor(self.sizes[part_index])
        rtol = self.config.number_rtol
        # s is judged on its own scale, c ||g - G|| (at most tau): the CenteredClip check allows exactly this much per
        # term (its `slack`), so no lie the recheck accepts can fail an honest aggregator's check. (Relative to ||g||,
        # a sender of a huge legal part could lie by more than the check allows, and frame every aggregator.)
        term = min(1.0, self.config.tau / norm) * norm if norm > 0 else 0.0
        rest_pub = [float(published[1])] + list(published[2]) + [float(published[3])]
        return (_close(list(published[0]), s, rtol, term, floor)
                and _close(rest_pub, [norm] + p + [part_norm], rtol, abs(norm) + part_norm, floor))

    # ------------------------------------------------------------------ accusations
    def resolve(self, accusations: list[tuple]) -> set[int]:
        """Publish my accusations on their own board round; judge everybody's (:meth:`judge`)."""
        return self.judge(self.t.all_gather_object(self.behaviour.accusations(self.step, accusations)))

    def judge(self, board: list[Any]) -> set[int]:
        """Judge every member's published accusations from the evidence. Returns the members whose accusations held
        (an aggregator that caught a liar is not blamed for its failed check)."""
        upheld: set[int] = set()
        disputes: list[tuple[int, str, int]] = []  # (accuser, kind, accused)
        for accuser, items in enumerate(board):
            # at most one accusation per (kind, accused) and round: 2 kinds of claim against each other member
            if type(items) is not list or len(items) > 2 * (self.n - 1):
                self.ban(accuser, "malformed accusation list", "signed-message")
                continue
            seen: set[tuple[str, int]] = set()
            for item in items:
                parsed = records.accusation(item, accuser, self.n, self.sizes)
                if parsed is None or (parsed[0], parsed[1]) in seen:
                    self.ban(accuser, "malformed or repeated accusation", "signed-message")
                    break
                kind, accused, evidence = parsed
                if kind == "missing-own-part" and accuser not in self.checkers[accused]:
                    self.ban(accuser, f"{kind}: peer {self.peers[accused]} owed it nothing", "signed-message")
                    break
                seen.add((kind, accused))
                if kind in records.DISPUTE_KINDS:
                    disputes.append((accuser, kind, accused))
                elif self.evidence_holds(kind, accuser, accused, evidence):
                    self.ban(accused, f"{kind} (accused by peer {self.peers[accuser]})", "signed-message")
                    upheld.add(accuser)
                else:
                    self.ban(accuser, f"false accusation: {kind} against peer {self.peers[accused]}", "signed-message")
        if disputes:
            self.settle_disputes(disputes)
        return upheld

    def evidence_holds(self, kind: str, accuser: int, accused: int, evidence: Any) -> bool:
        if kind in ("bad-part", "bad-own-part"):
            index = accuser if kind == "bad-part" else accused
            content, sig = evidence
            h = digest(content)
            signed = verify_signature(self.keys[accused], _part_statement(self.context, self.peers[accused], self.peers[index], h), sig)
            wrong = h != self.committed[accused][index] or tuple(content.shape) != (self.sizes[index],)
            return signed and (wrong or content.dtype != self.flat.dtype or not well_formed_part(content))
        if kind in ("lying-numbers", "lying-own-numbers"):
            # the part is the accused's if its signed commitment names it: no part signature needed (a part that came as
            # a published copy after a refuted dispute has none, and its aggregator must still be able to prove a lie)
            # before the numbers board (an accusation on the scatter or reveal board) there are no numbers to lie in
            if not self.numbers:
                return False
            index = accuser if kind == "lying-numbers" else accused
            content, _ = evidence
            return digest(content) == self.committed[accused][index] and not self.numbers_match(accused, index, content)
        if kind == "equivocation":
            h, sig = evidence
            signed = verify_signature(self.keys[accused], _aggregate_statement(self.context, self.peers[accused], h), sig)
            return signed and h != self.agg_hashes[accused]
        raise ValueError(f"unknown accusation {kind!r}")

    def settle_disputes(self, disputes: list[tuple[int, str, int]]) -> None:
        """An unprovable claim ("I got nothing valid from you"): the accused publishes what it owed on the
        board; a valid copy is used and nobody is banned, an invalid or missing one bans the accused."""
        owed = [(accuser, kind) for accuser, kind, accused in disputes if accused == self.me]
        publication = []
        for accuser, kind in owed:
            content = (self.parts[accuser] if kind == "missing-part" else self.parts[self.me] if kind == "missing-own-part"
                       else self.mine)
            publication.append((accuser, kind, self.behaviour.republish(self.step, kind, self.peers[accuser], content)))
        board = self.t.all_gather_object(self.behaviour.record(self.step, "publication", publication))
        copies = [records.publication(entry, author, self.n, 2 * (self.n - 1)) for author, entry in enumerate(board)]
        for accuser, kind, accused in disputes:
            published = copies[accused]
            copy = published.get((accuser, kind)) if published is not None else None
            index = accuser if kind == "missing-part" else accused  # the part owed
            valid = False
            if isinstance(copy, Tensor) and copy.dtype == self.flat.dtype and tuple(copy.shape) == (self.sizes[index],):
                if kind in ("missing-part", "missing-own-part"):
                    valid = digest(copy) == self.committed[accused][index] and well_formed_part(copy)
                    if valid and accuser == self.me and kind == "missing-part":
                        self.received[self.row[accused]].copy_(copy)
                        self.received_norms[self.row[accused]] = safe_norm(copy)
                    elif valid and accuser == self.me:
                        self.own_parts[accused].copy_(copy)
                else:
                    valid = digest(copy) == self.agg_hashes[accused]
                    if valid and accuser == self.me:
                        self.aggregates[accused].copy_(copy)
            if not valid:
                self.ban(accused, f"{kind}: no valid copy published when disputed", "missing-record")
            else:
                self.refuted.append((self.peers[accuser], self.peers[accused]))


def verified_round(
    flat: Tensor,
    transport: Transport,
    identity: Identity,
    keys: Sequence[bytes],
    peers: Sequence[int],
    step: int,
    config: RoundConfig = RoundConfig(),
    behaviour: Optional[Behaviour] = None,
    weights: Optional[Sequence[float]] = None,
    out: Optional[Tensor] = None,
    context: bytes = b"",
) -> RoundOutcome:
    """One verified round among ``peers`` (member ``i`` is ``peers[i]`` with public key ``keys[i]``).

    ``weights[i]`` is member ``i``'s weight in CenteredClip and in the check (default 1; 0 for a validator,
    whose gradient this step is a recomputation of somebody else's). The aggregate is written into ``out``
    when given (a buffer like ``flat``, not overlapping it). Every signature binds ``context`` (the caller's run
    nonce and attempt: a statement signed in one attempt is no evidence in another), the step and ``peers``."""
    r = _Round(flat, transport, identity, keys, peers, step, config, behaviour or Behaviour(), weights, out, context)
    r.behaviour.observe(r)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def timed(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[f"time_{name}"] = now - clock
        clock = now

    for phase in (r.commit, r.scatter, r.aggregate, r.gather):
        phase()
        timed(phase.__name__)
        if r.bans:  # every honest peer stops at the same phase: the bans come from the same records
            return r.outcome(times)
    seed = r.reveal()
    timed("reveal")
    if seed is None:
        return r.outcome(times)
    r.verify(seed)
    timed("verify")
    stats = {**r.totals(), **times}
    return r.outcome(stats, r.out, seed)
