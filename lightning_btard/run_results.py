"""What a finished run left on disk, read back: its CSVLogger metrics and the bans in its event file.

Used by the demo and by ``btard sweep`` to report runs (``protocol/events.py`` writes the events).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["read_bans", "read_metrics"]


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """``metric -> {step: value}`` from a CSVLogger file."""
    series: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, {})[step] = float(value)
    return series


def read_bans(run_dir: Path, rank: int = 0) -> list[dict[str, Any]]:
    """The bans peer ``rank`` saw during the run under ``run_dir`` (empty when it wrote no event file)."""
    from lightning_btard.protocol.events import read_events

    return [e for path in sorted(run_dir.glob(f"**/btard_events/rank{rank}.jsonl")) for e in read_events(str(path), "ban")]
