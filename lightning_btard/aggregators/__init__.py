"""Aggregation rules, by name, each in its own file: ``"mean"`` (undefended baseline), ``"centered_clip"`` (BTARD,
the only one the verification protocol checks), ``"coordinate_median"``, ``"trimmed_mean"``, ``"geometric_median"``,
``"krum"``, ``"multi_krum"``, and the wrappers of any of them ``"bucketing"`` and ``"nnm"``.

``BTARDStrategy(aggregator=<name>, aggregator_options={...})`` builds one; ``@register_aggregator`` adds one.
"""

from lightning_btard.aggregators.base import (
    AGGREGATORS,
    STAT_KEYS,
    AggregationResult,
    Aggregator,
    register_aggregator,
    resolve_aggregator,
)
from lightning_btard.aggregators.bucketing import Bucketing
from lightning_btard.aggregators.centered_clip import CenteredClip
from lightning_btard.aggregators.coordinate_median import CoordinateMedian
from lightning_btard.aggregators.geometric_median import GeometricMedian
from lightning_btard.aggregators.krum import Krum, MultiKrum
from lightning_btard.aggregators.mean import Mean
from lightning_btard.aggregators.nearest_neighbor_mixing import NearestNeighborMixing
from lightning_btard.aggregators.trimmed_mean import TrimmedMean

__all__ = [
    "AGGREGATORS",
    "STAT_KEYS",
    "AggregationResult",
    "Aggregator",
    "Bucketing",
    "CenteredClip",
    "CoordinateMedian",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MultiKrum",
    "NearestNeighborMixing",
    "TrimmedMean",
    "register_aggregator",
    "resolve_aggregator",
]
