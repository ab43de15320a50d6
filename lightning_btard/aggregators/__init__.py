"""Aggregation rules, by name: ``"mean"`` (undefended baseline) and ``"centered_clip"`` (BTARD)."""

from lightning_btard.aggregators.base import (
    AGGREGATORS,
    STAT_KEYS,
    AggregationResult,
    Aggregator,
    register_aggregator,
    resolve_aggregator,
)
from lightning_btard.aggregators.centered_clip import CenteredClip
from lightning_btard.aggregators.mean import Mean

__all__ = [
    "AGGREGATORS",
    "STAT_KEYS",
    "AggregationResult",
    "Aggregator",
    "CenteredClip",
    "Mean",
    "register_aggregator",
    "resolve_aggregator",
]
