"""Structured events: bans, departures, regroups, admissions, refusals and leaving, as one record type.

Every event goes to ``logging`` (logger ``lightning_btard.events``, one human line), is kept in memory,
and reaches any sink attached to the :class:`EventLog`: the strategy attaches a JSON-lines file in the
run directory and the Lightning loggers. Tools (``swarm``, ``demo``) and tests read the file with
:func:`read_events` instead of parsing printed text.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["EVENT_KINDS", "Event", "EventLog", "JsonLinesSink", "read_events"]

log = logging.getLogger("lightning_btard.events")

EVENT_KINDS = ("ban", "departure", "regroup", "admission", "refusal", "left", "joined")


@dataclass(frozen=True)
class Event:
    """Something that changed who is in the run, seen by one peer (``observer``) at ``step``."""

    kind: str
    """One of :data:`EVENT_KINDS`."""
    step: int
    peers: tuple[int, ...] = ()
    """The peers the event is about (the banned, the departed, the admitted, the refused, ...)."""
    reason: str = ""
    evidence: str = ""
    """For bans: the kind of evidence (``signed-message``, ``missing-record``, ``recomputation``, ...)."""
    members: tuple[int, ...] = ()
    """The group after the event."""
    observer: Optional[int] = None
    """The peer that saw it (its id), when known."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; known: {EVENT_KINDS}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peers"], d["members"] = list(self.peers), list(self.members)
        return d

    def message(self) -> str:
        """One line for people."""
        who = ", ".join(str(p) for p in self.peers)
        group = f"; continuing with {len(self.members)} peers {list(self.members)}" if self.members else ""
        if self.kind == "ban":
            return f"BTARD: step {self.step}: banned peer {who}: {self.reason} ({self.evidence}){group}"
        if self.kind == "departure":
            return f"BTARD: step {self.step}: peer(s) [{who}] stopped answering (crashed or disconnected){group}"
        if self.kind == "regroup":
            return f"BTARD: step {self.step}: a collective failed, nobody left{group}"
        if self.kind == "admission":
            return f"BTARD: step {self.step}: admitted peer(s) [{who}] {self.reason}{group}"
        if self.kind == "refusal":
            return f"BTARD: step {self.step}: refused {'banned peer ' + who if who else 'peer'} {self.reason}"
        if self.kind == "joined":
            return f"BTARD: step {self.step}: this peer joined as peer {who}{group}"
        return f"BTARD: step {self.step}: this peer (peer {who}) left the training: {self.reason} [{self.evidence}]"


class EventLog:
    """The events one peer has seen, and where they go."""

    def __init__(self, observer: Optional[int] = None) -> None:
        self.observer = observer
        self.events: list[Event] = []
        self._sinks: list[Callable[[Event], None]] = []

    def attach(self, sink: Callable[[Event], None]) -> None:
        self._sinks.append(sink)

    def detach(self, sink: Callable[[Event], None]) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def emit(self, kind: str, step: int, peers: Sequence[int] = (), reason: str = "", evidence: str = "",
             members: Sequence[int] = (), **extra: Any) -> Event:
        event = Event(kind, int(step), tuple(int(p) for p in peers), reason, evidence, tuple(int(m) for m in members),
                      self.observer, dict(extra))
        self.events.append(event)
        log.warning(event.message())
        for sink in list(self._sinks):
            try:
                sink(event)
            except Exception as e:  # noqa: BLE001 - a full disk or a closed logger must not stop training
                log.warning("BTARD: an event sink failed (%s); the event is still in the log", e)
        return event


class JsonLinesSink:
    """Appends each event as one JSON object per line to ``path`` (flushed: readable while the run goes on)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.as_dict(), sort_keys=True, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_events(path: str, kind: Optional[str] = None) -> list[dict[str, Any]]:
    """The events in a JSON-lines file (``kind``: only those); a missing file has none, a torn last line is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and (kind is None or event.get("kind") == kind):
                out.append(event)
    return out
