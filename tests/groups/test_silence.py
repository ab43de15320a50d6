"""Who leaves after a failed collective (``groups/silence.py``). The adversary controls the Byzantine members: whom
they withhold from, and any report they make (seq, names). Honest reports follow from what happened. Whatever it
does, the Byzantine share of the group never grows, every honest member removed is paired with a Byzantine one, and
a real withholding costs at least one Byzantine member its place."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_btard.groups.silence import parse_report, silence_removals

M = [f"p{i}" for i in range(7)]


def test_a_peer_silent_toward_a_majority_leaves_alone_and_a_dispute_removes_both() -> None:
    members = M[:5]
    # p4 withheld from p0, p1 and p2 in collective 9; everyone else then waited for them in collective 10
    reports = {"p0": (9, ["p4"]), "p1": (9, ["p4"]), "p2": (9, ["p4"]), "p3": (10, ["p0", "p1", "p2"]), "p4": (10, ["p0"])}
    assert set(silence_removals(reports, members)) == {"p4"}
    # p4 withheld from p0 only: p0's word against p4's, both leave; the later reports are explained by p0's stall
    reports = {"p0": (9, ["p4"]), "p1": (10, ["p0"]), "p2": (10, ["p0"]), "p3": (10, ["p0"]), "p4": (10, ["p0"])}
    out = silence_removals(reports, members)
    assert set(out) == {"p0", "p4"} and "dispute" in out["p0"]
    # a liar claims an earlier collective to get an honest member removed: it leaves with it
    reports = {"p0": (9, ["p4"]), "p3": (2, ["p1"])}
    assert set(silence_removals(reports, members)) == {"p3", "p1"}
    # reports that name nobody in the group, or themselves, count for nothing
    assert silence_removals({"p0": (1, ["p0", "x"]), "p1": None}, members) == {}


def test_reports_are_read_strictly() -> None:
    session = b"s" * 16
    assert parse_report([session, 4, ["p1", "x", 3]], session, M) == (4, ["p1"])
    for bad in (None, [session, 4], [b"t" * 16, 4, ["p1"]], [session, "4", ["p1"]], [session, 4, "p1"],
                [session, 4, ["p1"] * 50], [session, 4, []], [session, True, ["p1"]]):
        assert parse_report(bad, session, M) is None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_byzantine_share_never_grows_whatever_they_report(data) -> None:
    n = data.draw(st.integers(3, 7))
    members = M[:n]
    byzantine = set(data.draw(st.sets(st.sampled_from(members), max_size=(n - 1) // 2)))
    honest = [m for m in members if m not in byzantine]
    k = 10
    # what happened: each Byzantine member withholds from some honest members in collective k
    withheld = {b: set(data.draw(st.sets(st.sampled_from(honest), max_size=len(honest)))) for b in sorted(byzantine)}
    stuck = {h for h in honest if any(h in w for w in withheld.values())}
    reports: dict[str, object] = {}
    for h in honest:
        if h in stuck:
            reports[h] = (k, sorted(b for b, w in withheld.items() if h in w))
        else:  # it went on to collective k + 1 and waited there for the stuck ones (and any Byzantine that stopped)
            quiet = sorted(stuck | set(data.draw(st.sets(st.sampled_from(sorted(byzantine) or ["-"]), max_size=2))) - {"-"})
            reports[h] = (k + 1, quiet) if quiet else None
    for b in sorted(byzantine):  # anything at all
        reports[b] = data.draw(st.none() | st.tuples(st.integers(k - 3, k + 3), st.lists(st.sampled_from(members), max_size=n)))
    out = silence_removals(reports, members)
    gone_honest = [m for m in out if m in honest]
    gone_byzantine = [m for m in out if m in byzantine]
    assert len(gone_honest) <= len(gone_byzantine), (reports, out)
    staying = [m for m in members if m not in out]
    assert len(byzantine - set(out)) * n <= len(byzantine) * len(staying) or not staying  # the share never grows
    if stuck:
        assert gone_byzantine, (reports, out)  # a withholding costs the Byzantine side at least one member
