"""Who leaves after a failed collective: the members agree on who was silent, and withholding costs the withholder.

After a collective fails, every member that still answers reports, with its regroup announcement, *whom it did not
hear from* (no message, or a malformed one, within the deadline) and in which collective of the failed session
(``CollectiveFailure``). The reports are part of the view the survivors confirm (``hivemind_regroup.py``), so every
member of the next group decides on the same reports, with :func:`silence_removals`:

1. Only the **earliest** collective anyone reports a culprit in counts: a member that stopped there stopped calling
   the collectives after it, so the later reports naming it are explained by the earlier failure, not by it.
2. A member that a **strict majority** of the group reports silent there leaves alone (it withheld from most).
3. Otherwise each report is a dispute nobody can settle — the sender says it sent, the receiver says it did not
   receive — and **both leave**: the reporter and the first member it names that is still in. With
   Byzantine members a minority, every such pair holds at most one honest member or a Byzantine one, so the
   Byzantine share of the group never grows; a withholder always leaves, and takes at most one honest member with it.

Members that leave are *departed* (not banned): they come back only through admission, which caps joins
(``hivemind_policy.py``), and a peer id the group lost :data:`SILENCES_BEFORE_OUT` times (removed here, or silent
through a whole regroup: crashed, or an identity that joined and never took part) is refused for good.
A report that is malformed, of another session, or names nobody in the group counts for nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["SILENCES_BEFORE_OUT", "parse_report", "silence_removals"]

SILENCES_BEFORE_OUT = 2
"""A peer id removed for silence this many times is refused when it asks to join again."""


def parse_report(report: Any, session: bytes, members: Sequence[str]) -> Optional[tuple[int, list[str]]]:
    """``[session, seq, [peer, ...]]`` as a member announced it, if well-formed and about ``session`` (peers: members)."""
    if not (isinstance(report, list) and len(report) == 3 and report[0] == session and type(report[1]) is int
            and isinstance(report[2], list) and len(report[2]) <= len(members)):
        return None
    named = [p for p in report[2] if type(p) is str and p in members]
    return (report[1], named) if named else None


def silence_removals(reports: Mapping[str, Optional[tuple[int, Sequence[str]]]], members: Sequence[str]) -> dict[str, str]:
    """The members that leave, with the reason, from each member's report (``None``: it reports nobody); see the
    module doc. Deterministic in the reports and the members' order."""
    members = list(members)
    accusing = {r: (seq, [s for s in named if s in members and s != r])
                for r, rep in reports.items() if r in members and rep is not None for seq, named in [rep]}
    accusing = {r: v for r, v in accusing.items() if v[1]}
    if not accusing:
        return {}
    first = min(seq for seq, _ in accusing.values())
    at_first = {r: named for r, (seq, named) in accusing.items() if seq == first}
    accusers: dict[str, set[str]] = defaultdict(set)
    for r, named in at_first.items():
        for s in named:
            accusers[s].add(r)
    out: dict[str, str] = {}
    for s in members:
        if 2 * len(accusers.get(s, ())) > len(members):
            out[s] = f"silent toward {len(accusers[s])} of {len(members)} members in collective {first}"
    for r in members:
        if r not in at_first or r in out:
            continue
        for s in at_first[r]:
            if s in out:
                continue  # dealt with already
            out[s] = f"reported silent in collective {first} by {r} alone (a dispute: both leave)"
            out[r] = f"reported {s} silent in collective {first}, which a majority did not (a dispute: both leave)"
            break
    return out
