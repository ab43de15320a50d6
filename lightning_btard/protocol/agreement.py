"""Decisions by strict majority over what every member published: the one rule behind the start-up agreement (data,
initial state, run seed) and the parameter-digest comparison."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["strict_majority"]


def strict_majority(values: Sequence[Any]) -> Optional[Any]:
    """The value more than half of ``values`` are, else ``None``. Only exact ``str``, ``bytes`` and ``int`` values count
    (anything else a peer sent is no value, but still counts in the total)."""
    counts = Counter(v for v in values if type(v) in (str, bytes, int))
    if not counts:
        return None
    top, count = counts.most_common(1)[0]
    return top if 2 * count > len(values) else None
