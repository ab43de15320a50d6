"""The chain of group changes a joiner believes (``groups/hivemind_chain.py``), checked without a swarm: signers are
RSA keys as hivemind nodes hold them. An adversary picks which members sign each change, forges, reorders and
tampers; the chain verifies exactly when every change is signed as the rules say."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_btard.errors import UserError
from lightning_btard.groups.hivemind_chain import GroupChain, anchor_of, verify_chain
from lightning_btard.transports.codec import encode_record
from lightning_btard.transports.hivemind_node import peer_id_of_owner


class Signer:
    """What :meth:`GroupChain.sign` needs of a node: its RSA key, owner marker and peer id."""

    def __init__(self) -> None:
        self.private_key = RSAPrivateKey()
        self.owner = RSASignatureValidator(self.private_key).local_public_key
        self.peer_id = peer_id_of_owner(self.owner)


SIGNERS = [Signer() for _ in range(7)]
RUN = "run"


def _genesis(members: list[Signer]) -> GroupChain:
    chain = GroupChain.genesis(RUN, b"s" * 16, [m.peer_id for m in members], b"g" * 16)
    for m in members:
        chain.sign(m, 0)
    return chain


def _verify(chain: GroupChain, trusted=()) -> GroupChain:
    return verify_chain(chain.to_record(), RUN, trusted, chain.links[0].digest if not trusted else None)


def test_a_chain_of_majority_signed_changes_verifies_and_a_minority_cannot_extend_it() -> None:
    a, b, c, d, e = SIGNERS[:5]
    chain = _genesis([a, b, c])
    chain.extend([p.peer_id for p in (a, b, c, d)], b"1" * 16)  # an admission, signed by the group before: a and b of a, b, c
    chain.sign(a)
    chain.sign(b)
    assert _verify(chain).head.members == [p.peer_id.to_base58() for p in (a, b, c, d)]
    chain.extend([p.peer_id for p in (c, d, e)], b"2" * 16)  # c and d (2 of 4: not a strict majority) replace a and b with e
    chain.sign(c)
    chain.sign(d)
    with pytest.raises(ValueError, match="link 2 is not signed by a strict majority"):
        _verify(chain)
    chain.links[-1].signatures[e.peer_id.to_base58()] = e.private_key.sign(chain.head.digest)  # e was not in it
    with pytest.raises(ValueError, match="link 2 is not signed"):
        _verify(chain)
    chain.sign(a)  # a third member of the four: now it holds
    assert _verify(chain).head.members == [p.peer_id.to_base58() for p in (c, d, e)]


def test_the_genesis_needs_every_member_and_the_anchor() -> None:
    a, b, c = SIGNERS[:3]
    chain = GroupChain.genesis(RUN, b"s" * 16, [a.peer_id, b.peer_id, c.peer_id], b"g" * 16)
    chain.sign(a, 0)
    chain.sign(b, 0)
    with pytest.raises(ValueError, match="link 0 is not signed by every member"):
        _verify(chain)
    chain.sign(c, 0)
    _verify(chain)
    with pytest.raises(ValueError, match="another genesis"):
        verify_chain(chain.to_record(), RUN, (), b"x" * 32)
    with pytest.raises(ValueError, match="another genesis"):
        verify_chain(chain.to_record(), RUN, (), None)
    with pytest.raises(ValueError, match="trusted peer"):
        verify_chain(chain.to_record(), RUN, [SIGNERS[5].peer_id.to_base58()], None)
    verify_chain(chain.to_record(), RUN, [b.peer_id.to_base58()], None)


def test_tampering_breaks_the_chain() -> None:
    a, b, c, d = SIGNERS[:4]
    chain = _genesis([a, b, c])
    chain.extend([p.peer_id for p in (a, b, c, d)], b"1" * 16)
    chain.sign(a)
    chain.sign(b)
    record = chain.to_record()
    record["links"][1][0]["members"] = record["links"][1][0]["members"][:3] + [SIGNERS[6].peer_id.to_base58()]
    with pytest.raises(ValueError):  # the statement changed: its signatures are of another digest
        verify_chain(record, RUN, (), chain.links[0].digest)
    record = chain.to_record()
    record["owners"][a.peer_id.to_base58()] = SIGNERS[6].owner  # a key that is not a's
    with pytest.raises(ValueError, match="link 0"):
        verify_chain(record, RUN, (), chain.links[0].digest)
    for broken in ({}, {"links": [], "owners": {}}, {"links": [[{}, {}]], "owners": {}}, {"links": "x", "owners": {}},
                   {"links": [[{**chain.links[0].statement, "run": "other"}, {}]], "owners": {}}):
        with pytest.raises(ValueError):
            verify_chain(broken, RUN, (), chain.links[0].digest)
    other = GroupChain.genesis(RUN, b"t" * 16, [a.peer_id], b"g" * 16)  # a second genesis spliced in
    other.sign(a, 0)
    record = chain.to_record()
    record["links"].insert(1, other.to_record()["links"][0])
    with pytest.raises(ValueError, match="does not follow"):
        verify_chain(record, RUN, (), chain.links[0].digest)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sets(st.integers(0, 6), min_size=1, max_size=7), st.sets(st.integers(0, 6), max_size=7)),
                min_size=1, max_size=4))
def test_a_chain_verifies_exactly_when_each_change_has_its_majority(changes) -> None:
    """The adversary chooses each next group and who signs it (any peers, members of the group before or not)."""
    first = [SIGNERS[i] for i in (0, 1, 2)]
    chain = _genesis(first)
    members = [0, 1, 2]
    ok = True
    for group, signers in changes:
        chain.extend([SIGNERS[i].peer_id for i in sorted(group)], b"x" * 16)
        for i in signers:
            chain.links[-1].signatures[SIGNERS[i].peer_id.to_base58()] = SIGNERS[i].private_key.sign(chain.head.digest)
            chain.owners[SIGNERS[i].peer_id.to_base58()] = SIGNERS[i].owner
        ok = ok and 2 * len(set(signers) & set(members)) > len(members)
        members = sorted(group)
    if ok:
        assert _verify(chain).head.members == [SIGNERS[i].peer_id.to_base58() for i in members]
    else:
        with pytest.raises(ValueError):
            _verify(chain)


def test_two_geneses_named_is_an_error_and_junk_marks_name_none() -> None:
    g1, g2 = b"1" * 32, b"2" * 32
    assert anchor_of({}, RUN) is None
    assert anchor_of({1: encode_record({"genesis": g1}), 2: encode_record({"genesis": g1}), 3: b"\xff junk",
                      4: encode_record({"genesis": "x"}), 5: encode_record([1])}, RUN) == g1
    with pytest.raises(UserError, match="claimed by 2 groups"):
        anchor_of({1: encode_record({"genesis": g1}), 2: encode_record({"genesis": g2})}, RUN)
