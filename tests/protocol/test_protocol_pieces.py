"""Pieces of the verification protocol: digests, signatures, the MPRNG, the ban list."""

from __future__ import annotations

import torch

from lightning_btard.protocol.digest import digest
from lightning_btard.protocol.identity import Identity, verify_signature
from lightning_btard.protocol.membership import Membership
from lightning_btard.protocol.mprng import MPRNGSecret, check_reveal, shared_seed


def test_digest_separates_values_types_and_boundaries() -> None:
    t = torch.arange(6, dtype=torch.float32)
    assert digest(t) == digest(t.clone())
    assert digest(t) != digest(t.view(2, 3))  # shape is part of it
    assert digest(t) != digest(t.double())  # and dtype
    assert digest(b"ab", b"c") != digest(b"a", b"bc")  # length-prefixed
    assert digest(1) != digest("1") != digest(b"1")
    t2 = t.clone()
    t2[3] = 3.0000002
    assert digest(t) != digest(t2)


def test_signatures_bind_key_and_message() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    sig = alice.sign(b"part 3 of step 7")
    assert verify_signature(alice.public, b"part 3 of step 7", sig)
    assert not verify_signature(alice.public, b"part 4 of step 7", sig)
    assert not verify_signature(mallory.public, b"part 3 of step 7", sig)
    assert not verify_signature(b"not a key", b"x", sig)
    assert not verify_signature(alice.public, b"x", b"garbage")


def test_mprng_commit_reveal_and_seed() -> None:
    secrets = {p: MPRNGSecret.fresh(p, step=5) for p in range(4)}
    commitments = {p: s.commitment for p, s in secrets.items()}
    reveals = {p: s.secret for p, s in secrets.items()}
    assert all(check_reveal(commitments[p], reveals[p], p, 5) for p in range(4))
    assert not check_reveal(commitments[0], reveals[1], 0, 5)  # someone else's secret
    assert not check_reveal(commitments[0], reveals[0], 0, 6)  # replayed at another step
    assert not check_reveal(commitments[0], None, 0, 5)  # withheld
    seed = shared_seed(5, reveals)
    assert seed == shared_seed(5, dict(reversed(list(reveals.items()))))  # order-independent


def test_mprng_seed_is_unpredictable_before_the_last_reveal() -> None:
    """Colluders who know every other reveal still cannot fix the seed: each honest secret changes it."""
    base = {p: MPRNGSecret.fresh(p, 1).secret for p in range(3)}
    seeds = set()
    for _ in range(50):
        reveals = dict(base)
        reveals[3] = MPRNGSecret.fresh(3, 1).secret  # the one honest peer's fresh secret
        seeds.add(shared_seed(1, reveals))
    assert len(seeds) == 50
    # and a withheld reveal gives a different seed from the remaining ones (the round goes on without it)
    assert shared_seed(1, {p: base[p] for p in (0, 1)}) != shared_seed(1, base)


def test_membership_bans_are_final_and_ordered() -> None:
    m = Membership(peers=[0, 1, 2, 3, 4])
    assert m.active == [0, 1, 2, 3, 4]
    assert m.ban(3, step=10, reason="wrong aggregate", evidence="signed-message")
    assert not m.ban(3, step=11, reason="again", evidence="signed-message")
    assert not m.ban(9, step=11, reason="unknown peer", evidence="signed-message")
    assert m.active == [0, 1, 2, 4] and m.banned == {3} and m.generation == 1
    assert m.bans[0].as_dict() == {"peer": 3, "step": 10, "reason": "wrong aggregate", "evidence": "signed-message"}


def test_the_run_seed_is_a_majoritys_or_a_draw_nobody_chooses() -> None:
    from peers import run_peers

    from lightning_btard.protocol.mprng import agree_run_seed

    assert run_peers(3, lambda t: agree_run_seed(t, "7")) == [7, 7, 7]
    # member 0 (Byzantine) configures another seed: the majority's stands
    assert run_peers(3, lambda t: agree_run_seed(t, "8" if t.rank == 0 else "7")) == [7, 7, 7]
    # nobody agrees: a draw, the same on every member, different each run
    first = run_peers(3, lambda t: agree_run_seed(t, None))
    second = run_peers(3, lambda t: agree_run_seed(t, str(t.rank)))
    assert len(set(first)) == 1 and len(set(second)) == 1 and first != second
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in first)


def test_strict_majority_counts_every_member_and_only_plain_values() -> None:
    from lightning_btard.protocol.agreement import strict_majority

    assert strict_majority(["a", "a", "b"]) == "a"
    assert strict_majority(["a", "b"]) is None and strict_majority([]) is None
    assert strict_majority(["a", "a", None, [1], "b"]) is None  # 2 of 5: malformed values count in the total
    assert strict_majority([b"x", b"x", 3]) == b"x" and strict_majority([True, True, 1]) is None


def test_a_draw_is_the_same_everywhere_and_a_bad_reveal_is_left_out() -> None:
    """``mprng.draw``: commit, then reveal; a member whose reveal does not match its commitment counts for nothing
    (it can choose between two outcomes, never the value)."""
    from peers import run_peers

    from lightning_btard.protocol.digest import digest
    from lightning_btard.protocol.mprng import draw

    def peer(t):
        if t.rank == 2:  # commits to one secret, reveals another
            t.all_gather_object(digest(b"a" * 32, "ranks"))
            reveals = t.all_gather_object(b"b" * 32)
            return reveals
        return draw(t, "ranks")

    out = run_peers(3, peer)
    assert out[0] == out[1] and len(out[0]) == 32
    assert out[0] == digest("ranks", out[2][0], out[2][1])  # the honest two reveals only
